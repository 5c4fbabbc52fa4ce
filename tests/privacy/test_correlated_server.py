"""Tests for correlated noise at the server (DP-FedAvg with --unit=site and
--noise_mechanism=banded|blt): the plan's groups and events, the server's
stream, and the every-round case where no factorisation helps."""


import dp_accounting
import jax
import jax.numpy as jnp
from jax_privacy.matrix_factorization import optimization
from jax_privacy.matrix_factorization import toeplitz
import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg.federated import server as server_lib
from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import correlated
from fedjax_seg.privacy import keys as keys_lib
from fedjax_seg.privacy import plan as plan_lib
from fedjax_seg.run import config as C
from tests.federated import toy

NAMES = tuple(f"s{k}" for k in range(6))


def _plan(mechanism, q, rounds=8, **kwargs):
  args = dict(site_names=NAMES, units=np.full(6, 10), batch_size=2,
              local_steps=1, rounds=rounds, delta=1e-5, unit="site",
              record_level=False, use_site_level=True,
              site_sampling_rate=q, site_target_epsilon=4.0,
              site_mechanism=mechanism, mf_bands=4, blt_max_buffers=1)
  args.update(kwargs)
  return plan_lib.plan_noise(**args)


@pytest.mark.parametrize("q, mf_bands, cycles, rate", [
    (1.0, 4, 1, 1.0),    # Every site every round: one group (DP-SGD noise).
    (0.5, 4, 2, 1.0),    # Two groups, each trains in full every other round.
    (0.1, 4, 4, 0.4),    # Four groups (at most --mf_bands), sampled at q b.
    (0.3, 2, 2, 0.6)])
def test_banded_server_groups_and_rate(q, mf_bands, cycles, rate):
  plan = _plan("banded", q, mf_bands=mf_bands)
  mech = plan.site_mechanism
  assert int(mech.cycles[0]) == cycles and mech.amplified
  assert len(mech.strategies[0].coefs) == cycles
  assert plan.site_group_rate == pytest.approx(rate)
  # A round expects q K sites, as independent DP-FedAvg.
  assert plan.expected_sites == pytest.approx(q * 6)


def test_banded_server_events_are_dp_sgd_on_group_zero():
  plan = _plan("banded", 0.1)
  ledger, site_ledger = plan.new_ledgers()
  for r in range(plan.site_mechanism.rounds):
    plan.charge(ledger, site_ledger, r, np.ones(6, bool))
  # Group 0 of 4 trains in rounds 0 and 4 of 8: two amplified steps at
  # z / ||c|| (Choquette-Choo et al. 2023, Thm. 4).
  norm = np.linalg.norm(np.asarray(plan.site_mechanism.strategies[0].coefs,
                                   np.float64))
  reference = accounting.PrivacyLedger(["s0"], delta=1e-5)
  reference.record_event("s0", dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.4, dp_accounting.GaussianDpEvent(
          plan.site_applied_sigma / norm)), 2))
  for name in NAMES:
    assert site_ledger.epsilon(name) == pytest.approx(
        reference.epsilon("s0"), rel=1e-9)
    assert 0.99 * 4.0 <= site_ledger.epsilon(name) <= 4.0


@pytest.mark.slow  # Optimizing a BLT takes seconds.
def test_blt_server_composes_to_the_stream_gaussian():
  plan = _plan("blt", 0.25, rounds=12)
  mech = plan.site_mechanism
  assert int(mech.cycles[0]) == 4 and not mech.amplified
  assert plan.site_group_rate == 1.0  # The whole group trains.
  assert plan.expected_sites == pytest.approx(6 / 4)
  ledger, site_ledger = plan.new_ledgers()
  for r in range(12):
    plan.charge(ledger, site_ledger, r, np.ones(6, bool))
  s2 = mech.strategies[0].sensitivity_squared(12, 4)
  whole = accounting.PrivacyLedger(["s0"], delta=1e-5)
  whole.record_event("s0", dp_accounting.GaussianDpEvent(
      plan.site_applied_sigma / np.sqrt(s2)))
  assert site_ledger.epsilon("s3") == pytest.approx(whole.epsilon("s0"),
                                                    rel=1e-6)
  assert site_ledger.epsilon("s3") <= 4.0


def test_every_round_participation_gains_nothing_from_bands():
  """With every site in every round (min-sep 1), the banded C of least
  prefix-sum error times sensitivity is the identity: what the server plan
  uses for q = 1 (one band), rather than bands that would add noise."""
  n = 16

  def sensitivity_squared(c):  # ||C 1||^2: participation in every step.
    column = jnp.zeros(n, c.dtype).at[:c.shape[0]].set(c)
    return jnp.sum(jnp.cumsum(column) ** 2)

  def loss(c):
    c = jnp.abs(c)
    return jnp.mean(toeplitz.per_query_error(strategy_coef=c, n=n)) * (
        sensitivity_squared(c))

  identity = float(loss(jnp.ones(1)))
  with jax.enable_x64():
    for bands in (2, 4):
      start = toeplitz.optimal_max_error_strategy_coefs(bands)
      best = optimization.optimize(loss, start, max_optimizer_steps=200)
      assert float(loss(best)) >= identity * (1 - 1e-6)
      assert float(loss(start)) > identity  # A correlated start is worse.
  plan = _plan("banded", 1.0)
  assert plan.site_mechanism.strategies[0].coefs == (1.0,)


def _server(strategy, rounds=3):
  """Params after `rounds` of the server with no site (pure noise), and
  the noise each round added."""
  params = toy.init_params()
  site_dp = fed.SiteLevelDPConfig(l2_clip_norm=0.5, noise_multiplier=1.3,
                                  expected_sites=2.0, noise_strategy=strategy)
  config = fed.ServerConfig()
  state = server_lib.init_server_state(params, config, site_dp)
  deltas = jax.tree.map(lambda p: jnp.zeros((4,) + p.shape), params)
  root = jax.random.key(11)
  added = []
  for r in range(rounds):
    before = state.params
    state, _ = server_lib.server_update(
        state, deltas, jnp.zeros(4, bool), jnp.ones(4, jnp.int32), config,
        site_dp, r, root)
    added.append(jnp.concatenate([
        (a - b).ravel() for a, b in zip(jax.tree.leaves(state.params),
                                        jax.tree.leaves(before))]))
  return np.stack(added), state


def test_server_noise_is_c_inverse_over_rounds():
  strategy = correlated.Strategy.banded((0.8, 0.6))
  correlated_rounds, state = _server(strategy)
  independent, _ = _server(None)
  # Round r's fresh noise is independent DP-FedAvg's (the same key), and the
  # released noise is C^{-1} applied over rounds: z_0 / c0, then
  # (z_1 - c1 w_0) / c0, ...
  c0, c1 = strategy.coefs
  w = [independent[0] / c0]
  for r in (1, 2):
    w.append((independent[r] - c1 * w[-1]) / c0)
  np.testing.assert_allclose(correlated_rounds, np.stack(w),
                             atol=1e-5 * np.abs(independent).max())
  assert int(state.noise.count) == 3
  # One band is independent DP-FedAvg bit for bit.
  one_band, _ = _server(correlated.Strategy.banded((1.0,)))
  np.testing.assert_array_equal(one_band, independent)


def test_server_groups_are_secret_draws_of_the_root():
  root = jax.random.key(5)
  groups = fed.server_groups(root, 4000, 4)
  counts = np.bincount(groups, minlength=4)
  assert counts.min() > 900 and counts.max() < 1100
  # Drawn from their own purpose: not the site sampling's uniforms.
  key = keys_lib.derive_key(root, round_index=0, site=0, step=0,
                            purpose=keys_lib.Purpose.SAMPLE_SITES)
  uniforms = np.asarray(jax.random.uniform(key, (4000,)))
  assert abs(np.corrcoef(groups, uniforms)[0, 1]) < 0.05
  np.testing.assert_array_equal(groups, fed.server_groups(root, 4000, 4))


def test_server_mechanism_config():
  ok = C.PrivacyConfig(unit="site", noise_mechanism="blt",
                       site_sampling_rate=0.25, site_target_epsilon=4.0)
  assert ok.use_site_level and not ok.record_level
  with pytest.raises(C.ConfigError, match="--site_target_epsilon"):
    C.PrivacyConfig(unit="patient", site_target_epsilon=4.0)
  with pytest.raises(C.ConfigError, match="--adaptive_clipping"):
    C.PrivacyConfig(unit="site", noise_mechanism="banded",
                    adaptive_clipping="geometric", site_noise_multiplier=1.0)
  with pytest.raises(ValueError, match="adaptive"):
    # The plan refuses it too (any adaptive setting).
    _plan("banded", 0.5, site_adaptive=object())


@pytest.mark.parametrize("mechanism", ["independent", "banded"])
def test_calibrated_z_composes_with_an_init_from_runs_spending(mechanism):
  """With --unit=site the site-level ledger is the main one: a composed
  source's events (`prior_events`) come first, and z is calibrated so that
  the most spent training site ends at the target."""
  spent = dp_accounting.GaussianDpEvent(3.0)
  plan = _plan(mechanism, 0.5, prior_events={"s0": [spent], "s5": [spent]},
               training_sites=np.array([True] * 5 + [False]))
  ledger, site_ledger = plan.new_ledgers()
  for r in range(8):
    plan.charge(ledger, site_ledger, r, np.ones(6, bool))
  assert 0.99 * 4.0 <= site_ledger.epsilon("s0") <= 4.0
  # Other training sites spent nothing before: below the target.
  assert site_ledger.epsilon("s1") < site_ledger.epsilon("s0")
  # A held-out site's prior does not raise z: s5 trains in no round.
  alone = _plan(mechanism, 0.5, prior_events={"s0": [spent]},
                training_sites=np.array([True] * 5 + [False]))
  assert alone.site_applied_sigma == plan.site_applied_sigma

"""Tests for correlated noise (fedjax_seg.privacy.correlated) and its plan."""

import itertools

import chex
import dp_accounting
import jax
import jax.numpy as jnp
from jax_privacy.experimental import accounting as jp_accounting
from jax_privacy.matrix_factorization import streaming_matrix
import numpy as np
import optax
import pytest

from fedjax_seg.federated import sampling
from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import correlated
from fedjax_seg.privacy import noise as noise_lib
from fedjax_seg.privacy import plan as plan_lib
from fedjax_seg.verifier import correlated as verifier_correlated

BANDED = correlated.Strategy.banded((0.8, 0.5, 0.3))
BLT = correlated.Strategy("blt", buf_decay=(0.7, 0.2),
                          output_scale=(0.4, 0.1))


def _matrix(strategy, n):
  c = strategy.toeplitz_coefs(n)
  return np.array([[c[i - j] if i >= j else 0.0 for j in range(n)]
                   for i in range(n)])


def _brute_force_sensitivity_squared(matrix, min_sep):
  """max ||C u||^2 over every u in {0,1}^n with ones >= min_sep apart."""
  n = matrix.shape[0]
  best = 0.0
  for u in itertools.product((0, 1), repeat=n):
    ones = np.flatnonzero(u)
    if len(ones) and np.any(np.diff(ones) < min_sep):
      continue
    best = max(best, float(np.sum((matrix @ np.asarray(u, float)) ** 2)))
  return best


@pytest.mark.parametrize("strategy", [BANDED, BLT], ids=["banded", "blt"])
@pytest.mark.parametrize("min_sep", [1, 2, 3, 5])
def test_sensitivity_is_the_brute_force_maximum(strategy, min_sep):
  n = 10
  want = _brute_force_sensitivity_squared(_matrix(strategy, n), min_sep)
  assert strategy.sensitivity_squared(n, min_sep) == pytest.approx(
      want, rel=1e-9)
  # The verifier's own computation agrees.
  column = verifier_correlated.toeplitz_column(strategy.to_dict(), n, "s")
  np.testing.assert_allclose(column, strategy.toeplitz_coefs(n))
  assert verifier_correlated.minsep_sensitivity_squared(
      column, n, min_sep) == pytest.approx(want, rel=1e-9)


def test_banded_with_separated_participations_has_sensitivity_norm():
  # b-banded, participations b apart: the columns do not overlap.
  k = -(-12 // 3)
  assert BANDED.sensitivity_squared(12, 3) == pytest.approx(
      k * np.sum(np.square(BANDED.coefs)), rel=1e-6)


@pytest.mark.parametrize("strategy", [BANDED, BLT], ids=["banded", "blt"])
def test_mean_prefix_rows_is_the_dense_computation(strategy):
  n = 12
  rows = np.cumsum(np.linalg.inv(_matrix(strategy, n)), axis=0)
  want = float(np.mean(np.sum(rows ** 2, axis=1)))
  assert strategy.mean_prefix_rows(n) == pytest.approx(want, rel=1e-10)
  identity = correlated.Strategy.banded((1.0,))
  assert identity.mean_prefix_rows(n) == pytest.approx((n + 1) / 2)


def test_strategy_refuses_increasing_coefficients():
  with pytest.raises(ValueError, match="non-increasing"):
    correlated.Strategy("banded", coefs=(0.5, 0.8))
  with pytest.raises(ValueError, match="non-negative"):
    correlated.Strategy("blt", buf_decay=(0.5,), output_scale=(-0.4,))


def test_one_band_is_dp_sgd_bit_for_bit():
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(4)}
  one = correlated.correlated_noise(correlated.Strategy.banded((1.0,)), 1.3,
                                    l2_clip_norm=0.5, expected_batch_size=4)
  dpsgd = noise_lib.gaussian_noise(1.3, l2_clip_norm=0.5,
                                   expected_batch_size=4)
  s1, s2 = one.init(params), dpsgd.init(params)
  for step in range(3):
    key = jax.random.key(step)
    u1, s1 = one.update(params, s1, noise_key=key)
    u2, s2 = dpsgd.update(params, s2, noise_key=key)
    chex.assert_trees_all_equal(u1, u2)


@pytest.mark.parametrize("strategy", [BANDED, BLT], ids=["banded", "blt"])
def test_streamed_noise_is_c_inverse_times_the_fresh_noise(strategy):
  n, sigma, clip = 7, 1.5, 0.5
  tx = correlated.correlated_noise(strategy, sigma, l2_clip_norm=clip,
                                   expected_batch_size=1)
  params = {"a": jnp.zeros(5), "b": jnp.zeros((2, 2))}
  state = tx.init(params)
  keys = [jax.random.fold_in(jax.random.key(3), t) for t in range(n)]
  released, fresh = [], []
  for key in keys:
    out, state = tx.update(params, state, noise_key=key)
    released.append(jnp.concatenate([x.ravel() for x in
                                     jax.tree.leaves(out)]))
    # The fresh noise, drawn from the same key as gaussian_noise draws it.
    z, _ = noise_lib.gaussian_noise(sigma, l2_clip_norm=clip,
                                    expected_batch_size=1).update(
                                        params, noise_lib.gaussian_noise(
                                            sigma, l2_clip_norm=clip,
                                            expected_batch_size=1).init(
                                                params), noise_key=key)
    fresh.append(jnp.concatenate([x.ravel() for x in jax.tree.leaves(z)]))
  want = np.linalg.inv(_matrix(strategy, n)) @ np.stack(fresh)
  got = np.stack(released)
  np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max())
  assert int(state.count) == n


@pytest.mark.parametrize("strategy", [BANDED, BLT], ids=["banded", "blt"])
@pytest.mark.parametrize("pad", [0, 2])
def test_stream_is_jax_privacys_streaming_inverse(strategy, pad):
  """Our array-parameter C^{-1} (padded to a larger shape, as sites with
  different C share one program) equals jax_privacy's StreamingMatrix."""
  n = 9
  shape = correlated.StreamShape.of([strategy])
  shape = correlated.StreamShape(shape.kind, shape.size + pad)
  params = jnp.asarray(shape.params(strategy))
  x = jax.random.normal(jax.random.key(0), (n, 3))
  state = shape.init(x[0])
  ours = []
  for t in range(n):
    out, state = shape.next(params, x[t], state)
    ours.append(out)
  reference = streaming_matrix.multiply_array(strategy.inverse(), x)
  np.testing.assert_allclose(np.stack(ours), reference, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(reference).max()))


def test_noise_covariance_is_the_factorisation():
  """Statistical: Cov of the released noise over steps = sigma^2 C^-1 C^-T."""
  n, trials, sigma = 5, 40_000, 2.0
  tx = correlated.correlated_noise(BANDED, sigma, l2_clip_norm=1.0,
                                   expected_batch_size=1)

  def stream(key):
    state = tx.init(jnp.zeros(()))
    out = []
    for t in range(n):
      noisy, state = tx.update(jnp.zeros(()), state,
                               noise_key=jax.random.fold_in(key, t))
      out.append(noisy)
    return jnp.stack(out)

  samples = np.asarray(jax.jit(jax.vmap(stream))(
      jax.random.split(jax.random.key(0), trials)), np.float64)
  inverse = np.linalg.inv(_matrix(BANDED, n))
  want = sigma ** 2 * inverse @ inverse.T
  got = np.cov(samples, rowvar=False)
  # Standard error of a covariance entry: sqrt((S_ii S_jj + S_ij^2) / T).
  se = np.sqrt((np.outer(np.diag(want), np.diag(want)) + want ** 2) / trials)
  assert np.all(np.abs(got - want) < 5 * se), (got, want)


def test_transform_chains_in_optax_and_keeps_its_stream():
  tx = optax.chain(correlated.correlated_noise(
      BANDED, 1.0, l2_clip_norm=1.0, expected_batch_size=2), optax.sgd(0.1))
  params = jnp.zeros(4)
  state = tx.init(params)
  for step in range(4):
    updates, state = tx.update(jnp.ones(4), state, params,
                               noise_key=jax.random.key(step))
    params = optax.apply_updates(params, updates)
  assert int(state[0].count) == 4
  chex.assert_shape(state[0].stream, (len(BANDED.coefs) - 1, 4))
  with pytest.raises(TypeError, match="noise_key"):
    tx.update(jnp.ones(4), state, params)


def test_cyclic_poisson_sampling_takes_only_the_steps_group():
  groups = sampling.cyclic_groups(jax.random.key(7), 24, jnp.int32(3))
  chex.assert_shape(groups, (24,))
  # A unit's group does not depend on the padding after it.
  np.testing.assert_array_equal(
      groups[:20], sampling.cyclic_groups(jax.random.key(7), 20,
                                          jnp.int32(3)))
  key = jax.random.key(1)
  for phase in range(3):
    idx, mask = sampling.poisson_sample(key, jnp.int32(20), 24,
                                        jnp.float32(1.0), 25,
                                        group=(groups, phase))
    taken = np.asarray(idx)[np.asarray(mask)]
    want = [i for i in range(20) if int(groups[i]) == phase]
    assert sorted(taken.tolist()) == want


def test_cyclic_groups_are_uniform_and_independent():
  """Statistical: each unit's group is uniform over b, independently."""
  keys = jax.random.split(jax.random.key(0), 4000)
  groups = np.asarray(jax.vmap(lambda k: sampling.cyclic_groups(
      k, 2, jnp.int32(4)))(keys))
  pairs = np.bincount(groups[:, 0] * 4 + groups[:, 1], minlength=16)
  expected = len(keys) / 16
  chi2 = float(np.sum((pairs - expected) ** 2 / expected))
  assert chi2 < 37.7  # 15 degrees of freedom, p = 0.001.


UNITS = np.array([48, 72, 96])


def _plan(mechanism, **kwargs):
  args = dict(site_names=("a", "b", "c"), units=UNITS, batch_size=8,
              local_steps=3, rounds=8, delta=1e-5, unit="patient",
              target_epsilon=4.0, mechanism=mechanism, mf_bands=3)
  args.update(kwargs)
  return plan_lib.plan_noise(**args)


def test_banded_plan_is_jax_privacys_amplified_bandmf_event():
  plan = _plan("banded")
  ledger, site_ledger = plan.new_ledgers()
  for r in range(8):
    plan.charge(ledger, site_ledger, r, np.ones(3, bool))
  # Random groups are never truncated: a batch can hold a whole site.
  assert plan.max_batch_size == UNITS.max() + 1
  for k, name in enumerate(plan.site_names):
    # b = 3 groups of N / 3 units on average, each sampled at 8 / (N / 3).
    assert plan.sampling_rates[k] == pytest.approx(8 * 3 / UNITS[k])
    sigma = float(plan.recorded_sigma[0, k])
    event = jp_accounting.amplified_bandmf_event(
        sigma, 8 * 3, num_bands=3, sampling_prob=plan.sampling_rates[k])
    reference = accounting.PrivacyLedger([name], delta=1e-5)
    reference.record_event(name, event)
    assert ledger.epsilon(name) == pytest.approx(reference.epsilon(name),
                                                 rel=1e-9)
    assert 0.99 * 4.0 <= ledger.epsilon(name) <= 4.0


@pytest.mark.slow  # Optimizing a BLT takes about 20 s on 2 cores.
def test_blt_plan_composes_to_the_stream_gaussian():
  plan = _plan("blt", blt_max_buffers=2)
  mech = plan.mechanism
  np.testing.assert_array_equal(mech.cycles, UNITS // 8)
  np.testing.assert_array_equal(plan.sampling_rates, 1.0)  # Whole groups.
  ledger, site_ledger = plan.new_ledgers()
  for r in range(8):
    plan.charge(ledger, site_ledger, r, np.ones(3, bool))
  for k, name in enumerate(plan.site_names):
    s2 = mech.strategies[k].sensitivity_squared(24, int(mech.cycles[k]))
    whole = accounting.PrivacyLedger([name], delta=1e-5)
    whole.record_event(name, dp_accounting.GaussianDpEvent(
        plan_lib.f32(plan.base_sigma[k]) / np.sqrt(s2)))
    assert ledger.epsilon(name) == pytest.approx(whole.epsilon(name),
                                                 rel=1e-6)
    assert ledger.epsilon(name) <= 4.0


def test_a_site_too_small_for_the_bands_gets_fewer():
  # Groups must hold the batch: N // B groups at most (1: DP-SGD).
  plan = _plan("banded", units=np.array([12, 40, 96]), mf_bands=4)
  mech = plan.mechanism
  np.testing.assert_array_equal(mech.cycles, [1, 4, 4])
  assert mech.strategies[0].coefs == (1.0,)
  assert len(mech.strategies[1].coefs) == 4
  assert mech.strategies[1] == mech.strategies[2]  # Optimized once.
  chex.assert_shape(mech.stream_params(), (3, 4))
  # The one-band site is DP-SGD at its own rate.
  assert plan.sampling_rates[0] == pytest.approx(8 / 12)
  assert plan.sampling_rates[1] == pytest.approx(8 * 4 / 40)


def test_plan_refuses_a_noise_schedule():
  with pytest.raises(ValueError, match="constant noise"):
    _plan("banded", schedule_shape=lambda r: 1.0 - 0.01 * r)

"""The one-run canary audit: power without noise, soundness under DP, and
canaries that touch only the audited site."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg.privacy import auditing
from fedjax_seg.privacy.accounting import PrivacyLedger

DIM = 20_000  # Parameters: random canary directions are near-orthogonal.
DELTA = 1e-5


def _loss(params, example):
  return (example["x"] @ params["w"] - example["y"]) ** 2


def _data(sizes=(16, 12), seed=0):
  rng = np.random.default_rng(seed)
  m = max(sizes)
  x = rng.normal(size=(len(sizes), m, DIM)).astype(np.float32) / np.sqrt(DIM)
  y = rng.normal(size=(len(sizes), m)).astype(np.float32)
  sizes = np.asarray(sizes, np.int32)
  groups = np.broadcast_to(np.arange(m)[None, :, None],
                           (len(sizes), m, 1)).astype(np.int32)
  mask = (np.arange(m)[None, :] < sizes[:, None])[..., None]
  return fed.SiteData({"x": x, "y": y}, sizes, groups, mask, sizes)


@functools.lru_cache(maxsize=None)
def _trainer(audit, steps):
  """One compiled trainer per setting, shared by the seeds."""
  client = fed.ClientConfig(local_steps=steps, expected_batch_size=8,
                            max_batch_size=16, learning_rate=0.1)
  dp = fed.LocalDPConfig(l2_clip_norm=1.0, audit=audit)
  return fed.FederatedTrainer(_loss, client, dp, fed.ServerConfig(),
                              backend="loop")


def _run(audit, sigma, q=1.0, rounds=2, steps=5, seed=0):
  """Trains 2 sites; returns (server state, site states, root key)."""
  data = _data()
  trainer = _trainer(audit, steps)
  server, sites = trainer.init({"w": jnp.zeros(DIM)}, 2)
  config = fed.SiteConfig(jnp.full([2], q, jnp.float32),
                          jnp.full([2], sigma, jnp.float32))
  root = jax.random.key(seed)
  for r in range(rounds):
    server, sites, _ = trainer.run_round(server, sites, data, config,
                                         np.ones(2, bool), r, root)
  return server, sites, root


def _audit(audit, sites, root):
  observed = np.asarray(sites.audit.observed[audit.site])
  included = np.asarray(auditing.inclusion(root, audit))
  return auditing.audit_from_scores(
      auditing.scores(root, audit, observed), included, DELTA)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["random", "dirac"])
def test_audit_has_power_without_noise(kind):
  audit = auditing.AuditConfig(num_canaries=1000, kind=kind, site=1)
  _, sites, root = _run(audit, sigma=0.0)
  result = _audit(audit, sites, root)
  assert result.epsilon_lower_bound > 3, result
  assert result.correct_guesses == result.guesses > 300
  # Only the audited site holds an observation and canary counts.
  assert not np.any(np.asarray(sites.audit.observed[0]))
  assert int(sites.audit.sampled[0]) == 0
  assert int(sites.audit.sampled[1]) == 2 * 5 * result.num_included


@pytest.mark.slow
def test_audit_is_sound_under_dp():
  """At sigma 4 (q = 1, 10 steps) the ledger claims epsilon 3.62 per
  example; no seed's 95% lower bound may exceed it, and every seed's audit
  still sees the canaries (bound > 0)."""
  ledger = PrivacyLedger(["a"], delta=DELTA)
  ledger.record("a", noise_multiplier=4.0, sampling_rate=1.0, steps=10)
  claimed = ledger.epsilon("a")
  assert claimed == pytest.approx(3.617, abs=1e-3)
  audit = auditing.AuditConfig(num_canaries=1000, site=0)
  bounds = []
  for seed in range(3):
    _, sites, root = _run(audit, sigma=4.0, seed=seed)
    bounds.append(_audit(audit, sites, root).epsilon_lower_bound)
  assert max(bounds) <= claimed, (bounds, claimed)
  assert min(bounds) > 0, bounds


@pytest.mark.slow
def test_canaries_change_only_the_audited_site():
  """Round 0 from the same model: the other site's update is identical with
  and without the audit; the audited site's is not."""
  audit = auditing.AuditConfig(num_canaries=50, site=1)
  data = _data()
  client = fed.ClientConfig(local_steps=2, expected_batch_size=8,
                            max_batch_size=16, learning_rate=0.1)
  config = fed.SiteConfig(jnp.full([2], 0.5, jnp.float32),
                          jnp.full([2], 1.0, jnp.float32))
  outs = {}
  for name, a in (("plain", None), ("audited", audit)):
    update = jax.jit(fed.make_client_update(_loss, client, fed.LocalDPConfig(
        l2_clip_norm=1.0, audit=a)))
    state = fed.init_site_state({"w": jnp.zeros(DIM)},
                                fed.LocalDPConfig(audit=a))
    take = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
    outs[name] = [update({"w": jnp.zeros(DIM)}, state, take(data, k),
                         take(config, k), jnp.int32(0), jnp.int32(k),
                         jax.random.key(0)).delta for k in range(2)]
  chex.assert_trees_all_equal(outs["plain"][0], outs["audited"][0])
  assert not np.allclose(outs["plain"][1]["w"], outs["audited"][1]["w"])


def test_canary_capacity_and_cut_are_counted():
  assert auditing.canary_capacity(1000, 0.02) < 40
  assert 500 < auditing.canary_capacity(1000, 1.0) < 650  # Binomial(m, q/2).
  audit = auditing.AuditConfig(num_canaries=200, site=0, max_per_step=5)
  _, sites, _ = _run(audit, sigma=0.0, rounds=1, steps=2)
  assert int(sites.audit.sampled[0]) == 2 * 5
  assert int(sites.audit.cut[0]) > 0


def test_audit_statistics_on_known_scores():
  rng = np.random.default_rng(0)
  included = rng.random(1000) < 0.5
  separated = auditing.audit_from_scores(
      rng.normal(size=1000) + 100 * included, included, DELTA)
  assert 4 < separated.epsilon_lower_bound < 5  # m = 1000 cannot say more.
  assert separated.guesses == separated.correct_guesses == included.sum()
  null = auditing.audit_from_scores(rng.normal(size=1000), included, DELTA)
  assert null.epsilon_lower_bound == 0.0
  with pytest.raises(ValueError, match="both included and excluded"):
    auditing.audit_from_scores(np.zeros(4), np.ones(4, bool), DELTA)

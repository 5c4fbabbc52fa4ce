"""Tests for fedjax_seg.federated rounds: backends, FedAvg, padding, keys."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg.federated import sampling
from fedjax_seg.privacy import keys
from tests.federated import toy

DATA = toy.site_data()
CFG = toy.site_config(DATA)
PART = np.array([True, True, False, True])


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["example", "patient"])
def test_backends_agree(unit):
  data = toy.site_data(patients=unit == "patient")
  cfg = toy.site_config(data)
  results = {}
  for backend in ("loop", "vmap", "map"):
    tr = toy.trainer(backend, local_dp=fed.LocalDPConfig(unit=unit,
                                                         l2_clip_norm=1.0))
    results[backend] = toy.run(tr, data, cfg, participating=PART)
  ref_server, ref_sites, ref_out = results["loop"]
  for backend in ("vmap", "map"):
    server, sites, out = results[backend]
    chex.assert_trees_all_close(server.params, ref_server.params, rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(out[-1].client, ref_out[-1].client,
                                rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_shard_backend_on_8_cpu_devices_matches_loop():
  """In a subprocess: the device count must be set before jax starts."""
  code = """
import numpy as np, jax, chex
from tests.federated import toy
assert jax.device_count() == 8
for sizes in [(12, 8, 5, 10, 7, 9), (4,) * 8]:  # 6 sites: padded to 8.
  data = toy.site_data(sizes)
  cfg = toy.site_config(data)
  part = np.arange(len(sizes)) % 3 != 1
  a = toy.run(toy.trainer("shard"), data, cfg, participating=part)
  b = toy.run(toy.trainer("loop"), data, cfg, participating=part)
  chex.assert_trees_all_close(a[0].params, b[0].params, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(a[2][-1].client, b[2][-1].client, rtol=1e-5,
                              atol=1e-5)
print("shard ok")
"""
  result = toy.run_on_8_cpu_devices(code)
  assert result.returncode == 0 and "shard ok" in result.stdout, (
      result.stderr[-3000:])


@pytest.mark.slow
def test_member_rounds_equal_each_member_alone():
  toy.member_rounds_match_alone()


@pytest.mark.slow
def test_member_rounds_sharded_on_8_cpu_devices_equal_each_member_alone():
  """9 members over 8 devices: padded to 16, two members per device."""
  code = """
import jax
from tests.federated import toy
assert jax.device_count() == 8
toy.member_rounds_match_alone(shard=True, num_members=9, rounds=1)
print("members ok")
"""
  result = toy.run_on_8_cpu_devices(code)
  assert result.returncode == 0 and "members ok" in result.stdout, (
      result.stderr[-3000:])


def _epoch_stream(root, k, num_units, capacity):
  """Site k's round-0 epoch order, written out from its definition."""
  key = keys.derive_key(root, round_index=0, site=int(k), step=0,
                        purpose=keys.Purpose.LOCAL_EPOCH_ORDER)
  def order(epoch):
    epoch_key = jax.random.fold_in(key, epoch)
    u = np.array([float(jax.random.uniform(jax.random.fold_in(epoch_key, i)))
                  for i in range(capacity)])
    return np.argsort(np.where(np.arange(capacity) < num_units, u, 2.0),
                      kind="stable")[:num_units]
  return np.concatenate([order(0), order(1), order(2)])


@pytest.mark.parametrize("batch_sampling", ["auto", "poisson"])
def test_no_privacy_round_equals_fedavg_by_hand(batch_sampling):
  """Without DP: plain batched SGD on fixed-size shuffled batches (auto), or
  on Poisson batches when asked, then a size-weighted FedAvg."""
  client = fed.ClientConfig(local_steps=2, expected_batch_size=4,
                            max_batch_size=12, learning_rate=0.05,
                            batch_sampling=batch_sampling)
  tr = toy.trainer("vmap", dp=False, client=client)
  server, _, _ = toy.run(tr, DATA, CFG, rounds=1, participating=PART)
  root = jax.random.key(0)
  params0 = toy.init_params()
  deltas, weights = [], []
  capacity = DATA.examples["x"].shape[1]
  for k in np.flatnonzero(PART):
    p = params0
    stream = _epoch_stream(root, k, DATA.num_examples[k], capacity)
    for t in range(2):
      if batch_sampling == "auto":
        idx = stream[t * 4:(t + 1) * 4]
      else:
        key = keys.derive_key(root, round_index=0, site=int(k), step=t,
                              purpose=keys.Purpose.SAMPLE_BATCH)
        idx, mask = sampling.poisson_sample(
            key, DATA.num_examples[k], capacity, CFG.sampling_rate[k], 12)
        idx = np.asarray(idx)[np.asarray(mask)]
      ex = {"x": DATA.examples["x"][k, idx], "y": DATA.examples["y"][k, idx]}
      grad = jax.grad(lambda q: jnp.mean(jax.vmap(
          lambda e: toy.loss_fn(q, e))(ex)))(p)
      p = jax.tree.map(lambda a, g: a - 0.05 * g, p, grad)
    deltas.append(jax.tree.map(lambda a, b: a - b, p, params0))
    weights.append(float(DATA.num_examples[k]))
  w = np.array(weights) / sum(weights)
  expected = jax.tree.map(lambda p0, *d: p0 + sum(wi * di for wi, di in
                                                  zip(w, d)),
                          params0, *deltas)
  chex.assert_trees_all_close(server.params, expected, rtol=1e-5, atol=1e-6)


def test_dummy_sites_and_padded_examples_change_nothing():
  ref = toy.run(toy.trainer("vmap"), DATA, CFG, participating=PART)
  # A padded dummy site that never participates, full of garbage.
  bigger = toy.site_data((12, 8, 5, 10, 3), seed=0)
  bigger = jax.tree.map(lambda a, b: np.concatenate([a, b[4:5]]), DATA,
                        bigger)
  cfg = toy.site_config(bigger)
  out = toy.run(toy.trainer("vmap"), bigger, cfg,
                participating=np.append(PART, False))
  chex.assert_trees_all_close(out[0].params, ref[0].params, rtol=1e-6)
  # The same sites padded to a larger capacity (garbage in the padding).
  padded = toy.site_data(capacity=20)
  padded = padded._replace(examples=jax.tree.map(
      lambda p, d: np.concatenate([d, p[:, 12:]], axis=1), padded.examples,
      DATA.examples))
  out = toy.run(toy.trainer("vmap"), padded, CFG, participating=PART)
  chex.assert_trees_all_close(out[0].params, ref[0].params, rtol=1e-6)


@pytest.mark.slow
def test_deterministic_given_the_seed_and_seed_dependent():
  a = toy.run(toy.trainer("vmap"), DATA, CFG, seed=5)
  b = toy.run(toy.trainer("vmap"), DATA, CFG, seed=5)
  c = toy.run(toy.trainer("vmap"), DATA, CFG, seed=6)
  chex.assert_trees_all_equal(a[0].params, b[0].params)
  assert not np.allclose(a[0].params["w"], c[0].params["w"])


def test_identical_sites_draw_different_noise():
  same = toy.site_data((8, 8))
  same = jax.tree.map(lambda a: np.stack([a[0], a[0]]), same)
  tr = toy.trainer("loop", steps=1)
  server_state, site_states = tr.init(toy.init_params(), 2)
  out = tr._jit_client(server_state.params,
                       jax.tree.map(lambda x: x[0], site_states),
                       jax.tree.map(lambda x: x[0], same),
                       jax.tree.map(lambda x: x[0], toy.site_config(same)),
                       jnp.int32(0), jnp.int32(0), jax.random.key(0))
  out1 = tr._jit_client(server_state.params,
                        jax.tree.map(lambda x: x[1], site_states),
                        jax.tree.map(lambda x: x[1], same),
                        jax.tree.map(lambda x: x[1], toy.site_config(same)),
                        jnp.int32(0), jnp.int32(1), jax.random.key(0))
  assert not np.allclose(out.delta["w"], out1.delta["w"])


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_a_cohort_round_is_those_sites_of_the_full_round(backend):
  # Sites 0 and 2 of 4 take part. A round over just their data, given their
  # consortium ids, is the same round: same keys, deltas and server update.
  take = lambda tree, ids: jax.tree.map(lambda x: x[np.asarray(ids)], tree)
  tr = toy.trainer(backend, steps=2)
  server, sites = tr.init(toy.init_params(), 4)
  full = tr.run_round(server, sites, DATA, CFG,
                      np.array([True, False, True, False]), 0,
                      jax.random.key(0))
  cohort = lambda ids: tr.run_round(
      server, take(sites, [0, 2]), take(DATA, [0, 2]), take(CFG, [0, 2]),
      np.ones(2, bool), 0, jax.random.key(0), site_ids=ids)
  mine = cohort([0, 2])
  chex.assert_trees_all_close(mine[0].params, full[0].params, rtol=1e-5,
                              atol=1e-6)
  chex.assert_trees_all_close(mine[1], take(full[1], [0, 2]), rtol=1e-5,
                              atol=1e-6)
  chex.assert_trees_all_close(mine[2].client, take(full[2].client, [0, 2]),
                              rtol=1e-5, atol=1e-5)
  # Positions in the cohort are not ids: site 2 at position 1 would reuse
  # site 1's keys.
  assert not np.allclose(cohort(None)[0].params["w"], full[0].params["w"])
  with pytest.raises(ValueError, match="distinct"):
    cohort([2, 2])


@pytest.mark.parametrize("backend", ["loop", "vmap", "map"])
def test_exactly_one_compilation_across_rounds(backend):
  tr = toy.trainer(backend)
  server_state, site_states = tr.init(toy.init_params(), 4)
  counts = []
  for r in range(4):
    part = np.array([r % 2 == 0, True, r < 2, True])
    server_state, site_states, _ = tr.run_round(
        server_state, site_states, DATA, CFG, part, r, jax.random.key(0))
    counts.append(tr.compilations())
  assert counts == [counts[0]] * 4, counts
  assert counts[0] == (2 if backend == "loop" else 1)


@pytest.mark.slow
def test_fedprox_zero_is_fedavg_and_positive_mu_pulls_to_global():
  base = dict(local_steps=5, expected_batch_size=4, max_batch_size=12,
              learning_rate=0.1)
  avg = toy.run(toy.trainer("vmap", client=fed.ClientConfig(**base)), DATA,
                CFG, rounds=1)
  prox0 = toy.run(toy.trainer("vmap", client=fed.ClientConfig(
      **base, prox_mu=0.0)), DATA, CFG, rounds=1)
  prox = toy.run(toy.trainer("vmap", client=fed.ClientConfig(
      **base, prox_mu=5.0)), DATA, CFG, rounds=1)
  chex.assert_trees_all_equal(avg[0].params, prox0[0].params)
  assert float(jnp.linalg.norm(prox[0].params["w"])) < float(
      jnp.linalg.norm(avg[0].params["w"]))


def test_fedbn_keeps_normalisation_params_at_each_site():
  mask = {"w": False, "b": False, "norm": {"scale": True}}
  tr = toy.trainer("vmap", norm_mask=mask)
  server, sites, _ = toy.run(tr, DATA, CFG, participating=PART)
  assert float(server.params["norm"]["scale"]) == 1.0  # Never aggregated.
  local = np.asarray(sites.local_params["norm"]["scale"])
  assert local[2] == 1.0  # Site 2 never trained.
  assert len(set(np.round(local[[0, 1, 3]], 6))) == 3  # Each its own.
  assert not np.allclose(server.params["w"], 0.0)


def test_reported_sigma_c_and_q_are_what_was_applied():
  cfg = CFG._replace(noise_multiplier=jnp.array([0.5, 0.7, 0.9, 1.1]))
  _, _, outs = toy.run(toy.trainer("vmap"), DATA, cfg, participating=PART)
  m = outs[-1].client
  np.testing.assert_allclose(m.noise_multiplier, [0.5, 0.7, 0.0, 1.1])
  np.testing.assert_allclose(m.l2_clip_norm, [1.0, 1.0, 0.0, 1.0])
  np.testing.assert_allclose(m.sampling_rate,
                             np.where(PART, cfg.sampling_rate, 0.0))
  np.testing.assert_array_equal(m.steps, [3, 3, 0, 3])


def test_adaptive_clipping_per_site_persists_across_rounds():
  from fedjax_seg import privacy  # pylint: disable=g-import-not-at-top
  ac = privacy.AdaptiveClipping(initial_l2_clip_norm=0.01,
                                target_quantile=0.5,
                                count_noise_multiplier=1.0,
                                expected_batch_size=4)
  tr = toy.trainer("vmap", local_dp=fed.LocalDPConfig(adaptive_clipping=ac))
  _, sites, outs = toy.run(tr, DATA, CFG, rounds=3)
  assert (np.asarray(sites.clip.l2_clip_norm) > 0.01).all()
  assert (np.asarray(sites.clip.count) == 9).all()
  assert (np.asarray(outs[-1].client.l2_clip_norm) > 0.01).all()


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["fedavgm", "fedadam", "fedyogi"])
def test_server_optimizers_train(optimizer):
  server = fed.ServerConfig(optimizer=optimizer, learning_rate=0.1)
  tr = toy.trainer("vmap", dp=False, server=server)
  result, _, _ = toy.run(tr, DATA, CFG, rounds=5)
  plain, _, _ = toy.run(toy.trainer("vmap", dp=False), DATA, CFG, rounds=5)
  assert not np.allclose(result.params["w"], plain.params["w"])
  assert float(jnp.linalg.norm(result.params["w"])) > 0.05


@pytest.mark.slow
def test_site_level_dp_noise_and_clipping():
  site_dp = fed.SiteLevelDPConfig(l2_clip_norm=0.01, noise_multiplier=2.0,
                                  expected_sites=2.0)
  tr = toy.trainer("vmap", dp=False, site_dp=site_dp)
  server, _, outs = toy.run(tr, DATA, CFG, rounds=1,
                            participating=np.array([True, True, False,
                                                    False]))
  assert float(outs[0].server.noise_multiplier) == 2.0
  assert int(outs[0].server.num_participants) == 2
  assert int(outs[0].server.num_clipped) == 2
  # Noise only (zero clip contribution): std of the update is z S / (q K).
  zero_sites = fed.SiteLevelDPConfig(l2_clip_norm=1.0, noise_multiplier=3.0,
                                     expected_sites=4.0)
  from fedjax_seg.federated import server as server_lib  # pylint: disable=g-import-not-at-top
  params = {"w": jnp.zeros(20000)}
  state = server_lib.init_server_state(params, fed.ServerConfig(), zero_sites)
  new, _ = server_lib.server_update(
      state, {"w": jnp.zeros((3, 20000))}, jnp.array([True, False, True]),
      jnp.array([1, 1, 1]), fed.ServerConfig(), zero_sites, jnp.int32(0),
      jax.random.key(0))
  assert float(jnp.std(new.params["w"])) == pytest.approx(3.0 / 4.0, rel=0.03)
  # A huge delta from one site moves the sum by at most S (before noise).
  quiet = dataclasses.replace(zero_sites, noise_multiplier=0.0)
  new, _ = server_lib.server_update(
      state, {"w": jnp.full((3, 20000), 1e3)}, jnp.array([True, False, True]),
      jnp.array([1, 1, 1]), fed.ServerConfig(), quiet, jnp.int32(0),
      jax.random.key(0))
  assert float(jnp.linalg.norm(new.params["w"])) == pytest.approx(2.0 / 4.0,
                                                                   rel=1e-5)


def test_a_site_that_does_not_participate_takes_no_step():
  part = np.ones(4, bool)
  part[2] = False
  _, _, outs = toy.run(toy.trainer("vmap"), DATA, CFG, participating=part)
  assert int(outs[-1].client.steps[2]) == 0


@pytest.mark.slow
def test_scan_and_unrolled_local_steps_agree():
  results = []
  for loop in ("scan", "unroll"):
    client = fed.ClientConfig(local_steps=3, expected_batch_size=4,
                              max_batch_size=12, learning_rate=0.05,
                              local_loop=loop)
    results.append(toy.run(toy.trainer("vmap", client=client), DATA, CFG,
                           participating=PART))
  chex.assert_trees_all_close(results[0][0].params, results[1][0].params,
                              rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_close(results[0][2][-1].client,
                              results[1][2][-1].client, rtol=1e-6)

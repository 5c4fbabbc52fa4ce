"""Tests for fedjax_seg.federated.client: work that follows the sample.

The sample-following paths (`ClientConfig.chunk_size` set) must compute the
same rounds as the full-capacity path (`chunk_size=None`), report the same
privacy figures, and compile once.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg import privacy
from fedjax_seg.federated import client as client_lib
from fedjax_seg.federated import gradients
from fedjax_seg.federated import sampling
from fedjax_seg.federated import server as server_lib
from fedjax_seg.privacy import keys
from tests.federated import toy
from tests import numerics

PART = np.array([True, True, False, True])
BASE = fed.ClientConfig(local_steps=2, expected_batch_size=4,
                        max_batch_size=12, learning_rate=0.05)


def _data(unit):
  data = toy.site_data(patients="ragged" if unit == "patient" else False)
  return data, toy.site_config(data, batch=3 if unit == "patient" else 4)


def _assert_same_round(a, b):
  chex.assert_trees_all_close(a[0].params, b[0].params, rtol=1e-5,
                              atol=1e-6)
  for out_a, out_b in zip(a[2], b[2]):
    ma, mb = out_a.client, out_b.client
    np.testing.assert_allclose(ma.loss_sum, mb.loss_sum, rtol=1e-5)
    for field in ("num_real", "num_clipped", "steps"):
      np.testing.assert_array_equal(getattr(ma, field), getattr(mb, field))
    # What the accountant reads: exactly the same figures.
    for field in ("noise_multiplier", "l2_clip_norm", "sampling_rate"):
      np.testing.assert_array_equal(getattr(ma, field), getattr(mb, field))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["loop", "vmap"])
@pytest.mark.parametrize("unit", ["example", "patient"])
def test_sample_following_round_equals_full_capacity_round(unit, backend):
  data, cfg = _data(unit)
  cfg = cfg._replace(noise_multiplier=jnp.array([0.5, 0.7, 0.9, 1.1]))
  local_dp = fed.LocalDPConfig(unit=unit, l2_clip_norm=0.5)
  runs = {}
  for chunk in (None, 4, 5):
    client = dataclasses.replace(BASE, chunk_size=chunk)
    tr = toy.trainer(backend, client=client, local_dp=local_dp)
    runs[chunk] = toy.run(tr, data, cfg, rounds=2, participating=PART)
  for chunk in (4, 5):
    _assert_same_round(runs[chunk], runs[None])
  m = runs[4][2][-1].client
  np.testing.assert_allclose(m.noise_multiplier, [0.5, 0.7, 0.0, 1.1])
  np.testing.assert_allclose(m.sampling_rate,
                             np.where(PART, cfg.sampling_rate, 0.0))
  np.testing.assert_array_equal(m.steps, [2, 2, 0, 2])
  assert int(m.num_clipped.sum()) > 0  # Clipping was exercised.


@pytest.mark.slow
@pytest.mark.parametrize("unit", ["example", "patient"])
def test_sample_following_without_dp_and_with_adaptive_clipping(unit):
  data, cfg = _data(unit)
  ac = privacy.AdaptiveClipping(initial_l2_clip_norm=0.05,
                                target_quantile=0.5,
                                count_noise_multiplier=1.0,
                                expected_batch_size=4)
  for local_dp in (fed.LocalDPConfig(enabled=False, unit=unit),
                   fed.LocalDPConfig(unit=unit, adaptive_clipping=ac)):
    runs = [toy.run(toy.trainer("loop", local_dp=local_dp,
                                client=dataclasses.replace(
                                    BASE, chunk_size=chunk)),
                    data, cfg, rounds=2)
            for chunk in (None, 3)]
    _assert_same_round(runs[1], runs[0])
    chex.assert_trees_all_close(runs[1][1].clip, runs[0][1].clip, rtol=1e-5)


def _toy_batch(unit, chunk_size, seed=0):
  data, cfg = _data(unit)
  take = lambda t: jax.tree.map(lambda x: jnp.asarray(x)[0], t)
  client = dataclasses.replace(BASE, chunk_size=chunk_size)
  dp = fed.LocalDPConfig(unit=unit)
  batch = gradients.sample_batch(take(data), take(cfg).sampling_rate,
                                  jax.random.key(seed), client, dp)
  # Plant NaN in every padding slot: it must reach neither loss nor gradient.
  real = batch.mask if batch.slice_mask is None else batch.slice_mask
  poison = lambda x: jnp.where(
      real.reshape(real.shape + (1,) * (x.ndim - real.ndim)), x, jnp.nan)
  return batch._replace(examples=jax.tree.map(poison, batch.examples)), client


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("unit", ["example", "patient"])
def test_nonprivate_gradient_is_the_mean_unit_gradient(unit, chunk_size):
  """One masked batched gradient == the mean of per-unit gradients."""
  params = {"w": jnp.array([0.3, -0.2, 0.1]), "b": jnp.array(0.2),
            "norm": {"scale": jnp.array(1.0)}}
  batch, client = _toy_batch(unit, chunk_size, seed=3)
  assert 0 < int(batch.mask.sum()) < 12
  grad, stats = jax.jit(lambda p, b: gradients.nonprivate_gradient(
      toy.loss_fn, p, b, client))(params, batch)
  full_batch, _ = _toy_batch(unit, None, seed=3)  # Same draws.
  per_unit = privacy.clipped_grad(
      toy.loss_fn, l2_clip_norm=jnp.inf,
      unit="group" if unit == "patient" else "example")
  want, want_stats = per_unit(params, full_batch.examples, ~full_batch.mask,
                              slice_mask=full_batch.slice_mask)
  n = int(want_stats.num_real)
  numerics.assert_trees_close(grad, jax.tree.map(lambda g: g / n, want),
                              1e-5)
  assert int(stats.num_real) == n
  np.testing.assert_allclose(stats.loss_sum,
                             jnp.sum(want_stats.per_example_loss), rtol=1e-5)
  assert np.isfinite(np.asarray(grad["w"])).all()  # NaN padding stays out.


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_patient_rounds_compile_once(backend):
  data, cfg = _data("patient")
  tr = toy.trainer(backend, local_dp=fed.LocalDPConfig(unit="patient"))
  server_state, site_states = tr.init(toy.init_params(), 4)
  counts = []
  for r in range(3):
    part = np.array([r % 2 == 0, True, r < 2, True])
    server_state, site_states, _ = tr.run_round(
        server_state, site_states, data, cfg, part, r, jax.random.key(0))
    counts.append(tr.compilations())
  assert counts == [2 if backend == "loop" else 1] * 3, counts


def test_chunk_size_is_validated():
  with pytest.raises(ValueError, match="chunk_size"):
    fed.ClientConfig(chunk_size=0)
  assert fed.ClientConfig().chunk_size == 4
  assert fed.ClientConfig(chunk_size=None).chunk_size is None


# -- Without record-level DP: no per-example work ---------------------------


def _mlp_loss(params, example):
  """A loss whose per-example weight gradient [k, 3, 7] no array of a
  batched gradient has (the data are [k, 3], the activations [k, 7])."""
  hidden = jnp.tanh(example["x"] @ params["w"])
  return (hidden @ params["v"] - example["y"]) ** 2


def _mlp_params():
  return {"w": 0.3 * jnp.ones((toy.DIM, 7)), "v": 0.1 * jnp.ones((7,))}


def _shapes_in(jaxpr):
  """Every variable shape in a jaxpr, its sub-jaxprs included."""
  shapes = []
  for eqn in jaxpr.eqns:
    shapes += [tuple(v.aval.shape) for v in eqn.outvars
               if hasattr(v.aval, "shape")]
    for sub in jax.core.jaxprs_in_params(eqn.params):
      shapes += _shapes_in(sub)
  return shapes


@pytest.mark.parametrize("unit", ["example", "patient"])
def test_without_record_level_dp_a_step_computes_no_per_example_gradient(
    unit):
  data, cfg = _data(unit)
  take = lambda t: jax.tree.map(lambda x: jnp.asarray(x)[0], t)
  shapes = {}
  for enabled in (False, True):
    dp = fed.LocalDPConfig(enabled=enabled, unit=unit, l2_clip_norm=0.5)
    update = client_lib.make_client_update(_mlp_loss, BASE, dp)
    state = client_lib.init_site_state(_mlp_params(), dp)
    jaxpr = jax.make_jaxpr(update)(_mlp_params(), state, take(data),
                                   take(cfg), 0, 0, jax.random.key(0))
    shapes[enabled] = _shapes_in(jaxpr.jaxpr)
  per_example = lambda s: len(s) == 3 and s[0] > 1 and s[1:] == (toy.DIM, 7)
  # The control: DP-SGD materialises per-unit weight gradients ...
  assert any(per_example(s) for s in shapes[True])
  # ... the non-private / site-level step does not.
  assert not any(per_example(s) for s in shapes[False])


@pytest.mark.slow
def test_site_level_round_is_plain_batched_sgd_then_dp_fedavg():
  """Under site-level DP the local steps are plain SGD on fixed-size
  shuffled batches; the round is the server's DP-FedAvg of those deltas."""
  data = toy.site_data()
  cfg = toy.site_config(data)
  site_dp = fed.SiteLevelDPConfig(l2_clip_norm=0.05, noise_multiplier=1.5,
                                  expected_sites=3.0)
  client = dataclasses.replace(BASE, local_steps=3)
  root = jax.random.key(0)
  tr = fed.FederatedTrainer(_mlp_loss, client, fed.LocalDPConfig(enabled=False),
                            fed.ServerConfig(), site_dp, backend="vmap")
  server_state, site_states = tr.init(_mlp_params(), 4)
  got, _, out = tr.run_round(server_state, site_states, data, cfg, PART, 0,
                             root)
  deltas = []
  capacity = data.examples["x"].shape[1]
  for k in range(4):
    p = _mlp_params()
    key = keys.derive_key(root, round_index=0, site=k, step=0,
                          purpose=keys.Purpose.LOCAL_EPOCH_ORDER)
    for t in range(3):
      idx, mask = sampling_shuffled(key, data.num_examples[k], capacity, 4, t)
      ex = jax.tree.map(lambda a: jnp.asarray(a)[k, idx[mask]], data.examples)
      grad = jax.grad(lambda q: jnp.mean(jax.vmap(
          lambda e: _mlp_loss(q, e))(ex)))(p)
      p = jax.tree.map(lambda a, g: a - BASE.learning_rate * g, p, grad)
    deltas.append(jax.tree.map(lambda a, b: a - b, p, _mlp_params()))
  deltas = jax.tree.map(lambda *d: jnp.stack(d), *deltas)
  want, metrics = server_lib.server_update(
      server_state, deltas, jnp.asarray(PART), jnp.asarray(data.num_examples),
      fed.ServerConfig(), site_dp, jnp.int32(0), root)
  chex.assert_trees_all_close(got.params, want.params, rtol=1e-5, atol=1e-6)
  assert int(metrics.num_clipped) > 0  # The site clip was exercised.
  # What the site-level accountant reads is unchanged.
  assert float(out.server.noise_multiplier) == 1.5
  np.testing.assert_array_equal(out.client.steps, np.where(PART, 3, 0))


def sampling_shuffled(key, n, capacity, batch, step):
  idx, mask = sampling.shuffled_batch(key, n, capacity, batch, step)
  return np.asarray(idx), np.asarray(mask)


def test_shuffled_batches_are_refused_with_record_level_dp():
  client = dataclasses.replace(BASE, batch_sampling="shuffle")
  with pytest.raises(ValueError, match="Poisson"):
    client_lib.make_client_update(toy.loss_fn, client, fed.LocalDPConfig())
  with pytest.raises(ValueError, match="batch_sampling"):
    fed.ClientConfig(batch_sampling="random")


def _never_called(*args, **kwargs):
  raise AssertionError("a refused path was built")


def test_per_example_gradient_paths_the_task_or_settings_do_not_allow():
  """The engine's refusals name the setting (`SettingError`), which the
  runner turns into its flag."""
  chunked = dataclasses.replace(BASE, chunk_size=4)
  cases = [
      # A bare loss offers neither layer-wise gradients nor ghost norms.
      (lambda: client_lib.make_client_update(
          toy.loss_fn, dataclasses.replace(chunked, per_example_grads="layers"),
          fed.LocalDPConfig()), "per_example_grads='layers' needs a task"),
      (lambda: client_lib.make_client_update(
          toy.loss_fn, dataclasses.replace(chunked, per_example_grads="ghost"),
          fed.LocalDPConfig()), "per_example_grads='ghost' needs a task"),
      # Ghost norms clip single slices, never a patient's.
      (lambda: client_lib.make_client_update(
          fed.Task(toy.loss_fn, ghost_clipped_grad=lambda mask: _never_called),
          dataclasses.replace(chunked, per_example_grads="ghost"),
          fed.LocalDPConfig(unit="patient")),
       "per_example_grads='ghost' clips single slices"),
      # Both paths work in chunks.
      (lambda: dataclasses.replace(BASE, per_example_grads="layers",
                                   chunk_size=None),
       "per_example_grads='layers' needs chunk_size"),
  ]
  for build, message in cases:
    with pytest.raises(fed.SettingError, match=message) as raised:
      build()
    assert raised.value.setting == "per_example_grads"
    assert str(raised.value).startswith("per_example_grads=")

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
from tests.federated import toy

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
  batch = client_lib.sample_batch(take(data), take(cfg).sampling_rate,
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
  grad, stats = jax.jit(lambda p, b: client_lib.nonprivate_gradient(
      toy.loss_fn, p, b, client))(params, batch)
  full_batch, _ = _toy_batch(unit, None, seed=3)  # Same draws.
  per_unit = privacy.clipped_grad(
      toy.loss_fn, l2_clip_norm=jnp.inf,
      unit="group" if unit == "patient" else "example")
  want, want_stats = per_unit(params, full_batch.examples, ~full_batch.mask,
                              slice_mask=full_batch.slice_mask)
  n = int(want_stats.num_real)
  chex.assert_trees_all_close(grad, jax.tree.map(lambda g: g / n, want),
                              rtol=1e-5, atol=1e-6)
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

"""Tests for fedjax_seg.privacy.clipping: formal guarantees of clipped_grad."""

import chex
import dp_accounting
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.privacy import clipping


def _linear_loss(params, example):
  """Loss whose gradient w.r.t. each leaf is exactly the example's leaf."""
  return sum(jnp.sum(p * x) for p, x in
             zip(jax.tree.leaves(params), jax.tree.leaves(example)))


def _contributions(grad_fn, params, batch, **kwargs):
  """What each unit alone adds to the clipped sum (all others padded): [B,...]."""
  b = jax.tree.leaves(batch)[0].shape[0]
  only = ~jnp.eye(b, dtype=bool)  # Row j pads everything but unit j.

  @jax.jit
  def run(params, batch, kwargs):
    return jax.vmap(lambda pad: grad_fn(params, batch, pad, **kwargs)[0])(only)

  return run(params, batch, kwargs)


def _global_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                            for x in jax.tree.leaves(tree))))


shapes = st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=2),
                  min_size=1, max_size=3)


@settings(max_examples=12)
@given(shapes=shapes, log_scale=st.floats(-3, 3), clip=st.floats(0.01, 10.0),
       seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32",
                                                          "bfloat16"]))
def test_every_example_contribution_is_at_most_clip_norm(
    shapes, log_scale, clip, seed, dtype):
  dtype = jnp.dtype(dtype)
  batch_size = 4
  key = jax.random.key(seed)
  params = [jnp.zeros(s, dtype) for s in shapes]
  batch = [(10.0 ** log_scale * jax.random.normal(
      jax.random.fold_in(key, i), (batch_size, *s))).astype(dtype)
           for i, s in enumerate(shapes)]
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=clip)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 has an 8-bit mantissa.
  contributions = _contributions(grad_fn, params, batch)
  for j in range(batch_size):
    contribution = jax.tree.map(lambda x: x[j], contributions)
    assert _global_norm(contribution) <= clip * (1 + tol)
    chex.assert_trees_all_equal_dtypes(contribution,
                                       [jnp.zeros(s) for s in shapes])
  _, stats = jax.jit(grad_fn)(params, batch)
  true_norms = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float32)),
                                  axis=tuple(range(1, x.ndim)))
                           for x in batch))
  np.testing.assert_allclose(stats.per_example_norms, true_norms, rtol=tol)
  assert int(stats.num_clipped) == int(np.sum(true_norms > clip)) or (
      dtype == jnp.bfloat16)  # bf16 rounding can flip a norm at the boundary.


def test_sum_equals_sum_of_clipped_examples():
  params = {"w": jnp.zeros(3), "b": jnp.zeros(())}
  batch = {"w": jnp.array([[3.0, 4.0, 0.0], [0.1, 0.0, 0.0], [0.0, 0.0, 2.0]]),
           "b": jnp.array([0.0, 0.0, 0.0])}
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=1.0)
  grad, stats = grad_fn(params, batch)
  expected = np.array([0.6, 0.8, 0.0]) + np.array([0.1, 0, 0]) + np.array(
      [0, 0, 1.0])
  np.testing.assert_allclose(grad["w"], expected, rtol=1e-6)
  np.testing.assert_allclose(stats.per_example_norms, [5.0, 0.1, 2.0],
                             rtol=1e-6)
  assert (int(stats.num_clipped), int(stats.num_real),
          int(stats.num_nonfinite)) == (2, 3, 0)


def test_padding_contributes_exactly_zero_even_if_garbage():
  params = jnp.zeros(5)
  real = jax.random.normal(jax.random.key(0), (3, 5))
  garbage = jnp.array([[jnp.nan] * 5, [1e30] * 5, [jnp.inf] * 5])
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=0.7)
  ref, ref_stats = grad_fn(params, real)
  padded, stats = grad_fn(params, jnp.concatenate([real, garbage]),
                          jnp.array([False] * 3 + [True] * 3))
  chex.assert_trees_all_equal(ref, padded)
  assert int(stats.num_real) == 3 and int(stats.num_nonfinite) == 0
  np.testing.assert_array_equal(stats.per_example_norms[3:], 0.0)
  np.testing.assert_array_equal(stats.per_example_norms[:3],
                                ref_stats.per_example_norms)


def test_nonfinite_example_contributes_zero_and_is_counted():
  params = jnp.zeros(4)
  batch = jnp.array([[1.0, 0, 0, 0], [jnp.nan, 5.0, 5.0, 5.0],
                     [0, 0, jnp.inf, 1.0], [0, 0.5, 0, 0]])
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=10.0)
  grad, stats = grad_fn(params, batch)
  # Rows 1 and 2 are dropped whole, not only their non-finite coordinates.
  np.testing.assert_array_equal(grad, [1.0, 0.5, 0.0, 0.0])
  assert int(stats.num_nonfinite) == 2 and int(stats.num_real) == 4
  assert np.isinf(stats.per_example_norms[1]) and np.isinf(
      stats.per_example_norms[2])
  assert int(stats.num_clipped) == 0


def test_microbatched_equals_unchunked():
  key = jax.random.key(3)
  params = {"a": jax.random.normal(key, (6,)), "b": jnp.ones((2, 3))}

  def loss(p, ex):
    return jnp.tanh(ex["x"] @ p["a"]) ** 2 + jnp.sum(p["b"] * ex["y"]) ** 2

  batch = {"x": jax.random.normal(jax.random.fold_in(key, 1), (8, 6)),
           "y": jax.random.normal(jax.random.fold_in(key, 2), (8, 2, 3))}
  padding = jnp.arange(8) >= 6
  full = clipping.clipped_grad(loss, l2_clip_norm=0.5)
  chunked = clipping.clipped_grad(loss, l2_clip_norm=0.5, microbatch_size=2)
  g1, s1 = full(params, batch, padding)
  g2, s2 = chunked(params, batch, padding)
  chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(s1.per_example_norms, s2.per_example_norms,
                             rtol=1e-5)
  with pytest.raises(ValueError, match="multiple of microbatch_size"):
    clipping.clipped_grad(loss, l2_clip_norm=0.5, microbatch_size=3)(
        params, batch)


def test_infinite_clip_gives_plain_gradient_sum():
  key = jax.random.key(0)
  w = jax.random.normal(key, (3,))
  x = jax.random.normal(jax.random.fold_in(key, 1), (5, 3))
  y = jax.random.normal(jax.random.fold_in(key, 2), (5,))
  loss = lambda w, ex: (ex[0] @ w - ex[1]) ** 2
  grad, stats = clipping.clipped_grad(loss, l2_clip_norm=jnp.inf)(w, (x, y))
  plain = jax.grad(lambda w: jnp.sum((x @ w - y) ** 2))(w)
  np.testing.assert_allclose(grad, plain, rtol=1e-5)
  assert int(stats.num_clipped) == 0


@given(clip=st.floats(0.05, 5.0), seed=st.integers(0, 1000))
def test_group_contribution_is_at_most_clip_norm(clip, seed):
  key = jax.random.key(seed)
  groups, slices, dim = 3, 4, 5
  batch = 3.0 * jax.random.normal(key, (groups, slices, dim))
  slice_mask = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.7,
                                    (groups, slices)).at[:, 0].set(True)
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=clip,
                                  unit="group")
  contributions = _contributions(grad_fn, jnp.zeros(dim), batch,
                                 slice_mask=slice_mask)
  for j in range(groups):
    assert _global_norm(contributions[j]) <= clip * (1 + 1e-5)


def test_group_loss_is_mean_over_real_slices_and_masked_slices_are_ignored():
  batch = jnp.array([[[1.0, 0.0], [3.0, 0.0], [99.0, 99.0]],
                     [[0.0, 2.0], [5.0, 5.0], [7.0, 7.0]]])
  mask = jnp.array([[True, True, False], [True, False, False]])
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=jnp.inf,
                                  unit="group")
  grad, stats = grad_fn(jnp.zeros(2), batch, slice_mask=mask)
  np.testing.assert_allclose(grad, [2.0, 0.0] + np.array([0.0, 2.0]))
  np.testing.assert_allclose(stats.per_example_norms, [2.0, 2.0])
  # Changing masked slices changes nothing.
  other = batch.at[0, 2].set(jnp.nan).at[1, 1:].set(-1e9)
  grad2, _ = grad_fn(jnp.zeros(2), other, slice_mask=mask)
  chex.assert_trees_all_equal(grad, grad2)


def test_group_without_real_slice_is_padding():
  batch = jnp.ones((2, 3, 2))
  mask = jnp.array([[True, False, False], [False, False, False]])
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=1.0, unit="group")
  grad, stats = grad_fn(jnp.zeros(2), batch, slice_mask=mask)
  assert int(stats.num_real) == 1
  np.testing.assert_array_equal(stats.is_real, [True, False])
  np.testing.assert_allclose(grad, np.ones(2) / np.sqrt(2), rtol=1e-6)
  with pytest.raises(ValueError, match="slice_mask"):
    grad_fn(jnp.zeros(2), batch)


def test_sensitivity_follows_the_neighbouring_relation():
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=1.5)
  rel = dp_accounting.NeighboringRelation
  assert grad_fn.sensitivity() == 1.5
  assert grad_fn.sensitivity(rel.ADD_OR_REMOVE_ONE) == 1.5
  assert grad_fn.sensitivity(rel.REPLACE_ONE) == 3.0


def test_jit_with_traced_clip_norm_and_vmap_over_sites():
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=1.0)
  key = jax.random.key(1)
  params = jax.random.normal(key, (4, 3))  # 4 sites
  batches = 2.0 * jax.random.normal(jax.random.fold_in(key, 1), (4, 6, 3))
  clips = jnp.array([0.1, 0.5, 1.0, 100.0])

  @jax.jit
  def all_sites(params, batches, clips):
    return jax.vmap(lambda p, b, c: grad_fn(p, b, l2_clip_norm=c))(
        params, batches, clips)

  grads, stats = all_sites(params, batches, clips)
  for s in range(4):
    g, st_ = grad_fn(params[s], batches[s], l2_clip_norm=float(clips[s]))
    np.testing.assert_allclose(grads[s], g, rtol=1e-5, atol=1e-6)
    assert int(stats.num_clipped[s]) == int(st_.num_clipped)


def test_bad_arguments_are_refused():
  with pytest.raises(ValueError, match="unit"):
    clipping.clipped_grad(_linear_loss, l2_clip_norm=1.0, unit="patient")
  with pytest.raises(ValueError, match="l2_clip_norm"):
    clipping.clipped_grad(_linear_loss, l2_clip_norm=0.0)
  grad_fn = clipping.clipped_grad(_linear_loss, l2_clip_norm=1.0)
  with pytest.raises(ValueError, match="is_padding_example"):
    grad_fn(jnp.zeros(2), jnp.ones((3, 2)), jnp.zeros(4, bool))

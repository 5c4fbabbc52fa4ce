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

from fedjax_seg import xla_cpu
from fedjax_seg.privacy import chunked as chunked_lib
from fedjax_seg.privacy import clipping
from tests import numerics


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


@pytest.mark.slow
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
  numerics.assert_trees_close(g1, g2, 1e-5)
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


# -- Work that follows the realised sample -------------------------------------


def _smooth_loss(params, example):
  """A non-linear per-example loss (gradients differ in direction and norm)."""
  return (jnp.tanh(example["x"] @ params["a"]) ** 2
          + jnp.sum(params["b"] * example["y"]) ** 2)


def _smooth_params(key):
  return {"a": jax.random.normal(key, (5,)),
          "b": 0.5 * jnp.ones((2, 3))}


def _padded_batch(key, capacity, n, nan_in_real=None):
  """A batch with n real units first, then padding full of NaN / huge values."""
  batch = {"x": 2.0 * jax.random.normal(jax.random.fold_in(key, 1),
                                        (capacity, 5)),
           "y": jax.random.normal(jax.random.fold_in(key, 2),
                                  (capacity, 2, 3))}
  is_padding = jnp.arange(capacity) >= n
  garbage = jnp.where(jnp.arange(capacity) % 2 == 0, jnp.nan, 1e30)
  batch["x"] = jnp.where(is_padding[:, None], garbage[:, None], batch["x"])
  if nan_in_real is not None:
    batch["y"] = batch["y"].at[nan_in_real, 1, 2].set(jnp.nan)
  return batch, is_padding


def _assert_same_clipping(got, want, rtol=1e-5):
  (g1, s1), (g2, s2) = got, want
  numerics.assert_trees_close(g1, g2, rtol)
  np.testing.assert_allclose(s1.per_example_norms, s2.per_example_norms,
                             rtol=rtol, atol=1e-6)
  np.testing.assert_allclose(s1.per_example_loss, s2.per_example_loss,
                             rtol=rtol, atol=1e-6)
  for field in ("num_clipped", "num_real", "num_nonfinite"):
    assert int(getattr(s1, field)) == int(getattr(s2, field)), field
  np.testing.assert_array_equal(s1.is_real, s2.is_real)


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 4, 5, 9, 11, 12])
@pytest.mark.parametrize("chunk_size", [4, 5])
def test_chunked_equals_full_capacity_for_every_realised_size(n, chunk_size):
  key = jax.random.key(n)
  capacity = 12
  nan_unit = 1 if n >= 2 else None
  batch, is_padding = _padded_batch(key, capacity, n, nan_in_real=nan_unit)
  params = _smooth_params(key)
  full = clipping.clipped_grad(_smooth_loss, l2_clip_norm=0.8)
  chunked = chunked_lib.chunked_clipped_grad(_smooth_loss, l2_clip_norm=0.8,
                                          chunk_size=chunk_size)
  want = full(params, batch, is_padding)
  got = jax.jit(chunked)(params, batch, is_padding)
  _assert_same_clipping(got, want)
  assert np.isfinite(np.asarray(got[0]["a"])).all()
  if nan_unit is not None:  # The NaN unit is dropped whole and counted.
    assert int(got[1].num_nonfinite) == 1
    assert np.isinf(got[1].per_example_norms[nan_unit])
  # A traced clip norm (adaptive clipping) and padding anywhere (not only at
  # the end) give the same result too.
  perm = jax.random.permutation(jax.random.fold_in(key, 9), capacity)
  shuffled = jax.tree.map(lambda x: x[perm], batch)
  got = jax.jit(lambda p, b, pad, c: chunked(p, b, pad, l2_clip_norm=c))(
      params, shuffled, is_padding[perm], jnp.float32(0.8))
  want = full(params, shuffled, is_padding[perm])
  _assert_same_clipping(got, want)


def test_chunked_runs_only_the_chunks_up_to_the_last_real_unit():
  real = jnp.array([True] * 5 + [False] * 11)
  assert int(chunked_lib.chunks_to_run(real, 4)) == 2
  assert int(chunked_lib.chunks_to_run(jnp.zeros(16, bool), 4)) == 0
  assert int(chunked_lib.chunks_to_run(jnp.ones(16, bool), 4)) == 4
  assert int(chunked_lib.chunks_to_run(real.at[13].set(True), 4)) == 4
  # The loss is evaluated on the computed chunks only: count its calls.
  calls = []

  def counting_loss(params, example):
    jax.debug.callback(lambda: calls.append(1))
    return _smooth_loss(params, example)

  key = jax.random.key(0)
  chunked = jax.jit(chunked_lib.chunked_clipped_grad(
      counting_loss, l2_clip_norm=1.0, chunk_size=4))
  counts = []
  for n in (16, 5, 0):
    calls.clear()
    batch, is_padding = _padded_batch(key, 16, n)
    jax.block_until_ready(chunked(_smooth_params(key), batch, is_padding))
    counts.append(len(calls))
  # The callback fires once per computed chunk (vectorised over its units).
  assert counts[0] > 0 and counts == [counts[0], counts[0] // 2, 0], counts


def test_chunked_is_vmappable_over_sites():
  key = jax.random.key(4)
  params = _smooth_params(key)
  sizes = [0, 3, 12]
  batches = [_padded_batch(jax.random.fold_in(key, n), 12, n) for n in sizes]
  batch = jax.tree.map(lambda *x: jnp.stack(x), *[b for b, _ in batches])
  padding = jnp.stack([p for _, p in batches])
  chunked = chunked_lib.chunked_clipped_grad(_smooth_loss, l2_clip_norm=0.5,
                                          chunk_size=4)
  grads, stats = jax.jit(jax.vmap(chunked, in_axes=(None, 0, 0)))(
      params, batch, padding)
  full = clipping.clipped_grad(_smooth_loss, l2_clip_norm=0.5)
  for k in range(len(sizes)):
    take = lambda t, k=k: jax.tree.map(lambda x: x[k], t)
    _assert_same_clipping((take(grads), take(stats)),
                          full(params, take(batch), padding[k]))


def _ragged_groups(key, sizes, max_slices, nan_slice=None):
  """Groups of the given slice counts, as [G, L] (masked) and packed [T]."""
  g = len(sizes)
  x = 2.0 * jax.random.normal(key, (g, max_slices, 5))
  y = jax.random.normal(jax.random.fold_in(key, 1), (g, max_slices, 2, 3))
  slice_mask = np.arange(max_slices)[None, :] < np.asarray(sizes)[:, None]
  # Masked slices hold garbage: NaN and huge values.
  x = jnp.where(jnp.asarray(slice_mask)[..., None], x, jnp.nan)
  y = jnp.where(jnp.asarray(slice_mask)[..., None, None], y, 1e30)
  if nan_slice is not None:
    x = x.at[nan_slice].set(jnp.nan)
  grouped = {"x": x, "y": y}
  # Packed: real slices group after group, then padding (garbage too).
  rows = [(gi, si) for gi in range(g) for si in range(sizes[gi])]
  capacity = g * max_slices
  rows_g = np.array([r[0] for r in rows] + [0] * (capacity - len(rows)),
                    np.int32)
  rows_s = np.array([r[1] for r in rows] + [max_slices - 1] * (
      capacity - len(rows)), np.int32)
  packed = jax.tree.map(lambda a: a[rows_g, rows_s], grouped)
  packed_mask = np.arange(capacity) < len(rows)
  segment_ids = np.where(packed_mask, rows_g, 0).astype(np.int32)
  return grouped, jnp.asarray(slice_mask), packed, segment_ids, packed_mask


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [
    (1, 3, 2, 4, 0, 0),  # Ragged, two empty slots (unsampled patients).
    (0, 0, 0, 0, 0, 0),  # Empty sample.
    (4, 4, 4, 4, 4, 4),  # Full sample, every patient of maximal length.
    (4, 1, 1, 1, 1, 1),
])
@pytest.mark.parametrize("chunk_size", [3, 4])
def test_packed_groups_equal_group_clipping(sizes, chunk_size):
  key = jax.random.key(sum(sizes) + chunk_size)
  params = _smooth_params(key)
  grouped, slice_mask, packed, segment_ids, packed_mask = _ragged_groups(
      key, sizes, 4)
  full = clipping.clipped_grad(_smooth_loss, l2_clip_norm=0.3, unit="group")
  fn = chunked_lib.packed_group_clipped_grad(
      _smooth_loss, l2_clip_norm=0.3, num_groups=len(sizes),
      chunk_size=chunk_size)
  want = full(params, grouped, jnp.zeros(len(sizes), bool),
              slice_mask=slice_mask)
  got = jax.jit(fn)(params, packed, segment_ids, packed_mask)
  _assert_same_clipping(got, want)
  np.testing.assert_array_equal(got[1].is_real, np.asarray(sizes) > 0)
  # The buffer's order and the clip norm given at call time do not matter.
  perm = np.random.default_rng(0).permutation(len(packed_mask))
  got = jax.jit(lambda *a: fn(*a, l2_clip_norm=jnp.float32(0.3)))(
      params, jax.tree.map(lambda a: a[perm], packed), segment_ids[perm],
      packed_mask[perm])
  _assert_same_clipping(got, want)


@pytest.mark.slow
def test_packed_group_with_a_nonfinite_slice_contributes_zero():
  key = jax.random.key(7)
  params = _smooth_params(key)
  sizes = (2, 3, 1, 4)
  grouped, slice_mask, packed, segment_ids, packed_mask = _ragged_groups(
      key, sizes, 4, nan_slice=(1, 2))  # Patient 1's last real slice.
  fn = chunked_lib.packed_group_clipped_grad(
      _smooth_loss, l2_clip_norm=10.0, num_groups=4, chunk_size=2)
  got = jax.jit(fn)(params, packed, segment_ids, packed_mask)
  full = clipping.clipped_grad(_smooth_loss, l2_clip_norm=10.0, unit="group")
  _assert_same_clipping(got, full(params, grouped, slice_mask=slice_mask))
  grad, stats = got
  assert int(stats.num_nonfinite) == 1 and np.isinf(
      stats.per_example_norms[1])
  # Exactly the sum of the other patients (patient 1 contributes nothing).
  others = jnp.array([True, False, True, True])
  want, _ = full(params, grouped, ~others, slice_mask=slice_mask)
  numerics.assert_trees_close(grad, want, 1e-5)


@pytest.mark.slow
@given(clip=st.floats(0.05, 5.0), seed=st.integers(0, 1000))
@settings(max_examples=10, deadline=None)
def test_packed_group_contribution_is_at_most_clip_norm(clip, seed):
  key = jax.random.key(seed)
  sizes = tuple(int(s) for s in jax.random.randint(key, (3,), 1, 5))
  _, _, packed, segment_ids, packed_mask = _ragged_groups(key, sizes, 4)
  fn = chunked_lib.packed_group_clipped_grad(
      _linear_loss, l2_clip_norm=clip, num_groups=3, chunk_size=4)
  params = {"x": jnp.zeros(5), "y": jnp.zeros((2, 3))}
  for j in range(3):  # Only group j's slices are real.
    only = jnp.asarray(packed_mask & (segment_ids == j))
    grad, stats = fn(params, packed, segment_ids, only)
    assert _global_norm(grad) <= clip * (1 + 1e-5)
    assert int(stats.num_real) == 1
  assert fn.sensitivity() == clip


@pytest.mark.slow
def test_chunked_paths_with_and_without_conv_canonicalization_agree():
  key = jax.random.key(2)
  w = 0.5 * jax.random.normal(key, (3, 3, 1, 2))

  def conv_loss(w, example):
    y = jax.lax.conv_general_dilated(
        example["image"][None], w, (1, 1), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean((y[0, ..., 0] - example["label"]) ** 2) + jnp.mean(
        y[..., 1] ** 2)

  batch = {"image": jax.random.normal(jax.random.fold_in(key, 1),
                                      (6, 8, 8, 1)),
           "label": jax.random.normal(jax.random.fold_in(key, 2), (6, 8, 8))}
  padding = jnp.arange(6) >= 4
  want = clipping.clipped_grad(conv_loss, l2_clip_norm=0.1)(w, batch, padding)
  for transform in (xla_cpu.canonicalize_convs, None):
    fn = chunked_lib.chunked_clipped_grad(conv_loss, l2_clip_norm=0.1,
                                       chunk_size=3, chunk_transform=transform)
    _assert_same_clipping(jax.jit(fn)(w, batch, padding), want)
    packed = chunked_lib.packed_group_clipped_grad(
        conv_loss, l2_clip_norm=0.1, num_groups=6, chunk_size=4,
        chunk_transform=transform)
    got = jax.jit(packed)(w, batch, jnp.arange(6, dtype=jnp.int32), ~padding)
    _assert_same_clipping(got, want)


def test_sample_following_arguments_are_checked():
  with pytest.raises(ValueError, match="chunk_size"):
    chunked_lib.chunked_clipped_grad(_linear_loss, l2_clip_norm=1.0,
                                  chunk_size=0)
  with pytest.raises(ValueError, match="num_groups"):
    chunked_lib.packed_group_clipped_grad(_linear_loss, l2_clip_norm=1.0,
                                       num_groups=0, chunk_size=2)
  fn = chunked_lib.packed_group_clipped_grad(_linear_loss, l2_clip_norm=1.0,
                                          num_groups=2, chunk_size=2)
  with pytest.raises(ValueError, match="segment_ids"):
    fn(jnp.zeros(2), jnp.ones((3, 2)), jnp.zeros(4, jnp.int32),
       jnp.ones(3, bool))

"""Clipped gradient sums whose work follows the realised Poisson sample.

A Poisson sample is realised as a fixed-shape padded batch whose sampled
units come first. `chunked_clipped_grad` (per example) and
`packed_group_clipped_grad` (per patient, from a packed slice buffer)
process it in fixed-size chunks inside a `lax.while_loop` that stops after
the last chunk holding a real unit, so their cost follows the realised
sample rather than the padded capacity, with the same results and formal
guarantees as `clipping.clipped_grad` (a `chunk_transform`, e.g.
`fedjax_seg.xla_cpu.canonicalize_convs`, may rewrite their loop body).
"""

from typing import Any, Callable

import dataclasses

import chex
import jax
import jax.numpy as jnp

from fedjax_seg.privacy import clipping
from fedjax_seg.privacy.clipping import ClipStats
from fedjax_seg.privacy.clipping import ClippedGrad

PyTree = chex.ArrayTree


# -- Work that follows the realised sample -------------------------------------
#
# A Poisson sample is realised as a fixed-shape padded batch whose sampled
# units come first. The functions below process such a batch in fixed-size
# chunks inside a `lax.while_loop` that stops after the last chunk holding a
# real unit, so their cost follows the realised sample rather than the padded
# capacity. Chunks after the last real unit hold only padding, which
# contributes exactly zero, so stopping there changes no result: the
# guarantees do not depend on the units' order, only the saving does.


def pad_leading(tree: PyTree, size: int) -> PyTree:
  """Every leaf padded with zeros along axis 0 to `size` rows."""

  def pad(x):
    extra = size - x.shape[0]
    if not extra:
      return x
    return jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])

  return jax.tree.map(pad, tree)


def chunks_to_run(is_real: jax.Array, chunk_size: int) -> jax.Array:
  """[] int32: 1 + the index of the last chunk holding a real unit (0 if none).

  `is_real` is [K * chunk_size] bool. Chunks after that one hold only
  padding; chunks before it run even if empty (they contribute zero).
  """
  per_chunk = jnp.any(is_real.reshape(-1, chunk_size), axis=1)
  num_chunks = per_chunk.shape[0]
  last = num_chunks - 1 - jnp.argmax(per_chunk[::-1])
  return jnp.where(jnp.any(per_chunk), last + 1, 0).astype(jnp.int32)


def chunked_loop(body: Callable[[jax.Array, Any], Any], init: Any,
                 num_chunks: jax.Array) -> Any:
  """`carry = body(i, carry)` for i in [0, num_chunks) in a `lax.while_loop`.

  Under `jax.vmap` (e.g. over sites) the loop runs the largest trip count of
  the batch and masks the rest with selects, so the saving is then only the
  largest realised sample's.
  """

  def step(state):
    i, carry = state
    return i + 1, body(i, carry)

  _, carry = jax.lax.while_loop(lambda s: s[0] < num_chunks, step,
                                (jnp.zeros([], jnp.int32), init))
  return carry


def _chunk(tree: PyTree, index: jax.Array, chunk_size: int) -> PyTree:
  return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(
      x, index * chunk_size, chunk_size), tree)


def _check_chunk_size(chunk_size: int):
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")


@dataclasses.dataclass(frozen=True)
class ChunkedClippedGrad(clipping.ClipNormSensitivity):
  """Callable returned by `chunked_clipped_grad`; see there for the contract.

  Call as `fn(params, batch, is_padding_example=None, *, l2_clip_norm=None)
  -> (clipped_grad_sum, ClipStats)`.
  """

  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  l2_clip_norm: float
  chunk_size: int
  chunk_transform: Callable[[Callable], Callable] | None
  accumulation_dtype: Any
  chunk_clipped_grad: Callable[..., Any] | None = None

  def __call__(
      self,
      params: PyTree,
      batch: PyTree,
      is_padding_example: jax.Array | None = None,
      *,
      l2_clip_norm: float | jax.Array | None = None,
  ) -> tuple[PyTree, ClipStats]:
    clip_norm = jnp.asarray(
        self.l2_clip_norm if l2_clip_norm is None else l2_clip_norm,
        jnp.float32)
    leaves = jax.tree.leaves(batch)
    if not leaves:
      raise ValueError("chunked_clipped_grad: the batch pytree has no arrays.")
    batch_size = leaves[0].shape[0]
    if is_padding_example is None:
      is_padding_example = jnp.zeros((batch_size,), jnp.bool_)
    if is_padding_example.shape != (batch_size,):
      raise ValueError(
          f"chunked_clipped_grad: is_padding_example has shape "
          f"{is_padding_example.shape}, expected ({batch_size},).")
    real = ~is_padding_example.astype(jnp.bool_)
    c = self.chunk_size
    capacity = -(-batch_size // c) * c
    batch = pad_leading(batch, capacity)
    real_padded = jnp.concatenate(
        [real, jnp.zeros((capacity - batch_size,), jnp.bool_)])
    per_chunk = self.chunk_clipped_grad or ClippedGrad(
        self.loss_fn, self.l2_clip_norm, "example", None,
        self.accumulation_dtype)

    def chunk_grad(params, chunk, chunk_real, clip):
      return per_chunk(params, chunk, ~chunk_real, l2_clip_norm=clip)

    if self.chunk_transform is not None:
      chunk_grad = self.chunk_transform(chunk_grad)

    def body(i, carry):
      grad_sum, raw_norms, losses, num_clipped, num_nonfinite = carry
      chunk_real = jax.lax.dynamic_slice_in_dim(real_padded, i * c, c)
      g, stats = chunk_grad(params, _chunk(batch, i, c), chunk_real,
                            clip_norm)
      grad_sum = jax.tree.map(jnp.add, grad_sum, g)
      raw_norms = jax.lax.dynamic_update_slice_in_dim(
          raw_norms, stats.per_example_norms, i * c, 0)
      losses = jax.lax.dynamic_update_slice_in_dim(
          losses, stats.per_example_loss, i * c, 0)
      return (grad_sum, raw_norms, losses, num_clipped + stats.num_clipped,
              num_nonfinite + stats.num_nonfinite)

    zeros = jax.tree.map(
        lambda p: jnp.zeros(p.shape, self.accumulation_dtype), params)
    init = (zeros, jnp.zeros((capacity,), jnp.float32),
            jnp.zeros((capacity,), jnp.float32), jnp.zeros([], jnp.int32),
            jnp.zeros([], jnp.int32))
    grad_sum, norms, losses, num_clipped, num_nonfinite = chunked_loop(
        body, init, chunks_to_run(real_padded, c))
    # Units in chunks that did not run are padding: norm 0, loss 0, as in
    # `clipped_grad`; the per-chunk stats already hold inf for non-finite.
    stats = ClipStats(
        per_example_norms=norms[:batch_size],
        per_example_loss=losses[:batch_size],
        num_clipped=num_clipped,
        num_real=jnp.sum(real).astype(jnp.int32),
        num_nonfinite=num_nonfinite,
        is_real=real,
    )
    return grad_sum, stats


def chunked_clipped_grad(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    l2_clip_norm: float,
    chunk_size: int,
    chunk_transform: Callable[[Callable], Callable] | None = None,
    accumulation_dtype: Any = jnp.float32,
    chunk_clipped_grad: Callable[..., Any] | None = None,
) -> ChunkedClippedGrad:
  """`clipped_grad(unit="example")` whose work follows the real units.

  Same call and result as `clipped_grad(loss_fn, l2_clip_norm=...)`:
  `fn(params, batch, is_padding_example=None, *, l2_clip_norm=None) ->
  (clipped_grad_sum, ClipStats)` with `batch` leaves `[B, ...]`. The batch is
  cut into chunks of `chunk_size` units (the last one padded), and only the
  chunks up to the last one holding a real unit are computed, in a
  `lax.while_loop`. For a Poisson sample realised with its sampled units
  first (`federated.sampling.poisson_sample`), a step of n sampled units
  costs ceil(n / chunk_size) chunks instead of B.

  Formal guarantees (identical to `clipped_grad`, which computes each chunk):
    * Unit of privacy: one example.
    * Every unit's contribution to the sum has L2 norm at most the clip norm
      (up to the rounding of the accumulation dtype): sensitivity C under
      add/remove-one or zero-out, 2C under replace-one (`.sensitivity()`).
    * Padding units contribute exactly 0 whatever their content (inside a
      computed chunk by a select; otherwise their chunk is not computed), and
      so does a unit whose gradient has any non-finite coordinate.
    * The result does not depend on where the padding sits in the batch
      (only the cost does), nor on `chunk_size`, up to summation order.
    * `ClipStats` as `clipped_grad`'s: per-unit private values and exact
      counts, no DP guarantee by themselves.
    * Not covered: the sampling of the batch, and timing. The number of
      chunks computed reveals the realised batch size to whoever can time
      the step; in this simulator every site's step time stays inside the
      simulation.

  Under `jax.vmap` (over sites) the loop runs as many chunks as the site with
  the most sampled units needs, for every site.

  Args:
    loss_fn: per-example loss `(params, example) -> scalar`.
    l2_clip_norm: clip norm C > 0 (overridable per call, may be traced).
    chunk_size: units per chunk (performance only).
    chunk_transform: optional `fn -> fn` applied to the function that one
      chunk's loop iteration computes (performance only: it must give the
      same values), e.g. `fedjax_seg.xla_cpu.canonicalize_convs`, which
      keeps XLA's fast CPU convolutions inside the loop body.
      Performance only.
    accumulation_dtype: dtype of the returned sum.
    chunk_clipped_grad: optional `(params, chunk, is_padding_example, *,
      l2_clip_norm) -> (clipped_sum, ClipStats)` computing each chunk with
      `clipped_grad`'s contract (e.g. `layer_gradients.ghost_clipped_grad`;
      performance only); default `clipped_grad(loss_fn)`.

  Returns:
    A `ChunkedClippedGrad` callable with a `.sensitivity()` method.
  """
  if not isinstance(l2_clip_norm, jax.Array) and not l2_clip_norm > 0:
    raise ValueError(f"l2_clip_norm must be > 0, got {l2_clip_norm}.")
  _check_chunk_size(chunk_size)
  return ChunkedClippedGrad(loss_fn, l2_clip_norm, chunk_size, chunk_transform,
                            accumulation_dtype, chunk_clipped_grad)


@dataclasses.dataclass(frozen=True)
class PackedGroupClippedGrad(clipping.ClipNormSensitivity):
  """Callable returned by `packed_group_clipped_grad`; see there.

  Call as `fn(params, slices, segment_ids, slice_mask, *, l2_clip_norm=None)
  -> (clipped_grad_sum, ClipStats)`.
  """

  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  l2_clip_norm: float
  num_groups: int
  chunk_size: int
  chunk_transform: Callable[[Callable], Callable] | None
  accumulation_dtype: Any
  per_example_value_and_grad: Callable[..., Any] | None = None

  def __call__(
      self,
      params: PyTree,
      slices: PyTree,
      segment_ids: jax.Array,
      slice_mask: jax.Array,
      *,
      l2_clip_norm: float | jax.Array | None = None,
  ) -> tuple[PyTree, ClipStats]:
    clip_norm = jnp.asarray(
        self.l2_clip_norm if l2_clip_norm is None else l2_clip_norm,
        jnp.float32)
    leaves = jax.tree.leaves(slices)
    if not leaves:
      raise ValueError("packed_group_clipped_grad: slices have no arrays.")
    num_slices = leaves[0].shape[0]
    if segment_ids.shape != (num_slices,) or slice_mask.shape != (
        num_slices,):
      raise ValueError(
          f"packed_group_clipped_grad: segment_ids {segment_ids.shape} and "
          f"slice_mask {slice_mask.shape} must both be ({num_slices},).")
    g, c = self.num_groups, self.chunk_size
    capacity = -(-num_slices // c) * c
    extra = capacity - num_slices
    slices = pad_leading(slices, capacity)
    mask = jnp.concatenate([slice_mask.astype(jnp.bool_),
                            jnp.zeros((extra,), jnp.bool_)])
    # Padding slices point at group 0; every use of them is masked.
    seg = jnp.where(mask, jnp.concatenate(
        [segment_ids.astype(jnp.int32), jnp.zeros((extra,), jnp.int32)]), 0)
    group_slices = jax.ops.segment_sum(mask.astype(jnp.float32), seg, g)
    # The group loss is the mean of its real slices' losses (as `_group_loss`),
    # so each slice's gradient enters its group's with weight 1 / n_group.
    weight = jnp.where(mask, 1.0 / jnp.maximum(group_slices[seg], 1.0), 0.0)
    dtype = self.accumulation_dtype
    per_slice = (self.per_example_value_and_grad
                 or jax.vmap(jax.value_and_grad(self.loss_fn), in_axes=(None, 0)))

    def chunk_sums(params, chunk, chunk_mask, chunk_seg, chunk_weight):
      """Per-group sums of one chunk's weighted slice gradients and losses."""
      losses, grads = per_slice(params, chunk)
      finite = jnp.ones(chunk_mask.shape, jnp.bool_)
      for leaf in jax.tree.leaves(grads):
        finite &= jnp.all(jnp.isfinite(leaf.reshape(leaf.shape[0], -1)),
                          axis=1)
      keep = chunk_mask & finite

      def weighted(x):
        shape = (-1,) + (1,) * (x.ndim - 1)
        # A select, not a product: a NaN in a dropped slice cannot leak.
        return jnp.where(keep.reshape(shape),
                         x.astype(dtype) * chunk_weight.reshape(shape), 0.0)

      group_grads = jax.tree.map(
          lambda x: jax.ops.segment_sum(weighted(x), chunk_seg, g), grads)
      bad = jax.ops.segment_sum(
          (chunk_mask & ~finite).astype(jnp.int32), chunk_seg, g)
      loss = jax.ops.segment_sum(
          jnp.where(chunk_mask, losses.astype(jnp.float32) * chunk_weight,
                    0.0), chunk_seg, g)
      return group_grads, bad, loss

    if self.chunk_transform is not None:
      chunk_sums = self.chunk_transform(chunk_sums)

    def body(i, carry):
      group_grads, bad, loss = carry
      part = chunk_sums(params, _chunk(slices, i, c), *_chunk(
          (mask, seg, weight), i, c))
      return jax.tree.map(jnp.add, (group_grads, bad, loss), part)

    init = (jax.tree.map(lambda p: jnp.zeros((g,) + p.shape, dtype), params),
            jnp.zeros((g,), jnp.int32), jnp.zeros((g,), jnp.float32))
    group_grads, bad, loss = chunked_loop(body, init,
                                          chunks_to_run(mask, c))
    # Per-group clipping, exactly as `clipped_grad(unit="group")` clips.
    real = group_slices > 0
    sq = sum(jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(g, -1), axis=1)
             for x in jax.tree.leaves(group_grads))
    raw_norms = jnp.where(bad > 0, jnp.inf, jnp.sqrt(sq))
    stats = clipping.clip_stats(real, raw_norms, loss, clip_norm)
    scale = jnp.nan_to_num(jnp.minimum(1.0, clip_norm / raw_norms), nan=0.0,
                           posinf=0.0)
    keep = real & jnp.isfinite(raw_norms)

    def clip_and_sum(x):
      shape = (-1,) + (1,) * (x.ndim - 1)
      return jnp.sum(jnp.where(keep.reshape(shape),
                               x * scale.reshape(shape).astype(dtype), 0.0),
                     axis=0).astype(dtype)

    return jax.tree.map(clip_and_sum, group_grads), stats


def packed_group_clipped_grad(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    l2_clip_norm: float,
    num_groups: int,
    chunk_size: int,
    chunk_transform: Callable[[Callable], Callable] | None = None,
    accumulation_dtype: Any = jnp.float32,
    per_example_value_and_grad: Callable[..., Any] | None = None,
) -> PackedGroupClippedGrad:
  """Per-group (patient) clipped gradient sum over a packed slice buffer.

  The same sum and statistics as `clipped_grad(loss_fn, unit="group")` on the
  `[G, S, ...]` layout, computed from the groups' slices packed into one
  buffer: `fn(params, slices, segment_ids, slice_mask, *, l2_clip_norm=None)`
  with `slices` leaves `[T, ...]`, `segment_ids` `[T]` int32 in `[0, G)` (the
  group of each slice) and `slice_mask` `[T]` bool (real slices). Per-slice
  loss gradients are computed in chunks of `chunk_size` slices, up to the
  last chunk holding a real slice (`lax.while_loop`), each scaled by
  1 / n_g (n_g: the real slices of its group; the group loss is the mean of
  its slices' losses) and summed per group (`jax.ops.segment_sum` into `[G,
  ...]`) BEFORE clipping; then each group's gradient is clipped to C and the
  groups are summed. With real slices first (`federated.sampling.
  pack_groups`), a step costs ceil(realised slices / chunk_size) chunks.

  Formal guarantees (as `clipped_grad(unit="group")`):
    * Unit of privacy: one group (all its slices, wherever they sit in the
      buffer, in any number of chunks).
    * Every group's contribution to the sum has L2 norm at most C (up to the
      rounding of the accumulation dtype): sensitivity C under add/remove-one
      or zero-out of a group, 2C under replace-one (`.sensitivity()`).
    * Slices with `slice_mask` False contribute exactly 0 whatever their
      content (selects, never products, so a NaN there cannot leak); a group
      with no real slice is padding (`is_real` False).
    * A group any of whose real slices has a non-finite gradient coordinate
      (or whose summed gradient is non-finite) contributes exactly 0 and is
      counted in `num_nonfinite`, its norm reported as +inf.
    * The result does not depend on the buffer order, the capacity T or
      `chunk_size`, up to summation order. T must hold every real slice of
      the batch: no truncation happens here.
    * `ClipStats` are per GROUP ([G]), private, with no DP guarantee by
      themselves.
    * Not covered: the sampling, and timing (the number of chunks computed
      follows the realised number of slices).

  Memory: the per-group gradients `[G, params]` are held until clipping.
  Under `jax.vmap` (over sites) the loop runs as many chunks as the site with
  the most sampled slices needs, for every site.

  Args:
    loss_fn: per-example (per-slice) loss `(params, example) -> scalar`.
    l2_clip_norm: clip norm C > 0 (overridable per call, may be traced).
    num_groups: static G, the groups (e.g. the B_max patient slots).
    chunk_size: slices per chunk (performance only).
    chunk_transform: as in `chunked_clipped_grad` (performance only).
    accumulation_dtype: dtype of the per-group sums and the returned sum.
    per_example_value_and_grad: optional `(params, slices [c, ...]) ->
      (losses [c], grads [c, ...])` with the values of
      `vmap(value_and_grad(loss_fn))` computed another way (e.g.
      `layer_gradients.per_example_value_and_grad`; performance only: every
      rule above is applied to its output unchanged).

  Returns:
    A `PackedGroupClippedGrad` callable with a `.sensitivity()` method.
  """
  if not isinstance(l2_clip_norm, jax.Array) and not l2_clip_norm > 0:
    raise ValueError(f"l2_clip_norm must be > 0, got {l2_clip_norm}.")
  _check_chunk_size(chunk_size)
  if num_groups < 1:
    raise ValueError(f"num_groups must be >= 1, got {num_groups}.")
  return PackedGroupClippedGrad(loss_fn, l2_clip_norm, num_groups, chunk_size,
                                chunk_transform, accumulation_dtype,
                                per_example_value_and_grad)

"""A local step's batch and its gradient, the pieces of a client update.

`sample_batch` realises the step's sample in the layout its gradient needs
(Poisson, padded to a fixed capacity, or shuffled without replacement);
`make_private_gradient` is the per-unit clipped gradient sum over it (every
path gives the same sum: full capacity, chunks that follow the sample,
packed patients, layer-wise per-example gradients, ghost norms);
`nonprivate_gradient` one batched gradient of the masked mean loss. `client`
and `dp` are a client's `ClientConfig` and `LocalDPConfig`.
"""

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp

from fedjax_seg import privacy
from fedjax_seg import xla_cpu
from fedjax_seg.federated import sampling
from fedjax_seg.federated import task as task_lib
from fedjax_seg.privacy import chunked as chunked_lib

PyTree = chex.ArrayTree


class Batch(NamedTuple):
  """One local step's realised sample, in the layout its gradient needs.

  Attributes:
    examples: the sampled units' data, each leaf [B_max, ...]
      (unit="example"), [B_max, L, ...] (unit="patient", chunk_size=None) or
      [B_max * L, ...] (unit="patient", the sampled patients' slices packed,
      see `sampling.pack_groups`).
    mask: [B_max] bool, the sampled units (the batch slots; sampled first).
    slice_mask: None (unit="example"), else the real slices of sampled
      patients: [B_max, L] or, packed, [B_max * L] bool.
    segment_ids: None, or (packed) [B_max * L] int32: each slice's batch slot.
  """

  examples: PyTree
  mask: jax.Array
  slice_mask: jax.Array | None = None
  segment_ids: jax.Array | None = None


def resolve_batch_sampling(client, dp) -> str:
  """`client.batch_sampling` for this DP setting ("poisson" or "shuffle")."""
  if client.batch_sampling == "auto":
    return "poisson" if dp.enabled else "shuffle"
  if client.batch_sampling == "shuffle" and dp.enabled:
    raise ValueError("batch_sampling='shuffle' with record-level DP: its "
                     "accounting assumes Poisson-sampled batches.")
  return client.batch_sampling


def sample_batch(data, sampling_rate: jax.Array, key: jax.Array,
                 client, dp,
                 step: jax.Array | int = 0,
                 group: tuple | None = None) -> Batch:
  """A local step's batch of the site's units as a `Batch`.

  Poisson (`resolve_batch_sampling`): each unit with rate q, B_max slots,
  `key` a fresh `Purpose.SAMPLE_BATCH` key of this step. The draws depend
  only on `key`, N_k, q and B_max, never on the layout: packing the patients'
  slices (chunk_size set) reorders work, it does not change which patients
  are sampled, nor truncate any of their slices.

  `group` = (each unit's group [capacity], phase): only units of group
  `phase` can be sampled (cyclic Poisson sampling for correlated noise;
  `sampling.cyclic_groups`).

  Shuffle: the `step`-th B units of the round's epoch order
  (`sampling.shuffled_batch`), `key` the round's `Purpose.LOCAL_EPOCH_ORDER`
  key (the same for every step); B slots, patients' slices packed.
  """
  gather = lambda positions: jax.tree.map(lambda a: a[positions],
                                          data.examples)
  shuffle = resolve_batch_sampling(client, dp) == "shuffle"
  if dp.unit == "patient":
    if shuffle:
      idx, mask = sampling.shuffled_batch(
          key, data.num_groups, data.groups.shape[0],
          client.expected_batch_size, step)
    else:
      idx, mask = sampling.poisson_sample(
          key, data.num_groups, data.groups.shape[0], sampling_rate,
          client.max_batch_size, group=group)
    if client.chunk_size is None:
      slice_mask = data.group_mask[idx] & mask[:, None]
      return Batch(gather(data.groups[idx]), mask, slice_mask)
    positions, segment_ids, slice_mask = sampling.pack_groups(
        idx, mask, data.groups, data.group_mask)
    return Batch(gather(positions), mask, slice_mask, segment_ids)
  capacity = jax.tree.leaves(data.examples)[0].shape[0]
  if shuffle:
    idx, mask = sampling.shuffled_batch(key, data.num_examples, capacity,
                                        client.expected_batch_size, step)
  else:
    idx, mask = sampling.poisson_sample(key, data.num_examples, capacity,
                                        sampling_rate, client.max_batch_size,
                                        group=group)
  return Batch(gather(idx), mask)


def make_private_gradient(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], client,
    dp, per_example_value_and_grad=None,
    ghost_clipped_grad=None,
) -> Callable[[PyTree, Batch, jax.Array],
              tuple[PyTree, privacy.ClipStats]]:
  """`(params, batch, l2_clip_norm) -> (clipped_grad_sum, ClipStats)`.

  Per-unit (example or patient) clipped gradient sum over a `Batch` from
  `sample_batch` with the same `client` and `dp`: `privacy.clipped_grad` over
  the full capacity (chunk_size=None), else `privacy.chunked_clipped_grad`
  (examples) or `privacy.packed_group_clipped_grad` (patients), which give the
  same sum and ClipStats (per unit, [B_max]) computing only the chunks that
  hold sampled units. With `per_example_value_and_grad` (the layers path,
  `client.per_example_grads="layers"`) the per-slice gradients come from it,
  and an example is a group of one slice: the same sum and ClipStats. With
  `ghost_clipped_grad` (`client.per_example_grads="ghost"`, example unit
  only) each chunk's clipped sum comes from it.
  """
  unit = "group" if dp.unit == "patient" else "example"
  if ghost_clipped_grad is not None and (unit == "group"
                                         or client.chunk_size is None):
    raise task_lib.SettingError(
        "per_example_grads", "per_example_grads='ghost' clips single slices "
        "(unit 'example') in chunks (chunk_size set); a patient's norm needs "
        "cross-slice terms: use 'vmap' or 'layers'.")
  transform = xla_cpu.chunk_transform(client.canonicalize_convs)
  if client.chunk_size is None:
    full = privacy.clipped_grad(loss_fn, l2_clip_norm=dp.l2_clip_norm,
                                unit=unit,
                                microbatch_size=client.microbatch_size)
    return lambda params, batch, clip: full(
        params, batch.examples, ~batch.mask, slice_mask=batch.slice_mask,
        l2_clip_norm=clip)
  if unit == "group" or per_example_value_and_grad is not None:
    packed = privacy.packed_group_clipped_grad(
        loss_fn, l2_clip_norm=dp.l2_clip_norm,
        num_groups=client.max_batch_size, chunk_size=client.chunk_size,
        chunk_transform=transform,
        per_example_value_and_grad=per_example_value_and_grad)
    if unit == "group":
      return lambda params, batch, clip: packed(
          params, batch.examples, batch.segment_ids, batch.slice_mask,
          l2_clip_norm=clip)
    # One slice per unit: slot i is group i, real when sampled.
    return lambda params, batch, clip: packed(
        params, batch.examples,
        jnp.arange(client.max_batch_size, dtype=jnp.int32), batch.mask,
        l2_clip_norm=clip)
  # Single slices; with ghost_clipped_grad each chunk's clipped sum comes
  # from it.
  chunked = privacy.chunked_clipped_grad(
      loss_fn, l2_clip_norm=dp.l2_clip_norm, chunk_size=client.chunk_size,
      chunk_transform=transform, chunk_clipped_grad=ghost_clipped_grad)
  return lambda params, batch, clip: chunked(params, batch.examples,
                                             ~batch.mask, l2_clip_norm=clip)


def zero_frozen(tree: PyTree, trainable_mask) -> PyTree:
  """`tree` with the leaves outside `trainable_mask` replaced by zeros."""
  return jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g),
                      trainable_mask, tree)


def layer_value_and_grad(task: task_lib.Task, trainable_mask):
  """The task's per-layer per-example `(losses, grads)`, with the frozen
  leaves' gradients 0 (as `_frozen_outside` gives them)."""
  fn = task.per_example_value_and_grad
  if fn is None:
    raise task_lib.SettingError(
        "per_example_grads", "per_example_grads='layers' needs a task with "
        "`per_example_value_and_grad` (the segmentation task has one without "
        "augmentation multiplicity, which averages a unit's copies inside its "
        "loss).")
  if trainable_mask is None:
    return fn

  def frozen(params, batch):
    losses, grads = fn(params, batch)
    return losses, zero_frozen(grads, trainable_mask)

  return frozen


def ghost_clipped_grad(task: task_lib.Task, trainable_mask):
  """The task's ghost-norm clipped sum of a chunk of single examples, for
  the trainable leaves (`trainable_mask`, or all when None)."""
  if task.ghost_clipped_grad is None:
    raise task_lib.SettingError(
        "per_example_grads", "per_example_grads='ghost' needs a task with "
        "`ghost_clipped_grad` (the segmentation task has one without "
        "augmentation multiplicity).")
  return task.ghost_clipped_grad(trainable_mask)


class UnitLossStats(NamedTuple):
  """What a non-private step saw (computed from private data, not released).

  Attributes:
    loss_sum: [] summed per-unit loss (a patient's loss: its slices' mean).
    num_real: [] int32, units in the realised batch.
  """

  loss_sum: jax.Array
  num_real: jax.Array


def _slices_and_weights(batch: Batch, max_batch_size: int):
  """(slices [T, ...], real [T], unit weight [T], units in the batch [])."""
  if batch.slice_mask is None:  # One slice per unit.
    weight = jnp.where(batch.mask, 1.0, 0.0)
    return (batch.examples, batch.mask, weight,
            jnp.sum(batch.mask).astype(jnp.int32))
  if batch.segment_ids is None:  # [B_max, L]: flatten the slots' slices.
    per_slot = jnp.sum(batch.slice_mask, axis=1)
    slices = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                          batch.examples)
    real = batch.slice_mask.reshape(-1)
    count = jnp.repeat(per_slot, batch.slice_mask.shape[1])
  else:  # Packed.
    per_slot = jax.ops.segment_sum(batch.slice_mask.astype(jnp.int32),
                                   batch.segment_ids, max_batch_size)
    slices, real = batch.examples, batch.slice_mask
    count = per_slot[batch.segment_ids]
  # A patient's loss is the mean over its real slices (as in DP training).
  weight = jnp.where(real, 1.0 / jnp.maximum(count, 1), 0.0)
  return slices, real, weight, jnp.sum(per_slot > 0).astype(jnp.int32)


def nonprivate_gradient(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
    batch: Batch, client) -> tuple[PyTree, UnitLossStats]:
  """Gradient of the mean unit loss over the realised batch (no DP).

  One masked batched gradient (no per-example work): the gradient of
  sum_s where(real_s, w_s * loss_s, 0) / n over the batch's slices, w_s = 1
  for examples and 1 / (the patient's real slices) for patients, n the units
  in the batch (at least 1). Padding slots are zeroed with a select before the
  loss, so garbage there reaches neither the loss nor the gradient. With
  chunk_size set, a batch with more slots than the expected batch (a Poisson
  batch, packed patients' slices) is computed in chunks up to the last real
  one; a shuffled batch of examples (B slots) is one gradient. Unlike the
  DP path, a real unit with a non-finite gradient is not isolated: it makes
  the step's gradient non-finite.

  Returns:
    (gradient like params, `UnitLossStats`).
  """
  slices, real, weight, num_units = _slices_and_weights(
      batch, batch.mask.shape[0])

  def weighted_loss(params, chunk, chunk_real, chunk_weight):
    def zero_padding(x):
      keep = chunk_real.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(keep, x, jnp.zeros_like(x))

    losses = jax.vmap(loss_fn, in_axes=(None, 0))(
        params, jax.tree.map(zero_padding, chunk))
    per_slice = jnp.where(chunk_real, losses * chunk_weight, 0.0)
    return jnp.sum(per_slice), jnp.sum(jnp.nan_to_num(per_slice))

  grad_fn = jax.grad(weighted_loss, has_aux=True)
  if xla_cpu.resolve_canonicalize(client.canonicalize_convs):
    # So that the step runs at full speed inside `lax.scan` on CPU too.
    grad_fn = xla_cpu.canonicalize_convs(grad_fn)
  c = client.chunk_size
  # Chunks pay only where a padded tail can be skipped: more slots than the
  # expected batch (a Poisson batch, packed patients' slices).
  if c is None or real.shape[0] <= client.expected_batch_size:
    grad, loss_sum = grad_fn(params, slices, real, weight)
  else:
    capacity = -(-real.shape[0] // c) * c
    slices = chunked_lib.pad_leading(slices, capacity)
    real, weight = chunked_lib.pad_leading((real, weight), capacity)

    def body(i, carry):
      part = grad_fn(params, *jax.tree.map(
          lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c),
          (slices, real, weight)))
      return jax.tree.map(jnp.add, carry, part)

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32))
    grad, loss_sum = chunked_lib.chunked_loop(
        body, zeros, chunked_lib.chunks_to_run(real, c))
  count = jnp.maximum(num_units, 1).astype(jnp.float32)
  grad = jax.tree.map(lambda g: g / count.astype(g.dtype), grad)
  return grad, UnitLossStats(loss_sum, num_units)

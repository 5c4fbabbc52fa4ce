"""Per-example and per-group (patient) clipped gradient sums.

Built on `jax_privacy.clipping.clipped_grad`, which vectorises the per-unit
gradients with `jax.vmap` (optionally in sequential microbatches), zeroes
padding units with a `select` (so even a NaN in a padded unit cannot leak), and
knows its sensitivity. On top of it this module adds what a DP-SGD step in a
federated simulator needs:

  * `ClipStats`: per-unit pre-clipping norms and the numbers of clipped, real
    and non-finite units (for logging and for adaptive clipping);
  * patient ("group") clipping, where a batch is `[groups, max_slices, ...]`
    with a slice mask and a patient's whole contribution is clipped at once;
  * a unit whose gradient has any non-finite coordinate contributes exactly
    zero (not just its non-finite coordinates) and is counted;
  * a clip norm that may be given at call time (adaptive clipping);
  * work that follows the realised Poisson sample instead of the padded
    capacity is in `chunked` (the same results and guarantees).
"""

import dataclasses
from typing import Any, Callable, Literal, NamedTuple

import chex
import dp_accounting
import jax
import jax.numpy as jnp
from jax_privacy import clipping as jp_clipping

PyTree = chex.ArrayTree
Unit = Literal["example", "group"]
UNITS = ("example", "group")


class ClipStats(NamedTuple):
  """What one clipped-gradient call saw, per privacy unit (example or group).

  Attributes:
    per_example_norms: [B] float32, L2 norm of each unit's gradient before
      clipping. 0 for padding units, +inf for a unit whose gradient had a
      non-finite coordinate. These are private, per-unit values: aggregate them
      only through a DP mechanism (e.g. `adaptive_clipping`) before they leave
      the site.
    per_example_loss: [B] float32, each unit's loss (0 for padding units).
    num_clipped: [] int32, real units with a finite norm above the clip norm.
    num_real: [] int32, units that are not padding.
    num_nonfinite: [] int32, real units whose gradient was non-finite (these
      contributed zero to the sum).
    is_real: [B] bool, units that are not padding (for group clipping, a group
      with no real slice is padding too).
  """

  per_example_norms: jax.Array
  per_example_loss: jax.Array
  num_clipped: jax.Array
  num_real: jax.Array
  num_nonfinite: jax.Array
  is_real: jax.Array


def _zero_if_nonfinite(grad: PyTree) -> PyTree:
  """Zeroes a whole per-unit gradient when any coordinate is NaN or inf.

  jax_privacy's `nan_safe` only zeroes the offending coordinates; a gradient
  that overflowed somewhere is garbage everywhere, so we drop all of it. This
  runs per unit inside the vmap, before clipping.
  """
  finite = jnp.array(True)
  for leaf in jax.tree.leaves(grad):
    finite &= jnp.all(jnp.isfinite(leaf))
  return jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grad)


def _group_loss(
    example_loss: Callable[[PyTree, PyTree], jax.Array],
) -> Callable[[PyTree, tuple[PyTree, jax.Array]], jax.Array]:
  """Turns a per-example loss into the loss of one group (patient).

  The group loss is the mean of the example losses over the group's real
  slices (masked slices contribute nothing; an all-masked group has loss 0 and
  is treated as padding by the caller).
  """

  def loss(params, group_and_mask):
    group, slice_mask = group_and_mask

    # Zero the masked slices' data first: a NaN there would otherwise reach
    # the gradient through 0 * NaN even though its loss weight is 0.
    def zero_masked(x):
      mask = slice_mask.reshape(slice_mask.shape + (1,) * (x.ndim - 1))
      return jnp.where(mask, x, jnp.zeros_like(x))

    losses = jax.vmap(example_loss, in_axes=(None, 0))(
        params, jax.tree.map(zero_masked, group))
    weights = slice_mask.astype(losses.dtype)
    return jnp.sum(jnp.where(slice_mask, losses, 0.0)) / jnp.maximum(
        jnp.sum(weights), 1.0)

  return loss


class ClipNormSensitivity:
  """The `sensitivity` method shared by the clipped-gradient callables."""

  def sensitivity(
      self,
      neighboring_relation: dp_accounting.NeighboringRelation = (
          dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
      ),
  ) -> float:
    """L2 sensitivity of the clipped sum, in the units of the gradient.

    C under add/remove-one (and zero-out) of a unit, 2C under replace-one.
    When a clip norm is passed at call time, that value takes C's place.
    """
    return jp_clipping.BoundedSensitivityCallable(
        self, self.l2_clip_norm, has_aux=True
    ).sensitivity(neighboring_relation)


@dataclasses.dataclass(frozen=True)
class ClippedGrad(ClipNormSensitivity):
  """Callable returned by `clipped_grad`; see there for the contract.

  Call as `fn(params, batch, is_padding_example=None, *, slice_mask=None,
  l2_clip_norm=None) -> (clipped_grad_sum, ClipStats)`.
  """

  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  l2_clip_norm: float
  unit: Unit
  microbatch_size: int | None
  accumulation_dtype: Any

  def __call__(
      self,
      params: PyTree,
      batch: PyTree,
      is_padding_example: jax.Array | None = None,
      *,
      slice_mask: jax.Array | None = None,
      l2_clip_norm: float | jax.Array | None = None,
  ) -> tuple[PyTree, ClipStats]:
    clip_norm = self.l2_clip_norm if l2_clip_norm is None else l2_clip_norm
    leaves = jax.tree.leaves(batch)
    if not leaves:
      raise ValueError("clipped_grad: the batch pytree has no arrays.")
    batch_size = leaves[0].shape[0]
    if is_padding_example is None:
      is_padding_example = jnp.zeros((batch_size,), dtype=jnp.bool_)
    if is_padding_example.shape != (batch_size,):
      raise ValueError(
          f"clipped_grad: is_padding_example has shape "
          f"{is_padding_example.shape}, expected ({batch_size},) to match the "
          "batch's leading axis."
      )
    if self.microbatch_size is not None and batch_size % self.microbatch_size:
      raise ValueError(
          f"clipped_grad: batch size {batch_size} is not a multiple of "
          f"microbatch_size={self.microbatch_size}; pad the batch."
      )
    is_padding = is_padding_example.astype(jnp.bool_)

    if self.unit == "group":
      if slice_mask is None:
        raise ValueError(
            "clipped_grad(unit='group') needs slice_mask of shape "
            "[groups, max_slices_per_group]."
        )
      if slice_mask.shape[:1] != (batch_size,) or slice_mask.ndim != 2:
        raise ValueError(
            f"clipped_grad: slice_mask has shape {slice_mask.shape}, expected "
            f"({batch_size}, max_slices_per_group)."
        )
      slice_mask = slice_mask.astype(jnp.bool_)
      # A group with no real slice is padding: it must contribute nothing.
      is_padding = is_padding | ~jnp.any(slice_mask, axis=1)
      unit_loss = _group_loss(self.loss_fn)
      data = (batch, slice_mask)
    else:
      if slice_mask is not None:
        raise ValueError("slice_mask is only meaningful with unit='group'.")
      unit_loss = self.loss_fn
      data = batch

    grad_fn = jp_clipping.clipped_grad(
        unit_loss,
        l2_clip_norm=clip_norm,
        batch_argnums=1,
        keep_batch_dim=False,
        return_values=True,
        return_grad_norms=True,
        pre_clipping_transform=_zero_if_nonfinite,
        microbatch_size=self.microbatch_size,
        nan_safe=True,
        dtype=self.accumulation_dtype,
    )
    grad_sum, aux = grad_fn(params, data, is_padding_example=is_padding)

    stats = clip_stats(~is_padding, aux.grad_norms.astype(jnp.float32),
                       aux.values.astype(jnp.float32), clip_norm)
    return grad_sum, stats


def clip_stats(real, raw_norms, losses, clip_norm) -> ClipStats:
  """ClipStats from [B] per-unit pre-clipping norms and losses, `real` [B]
  bool marking the units that are not padding (non-finite: any NaN/inf)."""
  finite = jnp.isfinite(raw_norms)
  norms = jnp.where(real, jnp.where(finite, raw_norms, jnp.inf), 0.0)
  return ClipStats(
      per_example_norms=norms,
      per_example_loss=jnp.nan_to_num(jnp.where(real, losses, 0.0)),
      num_clipped=jnp.sum(real & finite & (raw_norms > clip_norm)).astype(
          jnp.int32),
      num_real=jnp.sum(real).astype(jnp.int32),
      num_nonfinite=jnp.sum(real & ~finite).astype(jnp.int32),
      is_real=real,
  )


def clipped_grad(
    loss_fn: Callable[[PyTree, PyTree], jax.Array],
    *,
    l2_clip_norm: float,
    unit: Unit = "example",
    microbatch_size: int | None = None,
    accumulation_dtype: Any = jnp.float32,
) -> ClippedGrad:
  """Sum of per-unit clipped gradients of `loss_fn`, with statistics.

  `loss_fn(params, example) -> scalar` is the loss of ONE example: every leaf
  of `example` has no batch axis (vectorisation over the batch is done here
  with `jax.vmap`, so the model must not mix examples; no BatchNorm).

  The returned callable takes `(params, batch, is_padding_example=None, *,
  slice_mask=None, l2_clip_norm=None)`:

  * unit="example": every leaf of `batch` is `[B, ...]`; each example's
    gradient is clipped to L2 norm `l2_clip_norm`.
  * unit="group": every leaf of `batch` is `[G, S, ...]` (G groups, e.g.
    patients, of up to S slices) and `slice_mask` is `[G, S]` bool. A group's
    loss is the mean of its real slices' losses, and the group's gradient is
    clipped as one unit.

  `is_padding_example` is `[B]` (or `[G]`) bool; padding units contribute
  exactly zero, whatever their content. It returns `(clipped_grad_sum,
  ClipStats)` where `clipped_grad_sum` has the structure of `params` (dtype
  `accumulation_dtype`, float32 by default so a bf16 model does not overflow
  in the sum).

  Formal guarantees:
    * Unit of privacy: one example (unit="example") or one group of examples
      (unit="group", e.g. all slices of a patient).
    * For every unit, its contribution to `clipped_grad_sum` has L2 norm at
      most `l2_clip_norm` (up to the rounding of the accumulation dtype), so
      the sum has L2 sensitivity C under add/remove-one or zero-out of a unit,
      and 2C under replace-one (`.sensitivity(relation)`).
    * Padding units and units with non-finite gradients contribute 0.
    * `ClipStats` fields are per-unit private data or exact counts of private
      data: they carry no DP guarantee by themselves.
    * Not covered: the sampling of the batch (see `PrivacyLedger`), and
      floating-point side channels of the Gaussian mechanism.

  Args:
    loss_fn: per-example loss `(params, example) -> scalar`.
    l2_clip_norm: clip norm C > 0 (may be `inf` to disable clipping). It can
      be overridden per call (`l2_clip_norm=` keyword, may be traced) for
      adaptive clipping.
    unit: "example" or "group".
    microbatch_size: if set, units are processed in sequential chunks of this
      size to bound memory (the batch must be a multiple of it). The result is
      identical to the unchunked one up to summation order.
    accumulation_dtype: dtype of the returned sum.

  Returns:
    A `ClippedGrad` callable with a `.sensitivity()` method.

  Example:
    >>> import jax.numpy as jnp
    >>> loss = lambda w, ex: 0.5 * jnp.sum((ex["x"] @ w - ex["y"]) ** 2)
    >>> grad_fn = clipped_grad(loss, l2_clip_norm=1.0)
    >>> batch = {"x": jnp.eye(3), "y": jnp.array([10.0, 0.0, 0.0])}
    >>> g, stats = grad_fn(jnp.zeros(3), batch,
    ...                    jnp.array([False, False, True]))
    >>> g.tolist(), int(stats.num_clipped), int(stats.num_real)
    ([-1.0, 0.0, 0.0], 1, 2)
    >>> grad_fn.sensitivity()
    1.0
  """
  if unit not in UNITS:
    raise ValueError(f"unit must be one of {UNITS}, got {unit!r}.")
  if not isinstance(l2_clip_norm, jax.Array) and not l2_clip_norm > 0:
    raise ValueError(f"l2_clip_norm must be > 0, got {l2_clip_norm}.")
  if microbatch_size is not None and microbatch_size < 1:
    raise ValueError(f"microbatch_size must be >= 1, got {microbatch_size}.")
  return ClippedGrad(
      loss_fn=loss_fn,
      l2_clip_norm=l2_clip_norm,
      unit=unit,
      microbatch_size=microbatch_size,
      accumulation_dtype=accumulation_dtype,
  )

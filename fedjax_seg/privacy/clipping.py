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
    capacity: `chunked_clipped_grad` (per example) and
    `packed_group_clipped_grad` (per patient, from a packed slice buffer)
    compute only the chunks up to the last real unit, with the same results
    and guarantees as `clipped_grad`; `canonicalize_convs` keeps XLA's fast
    CPU convolutions inside their loop.
"""

import dataclasses
import functools
from typing import Any, Callable, Literal, NamedTuple

import chex
import dp_accounting
import jax
from jax.extend import core as jax_core
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


class _ClipNormSensitivity:
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
class ClippedGrad(_ClipNormSensitivity):
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

    real = ~is_padding
    raw_norms = aux.grad_norms.astype(jnp.float32)
    finite = jnp.isfinite(raw_norms)
    norms = jnp.where(finite, raw_norms, jnp.inf)
    norms = jnp.where(real, norms, 0.0)
    losses = jnp.where(real, aux.values.astype(jnp.float32), 0.0)
    stats = ClipStats(
        per_example_norms=norms,
        per_example_loss=jnp.nan_to_num(losses),
        num_clipped=jnp.sum(real & finite & (raw_norms > clip_norm)).astype(
            jnp.int32
        ),
        num_real=jnp.sum(real).astype(jnp.int32),
        num_nonfinite=jnp.sum(real & ~finite).astype(jnp.int32),
        is_real=real,
    )
    return grad_sum, stats



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


# -- Work that follows the realised sample -------------------------------------
#
# A Poisson sample is realised as a fixed-shape padded batch whose sampled
# units come first. The functions below process such a batch in fixed-size
# chunks inside a `lax.while_loop` that stops after the last chunk holding a
# real unit, so their cost follows the realised sample rather than the padded
# capacity. Chunks after the last real unit hold only padding, which
# contributes exactly zero, so stopping there changes no result: the
# guarantees do not depend on the units' order, only the saving does.


def _canonical_conv_dimension_numbers(
    num_spatial: int,
) -> jax.lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC (generalised to any number of spatial dims)."""
  spatial = tuple(range(1, num_spatial + 1))
  feature_last = (0, num_spatial + 1) + spatial
  return jax.lax.ConvDimensionNumbers(
      lhs_spec=feature_last,
      rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
      out_spec=feature_last,
  )


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]):
  """`conv_general_dilated` with explicit transposes to NHWC / HWIO / NHWC.

  Returns None when the convolution already has that form. Dimensions are
  identified by role (batch, feature, spatial i), so permuting the operands
  and the dimension numbers together computes exactly the same convolution,
  feature and batch groups included.
  """
  dn = params["dimension_numbers"]
  canon = _canonical_conv_dimension_numbers(len(dn.lhs_spec) - 2)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
      canon.lhs_spec, canon.rhs_spec, canon.out_spec):
    return None
  lhs = jax.lax.transpose(
      lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  rhs = jax.lax.transpose(
      rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
  out = jax.lax.conv_general_dilated_p.bind(
      lhs, rhs, **dict(params, dimension_numbers=canon))
  # Axis j of `out` is the role that the original output keeps at order[j].
  order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
  inverse = tuple(sorted(range(len(order)), key=lambda j: order[j]))
  return jax.lax.transpose(out, inverse)


_INLINED_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _eval_canonical(jaxpr, consts, *args) -> list[Any]:
  """Evaluates `jaxpr` with every convolution in canonical form."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outvals = None
    if eqn.primitive is jax.lax.conv_general_dilated_p:
      out = _canonical_conv(*invals, eqn.params)
      outvals = None if out is None else [out]
    elif eqn.primitive.name in _INLINED_CALLS:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(inner, jax_core.ClosedJaxpr):
        outvals = _eval_canonical(inner.jaxpr, inner.consts, *invals)
    if outvals is None:  # Anything else runs as it was traced.
      with eqn.ctx.manager:
        out = eqn.primitive.bind(
            *invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = out if eqn.primitive.multiple_results else [out]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every convolution rewritten to NHWC / HWIO / NHWC form.

  Performance only: the result is the same function (same values, up to the
  summation order inside a convolution). Why: XLA's CPU backend implements a
  convolution with its fast (Eigen) kernel only in that form, and its pass
  that rewrites other forms into it (`ConvCanonicalization`) visits only the
  entry computation. Gradients of convolutions come in other forms (a weight
  gradient contracts the batch axis), so inside a loop or a conditional body
  (`lax.while_loop`, `lax.scan`, `lax.cond`) they fall back to a naive loop
  nest, measured 6-15x slower (BENCHMARKS.md; the pass is
  `xla/service/cpu/conv_canonicalization.cc`, which iterates
  `module->entry_computation()` only). Rewriting them with explicit
  transposes before XLA sees them keeps the fast kernel everywhere.

  `fn` is traced to a jaxpr at each call (its arguments may be tracers) and
  re-evaluated with the convolutions replaced; nested `jit` calls are
  inlined. Other higher-order primitives (loops, conditionals, custom
  derivative rules) are kept as they are, convolutions inside them
  unchanged: apply this to a loop's body, not to the loop. Take derivatives
  inside `fn`: the result is differentiable, but the convolutions of its
  derivative are not rewritten.

  Args:
    fn: any function of arrays (pytrees allowed) to arrays.

  Returns:
    A function with the same signature and outputs.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
        lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True)(
            *flat)
    out = _eval_canonical(closed.jaxpr, closed.consts, *flat)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def resolve_canonicalize(canonicalize: bool | None) -> bool:
  """A `canonicalize` setting resolved: None means "on CPU only"."""
  if canonicalize is None:
    return jax.default_backend() == "cpu"
  return canonicalize


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


def _clip_stats(real, raw_norms, losses, clip_norm) -> ClipStats:
  """ClipStats from per-unit pre-clipping norms (non-finite: any NaN/inf)."""
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


def _check_chunk_size(chunk_size: int):
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}.")


@dataclasses.dataclass(frozen=True)
class ChunkedClippedGrad(_ClipNormSensitivity):
  """Callable returned by `chunked_clipped_grad`; see there for the contract.

  Call as `fn(params, batch, is_padding_example=None, *, l2_clip_norm=None)
  -> (clipped_grad_sum, ClipStats)`.
  """

  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  l2_clip_norm: float
  chunk_size: int
  canonicalize: bool | None
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

    if resolve_canonicalize(self.canonicalize):
      chunk_grad = canonicalize_convs(chunk_grad)

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
    canonicalize: bool | None = None,
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
    canonicalize: rewrite the chunk's convolutions for XLA's CPU backend
      (`canonicalize_convs`); None: only when the default backend is CPU.
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
  return ChunkedClippedGrad(loss_fn, l2_clip_norm, chunk_size, canonicalize,
                            accumulation_dtype, chunk_clipped_grad)


@dataclasses.dataclass(frozen=True)
class PackedGroupClippedGrad(_ClipNormSensitivity):
  """Callable returned by `packed_group_clipped_grad`; see there.

  Call as `fn(params, slices, segment_ids, slice_mask, *, l2_clip_norm=None)
  -> (clipped_grad_sum, ClipStats)`.
  """

  loss_fn: Callable[[PyTree, PyTree], jax.Array]
  l2_clip_norm: float
  num_groups: int
  chunk_size: int
  canonicalize: bool | None
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

    if resolve_canonicalize(self.canonicalize):
      chunk_sums = canonicalize_convs(chunk_sums)

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
    stats = _clip_stats(real, raw_norms, loss, clip_norm)
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
    canonicalize: bool | None = None,
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
    canonicalize: as in `chunked_clipped_grad` (performance only).
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
                                canonicalize, accumulation_dtype,
                                per_example_value_and_grad)

"""Per-example gradients from each layer's input and output gradient.

An alternative to `jax.vmap(jax.grad(loss))` for models built from known
layers (our U-Nets: convolutions, GroupNorm/InstanceNorm, 2x2 stride-2
upsampling). One batched forward pass records every parametrised layer's
input A (for a normalisation layer: its normalised input x_hat), and ONE
batched backward pass, taken with respect to a zero perturbation added to
every layer's output, gives each layer's output gradient B for every
example at once (examples do not mix, so d sum_i loss_i / d y_i is example
i's own output gradient). The weight gradients, the part `vmap(grad)` turns
into per-example convolutions, are then formed per example from A and B:

  * convolution, kernel [k..., C_in, C_out], "SAME", stride 1: for each
    kernel tap o, sum over positions t of A_pad[t + o] (x) B[t] (one
    [C_in, C_out] contraction per tap); bias: sum_t B[t];
  * 2^d stride-2 upsampling (`unet._upsample2`): each output pixel 2t + a
    gets input pixel t through tap a, so the kernel gradient is
    sum_t A[t] (x) B[2t + a], unflipped; bias: sum of B;
  * normalisation scale: sum_t B[t] * x_hat[t]; bias: sum_t B[t].

The result has exactly the contract of `vmap(value_and_grad(loss))`
(per-example losses [N] and gradients [N, ...] with the structure of
params), so every clipping rule built on it (padding, non-finite units,
patient groups, chunks that follow the sample) stays as it is;
`tests/privacy/test_layer_gradients.py` checks the equality for every layer
type of the 2D and 3D U-Nets. It is a performance choice only: the
gradients, hence every privacy figure, are the same up to float rounding.
"""

import itertools
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

PyTree = chex.ArrayTree
KINDS = ("conv", "norm", "upsample2")


class Tape:
  """What `unet._layer` records: per layer path, its kind, its input (or
  normalised input) and, in the shape pass, its output shape.

  With `perturbations` (a dict path -> zeros of the output's shape) each
  recorded output gets its perturbation added, so the gradient with respect
  to `perturbations` is every layer's output gradient.
  """

  def __init__(self, perturbations: dict | None = None):
    self.perturbations = perturbations
    self.kinds: dict[tuple, str] = {}
    self.inputs: dict[tuple, jax.Array] = {}
    self.outputs: dict[tuple, jax.ShapeDtypeStruct] = {}

  def record(self, path: tuple, kind: str, module: Any, x: jax.Array,
             y: jax.Array) -> jax.Array:
    if kind not in KINDS:
      raise ValueError(f"layer {path}: unknown kind {kind!r}; known: {KINDS}.")
    if path in self.kinds:
      raise ValueError(f"layer {path} recorded twice: a shared layer's "
                       "per-example gradient is not the sum this tape forms.")
    self.kinds[path] = kind
    self.inputs[path] = normalized(module, x) if kind == "norm" else x
    if self.perturbations is None:
      self.outputs[path] = jax.ShapeDtypeStruct(y.shape, y.dtype)
      return y
    return y + self.perturbations[path].astype(y.dtype)


def normalized(module: Any, x: jax.Array) -> jax.Array:
  """x_hat of an `nnx.GroupNorm` over [N, *spatial, C]: the input with each
  example's group mean removed and divided by sqrt(var + epsilon), before
  scale and bias (the statistics as flax computes them)."""
  groups, channels = module.num_groups, x.shape[-1]
  grouped = x.reshape(x.shape[:-1] + (groups, channels // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(grouped, axis=axes, keepdims=True)
  if getattr(module, "use_fast_variance", True):
    var = jnp.maximum(0.0, jnp.mean(jnp.square(grouped), axis=axes,
                                    keepdims=True) - jnp.square(mean))
  else:
    var = jnp.mean(jnp.square(grouped - mean), axis=axes, keepdims=True)
  return ((grouped - mean) * jax.lax.rsqrt(var + module.epsilon)).reshape(
      x.shape)


# Every contraction whose result enters a norm bound or a clipped sum runs at
# full float32 precision: JAX's default is TF32 on NVIDIA GPUs and bfloat16
# passes on TPUs (operands rounded to a 10- or 8-bit mantissa), under which a
# gradient summed with one rounding and bounded with another can exceed the
# clip norm (and the ghost-norm bound assumes float32).
_F32 = jax.lax.Precision.HIGHEST


def _spatial_sum(b: jax.Array) -> jax.Array:
  return jnp.sum(b, axis=tuple(range(1, b.ndim - 1)))


def conv_kernel_grad(a: jax.Array, b: jax.Array,
                     kernel_size: tuple[int, ...]) -> jax.Array:
  """Per-example kernel gradient [N, *k, C_in, C_out] of a stride-1 "SAME"
  convolution with input a [N, *S, C_in] and output gradient b
  [N, *S, C_out]: one contraction per tap over the zero-padded input."""
  spatial = a.shape[1:-1]
  if all(k == 1 for k in kernel_size):
    g = jnp.einsum("n...i,n...o->nio", a, b, precision=_F32)
    return g.reshape((a.shape[0],) + kernel_size + g.shape[1:])
  pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
  padded = jnp.pad(a, pads)
  taps = []
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    window = padded[(slice(None),) + tuple(
        slice(o, o + n) for o, n in zip(offset, spatial))]
    taps.append(jnp.einsum("n...i,n...o->nio", window, b, precision=_F32))
  g = jnp.stack(taps, axis=1)
  return g.reshape((a.shape[0],) + kernel_size + g.shape[2:])


def conv_kernel_grad_vjp(a: jax.Array, b: jax.Array,
                         kernel_size: tuple[int, ...]) -> jax.Array:
  """As `conv_kernel_grad`, through the convolution's own kernel VJP per
  example (what `vmap(grad)` does for this one layer)."""
  d = len(kernel_size)
  dn = jax.lax.conv_dimension_numbers(
      (1,) + a.shape[1:], kernel_size + (a.shape[-1], b.shape[-1]),
      ("N" + "DHW"[-d:] + "C", "DHW"[-d:] + "IO", "N" + "DHW"[-d:] + "C"))

  def one(a1, b1):
    conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
        a1[None], w, (1,) * d, "SAME", dimension_numbers=dn, precision=_F32)
    w0 = jnp.zeros(kernel_size + (a.shape[-1], b.shape[-1]), a.dtype)
    return jax.vjp(conv, w0)[1](b1[None])[0]

  return jax.vmap(one)(a, b)


def upsample2_kernel_grad(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-example kernel gradient [N, 2^d..., C_in, C_out] of
  `unet._upsample2` with input a [N, *S, C_in] and output gradient b
  [N, *2S, C_out] (the kernel as stored: `_upsample2` flips it)."""
  d = a.ndim - 2
  n, spatial, c_out = b.shape[0], a.shape[1:-1], b.shape[-1]
  split = (n,) + tuple(x for s in spatial for x in (s, 2)) + (c_out,)
  letters, taps = "dhw"[-d:], "ajk"[-d:]
  b_split = "n" + "".join(l + t for l, t in zip(letters, taps)) + "o"
  flipped = jnp.einsum(f"n{letters}i,{b_split}->n{taps}io", a,
                       b.reshape(split), precision=_F32)
  return jnp.flip(flipped, axis=tuple(range(1, d + 1)))


KERNEL_METHODS = ("auto", "vjp", "taps")


def auto_kernel_method(c_in: int, c_out: int) -> str:
  """The kernel method for a convolution with `c_in` input and `c_out`
  output channels: "taps" when c_in <= c_out, else "vjp".

  Measured per layer on 2 CPU cores (`benchmarks/profile_layers.py
  --per_example`, chunks of 4 slices, tiny U-Net at 32x32 and 128x128;
  BENCHMARKS.md): where the channels stay or grow the per-tap contractions
  were as fast (within noise) or faster in every run (up to 4.4x: 128px 1->16, 4.6 vs
  1.1 ms; 64px 32->32: 13.0 vs 7.8 ms); on the decoder layers that halve
  them the two were within run-to-run noise of each other (128px 32->16:
  49.9 vs 52.1 ms in one run, 51.9 vs 69.3 ms in another), so these keep
  the kernel VJP, which is what `vmap(grad)` does. Values are the same
  either way.
  """
  return "taps" if c_in <= c_out else "vjp"


def _check_kernel_method(kernel_method: str) -> None:
  if kernel_method not in KERNEL_METHODS:
    raise ValueError(f"kernel_method must be one of {KERNEL_METHODS}, got "
                     f"{kernel_method!r}.")


def layer_grads(kind: str, a: jax.Array, b: jax.Array,
                param_shapes: dict[str, tuple],
                kernel_method: str = "vjp") -> dict[str, jax.Array]:
  """One layer's per-example gradients {leaf name: [N, *leaf shape]}.

  `kernel_method` for convolutions wider than 1x1: "taps" (one contraction
  per kernel tap, `conv_kernel_grad`), "vjp" (the convolution's kernel VJP
  per example, `conv_kernel_grad_vjp`) or "auto" (per layer from its
  channel counts, `auto_kernel_method`); the same values.
  """
  _check_kernel_method(kernel_method)
  out = {}
  if "bias" in param_shapes:
    out["bias"] = _spatial_sum(b)
  if kind == "norm":
    if "scale" in param_shapes:
      out["scale"] = _spatial_sum(b * a)
  elif kind == "conv":
    kernel_size = tuple(param_shapes["kernel"][:-2])
    if kernel_method == "auto":
      kernel_method = auto_kernel_method(*param_shapes["kernel"][-2:])
    grad_fn = (conv_kernel_grad if kernel_method == "taps"
               or all(k == 1 for k in kernel_size) else conv_kernel_grad_vjp)
    out["kernel"] = grad_fn(a, b, kernel_size)
  else:
    out["kernel"] = upsample2_kernel_grad(a, b)
  for name, shape in param_shapes.items():
    if name not in out or out[name].shape[1:] != tuple(shape):
      raise ValueError(
          f"layer gradient {name!r} of a {kind} layer: got "
          f"{None if name not in out else out[name].shape[1:]}, the "
          f"parameter has shape {tuple(shape)}.")
  return out


def _keys(keypath) -> tuple:
  """A pytree key path as plain keys, e.g. ("down", 0, "conv1", "kernel")."""
  return tuple(getattr(k, "key", getattr(k, "idx", k)) for k in keypath)


def _layer_params(params: dict) -> dict[tuple, dict[str, tuple]]:
  """{layer path: {leaf name: shape}} from a nested params dict."""
  layers: dict[tuple, dict[str, tuple]] = {}
  for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = _keys(keypath)
    layers.setdefault(keys[:-1], {})[keys[-1]] = leaf.shape
  return layers


def _recorded_layers(apply_with_tape, params, x) -> tuple[Tape, dict]:
  """(a tape of the layers' kinds and output shapes, {layer path: {leaf:
  shape}}); ValueError naming parameters of layers the tape misses."""
  shape_tape = Tape()
  jax.eval_shape(lambda p, v: apply_with_tape(p, v, shape_tape), params, x)
  layers = _layer_params(params)
  missing = sorted(str(p) for p in layers if p not in shape_tape.kinds)
  if missing:
    raise ValueError(f"parameters of layers {missing} are not recorded on "
                     "the tape; use vmap per-example gradients.")
  return shape_tape, layers


def _tape_pass(apply_with_tape, loss_from_logits, params, batch, x,
               shape_tape: Tape, real: jax.Array | None = None):
  """ONE batched forward and backward pass: (per-example losses [N], each
  recorded layer's input {path: [N, ...]}, each layer's output gradient
  {path: [N, ...]}); with `real`, the other examples' losses are left out
  of the backward pass (their output gradients are 0)."""

  def total_loss(perturbations):
    tape = Tape(perturbations)
    logits = apply_with_tape(params, x, tape)
    losses = jax.vmap(loss_from_logits)(logits, batch)
    kept = losses if real is None else jnp.where(real, losses, 0.0)
    return jnp.sum(kept), (losses, tape.inputs)

  zeros = {path: jnp.zeros(s.shape, s.dtype)
           for path, s in shape_tape.outputs.items()}
  (_, (losses, inputs)), out_grads = jax.value_and_grad(
      total_loss, has_aux=True)(zeros)
  return losses, inputs, out_grads


def per_example_value_and_grad(
    apply_with_tape: Callable[[PyTree, jax.Array, Tape], jax.Array],
    loss_from_logits: Callable[[jax.Array, PyTree], jax.Array],
    input_key: str = "image",
    kernel_method: str = "auto",
) -> Callable[[PyTree, PyTree], tuple[jax.Array, PyTree]]:
  """`(params, batch) -> (losses [N], per-example grads)`, the values of
  `jax.vmap(jax.value_and_grad(loss), in_axes=(None, 0))` for the loss
  `loss(params, example) = loss_from_logits(apply(params,
  example[input_key][None])[0], example)`.

  Args:
    apply_with_tape: `(params, x [N, ...], tape) -> logits [N, ...]`, a model
      whose every parametrised layer goes through `tape.record` (see
      `unet.SegmentationModel.apply`), and whose examples do not mix.
    loss_from_logits: `(logits [...], example) -> scalar` for ONE example.
    input_key: the batch entry fed to the model.
    kernel_method: how convolution kernels' per-example gradients are formed
      from A and B ("auto", "vjp" or "taps", see `layer_grads`). On 2 CPU
      cores, chunks of 4 slices, the whole call took 1.02x ("auto"), 1.01x
      ("taps") and 1.12x ("vjp") the time of `vmap(grad)` at 32x32 and
      1.03x, 1.02x and 1.14x at 128x128 (BENCHMARKS.md).

  Every parameter leaf must belong to a recorded layer (else ValueError
  naming it), and no layer may be applied twice.
  """
  _check_kernel_method(kernel_method)

  def value_and_grads(params, batch):
    x = batch[input_key]
    shape_tape, layers = _recorded_layers(apply_with_tape, params, x)
    losses, inputs, out_grads = _tape_pass(apply_with_tape, loss_from_logits,
                                           params, batch, x, shape_tape)
    per_layer = {path: layer_grads(shape_tape.kinds[path], inputs[path],
                                   out_grads[path], shapes, kernel_method)
                 for path, shapes in layers.items()}

    def leaf(keypath, p):
      keys = _keys(keypath)
      return per_layer[keys[:-1]][keys[-1]].astype(p.dtype)

    return losses, jax.tree_util.tree_map_with_path(leaf, params)

  return value_and_grads



# -- Clipped sums without per-example gradients (ghost norms, book-keeping) --

NORM_METHODS = ("auto", "ghost", "materialize")


def ghost_is_cheaper(positions: int, patch_features: int,
                     out_channels: int) -> bool:
  """Whether a convolution's per-example gradient norm is cheaper from Gram
  matrices than from the materialised gradient.

  Per example, with T output positions, F = C_in * prod(k) patch features
  and C_out output channels: the ghost norm <A A^T, B B^T> costs
  T^2 (F + C_out + 1) multiply-adds, the materialised gradient B^T A then
  its norm T F C_out + F C_out. So the ghost norm pays on deep, wide layers
  of small images (e.g. 4x4 positions and 192 channels: 16 x 16 x 1921
  against 16 x 1728 x 192, 6.7x fewer) and never on full-resolution ones.
  """
  t = positions
  return t * t * (patch_features + out_channels + 1) < (
      t * patch_features * out_channels + patch_features * out_channels)


def _patches(a: jax.Array, kernel_size: tuple[int, ...]) -> jax.Array:
  """[N, T, C_in * prod(k)]: each output position's receptive field of a
  stride-1 "SAME" convolution's input a [N, *S, C_in]."""
  d = len(kernel_size)
  spec = "N" + "DHW"[-d:] + "C"
  p = jax.lax.conv_general_dilated_patches(
      a, kernel_size, (1,) * d, "SAME",
      dimension_numbers=(spec, "DHW"[-d:] + "IO", spec), precision=_F32)
  return p.reshape(a.shape[0], -1, p.shape[-1])


# float32 unit roundoff.
_U = 2.0 ** -24


def _gamma(n: int) -> float:
  """gamma_n = n u / (1 - n u), the relative error bound of n float32
  operations (Higham 2002, 3.1), with 1% to spare."""
  return 1.01 * n * _U / (1.0 - n * _U)


def conv_ghost_norm_bounds(a: jax.Array, b: jax.Array,
                           kernel_size: tuple[int, ...]
                           ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Ghost norms of a stride-1 "SAME" convolution's per-example kernel
  gradients, ||B_i^T A_i||^2 = <A_i A_i^T, B_i B_i^T> with A_i the unfolded
  input [T, C_in k] and B_i the output gradient [T, C_out] (Goodfellow 2015;
  Li et al. 2022), without forming B_i^T A_i, and rigorous float32 error
  bounds.

  Returns (sq [N], sq_upper [N], rounding [N]):
    sq: <A_i A_i^T, B_i B_i^T> as computed (it can be far off, even
      negative, when the sum cancels: a near-constant input whose output
      gradient sums to about zero over positions);
    sq_upper: an upper bound of the exact ||B_i^T A_i||^2: max(sq, 0) +
      gamma M_i^2 with M_i = sum_t ||a_t|| ||b_t|| (which bounds
      sum_{t,s} |<a_t, a_s><b_t, b_s>| by Cauchy-Schwarz) and gamma the
      error bound of the Gram entries and of their sum;
    rounding: a bound on how far the gradient the batched kernel gradient
      computes for example i (T products summed per entry) is from the
      exact one, gamma_T M_i.
  Clipping by sqrt(sum of sq_upper) + sum of rounding keeps every
  example's contribution at most the clip norm whatever the cancellation
  (the gradients of the other layers being exact up to their own norms'
  rounding, as in `clipped_grad`).
  """
  patches = _patches(a, kernel_size)
  out = b.reshape(b.shape[0], -1, b.shape[-1])
  gram_a = jnp.einsum("nti,nsi->nts", patches, patches, precision=_F32)
  gram_b = jnp.einsum("nto,nso->nts", out, out, precision=_F32)
  sq = jnp.sum(gram_a * gram_b, axis=(1, 2))
  t, f, c = patches.shape[1], patches.shape[2], out.shape[2]
  m = jnp.sum(jnp.linalg.norm(patches, axis=-1) * jnp.linalg.norm(out, axis=-1),
              axis=1)
  m = m * (1.0 + 2.0 * _gamma(f + c + t + 4))  # M's own rounding, up.
  sq_upper = jnp.maximum(sq, 0.0) + _gamma(f + c + t * t + 4) * jnp.square(m)
  return sq, sq_upper, _gamma(t + 2) * m


def conv_kernel_grad_sum(a: jax.Array, b: jax.Array,
                         kernel_size: tuple[int, ...]) -> jax.Array:
  """sum_i B_i^T A_i as a kernel [*k, C_in, C_out]: the convolution's own
  batched kernel gradient (one contraction over examples and positions;
  "book-keeping": per-example weights go into b)."""
  d = len(kernel_size)
  dn = jax.lax.conv_dimension_numbers(
      a.shape, kernel_size + (a.shape[-1], b.shape[-1]),
      ("N" + "DHW"[-d:] + "C", "DHW"[-d:] + "IO", "N" + "DHW"[-d:] + "C"))
  conv = lambda w: jax.lax.conv_general_dilated(  # noqa: E731
      a, w, (1,) * d, "SAME", dimension_numbers=dn, precision=_F32)
  w0 = jnp.zeros(kernel_size + (a.shape[-1], b.shape[-1]), a.dtype)
  return jax.vjp(conv, w0)[1](b.astype(a.dtype))[0]


def _ghost_layer(kind: str, shapes: dict[str, tuple], a: jax.Array,
                 norm_method: str) -> bool:
  if kind != "conv" or norm_method == "materialize":
    return False
  kernel = tuple(shapes["kernel"])
  if norm_method == "ghost":
    return True
  positions = int(np.prod(a.shape[1:-1]))
  return ghost_is_cheaper(positions, int(np.prod(kernel[:-1])), kernel[-1])


def ghost_clipped_grad(
    apply_with_tape: Callable[[PyTree, jax.Array, Tape], jax.Array],
    loss_from_logits: Callable[[jax.Array, PyTree], jax.Array],
    input_key: str = "image",
    norm_method: str = "auto",
    kernel_method: str = "auto",
    trainable_mask: PyTree | None = None,
):
  """`(params, batch, is_padding_example, *, l2_clip_norm) ->
  (clipped_grad_sum, ClipStats)`: `privacy.clipped_grad(loss,
  l2_clip_norm=C)` (unit "example") for the loss of
  `per_example_value_and_grad`, from ONE batched forward and backward pass.

  Each example's gradient norm is summed over layers: a convolution's from
  Gram matrices of its unfolded input and output gradient (ghost norm)
  where `ghost_is_cheaper` says so (`norm_method="auto"`; "ghost" for every
  convolution, "materialize" for none), every other layer's from its
  per-example gradient (`layer_grads`). The clipped sum is then formed
  without a second backward pass: each layer's gradient sum with every
  example's output gradient scaled by its clip factor c_i = min(1, C /
  ||g_i||) (a convolution's own batched kernel gradient where the norm was
  ghost, sum_i c_i g_i elsewhere).

  Formal guarantees (those of `clipped_grad`):
    * Unit of privacy: one example; every example's contribution has L2
      norm at most C. A ghost norm is computed from sums that can cancel,
      so it is replaced by a rigorous float32 upper bound
      (`conv_ghost_norm_bounds`): an example is clipped by a norm at least
      its true one, at most about 1% above it on the U-Nets' 8x8 layers
      and 0.1% on 4x4 ones (measured), so the clip factors are never larger
      than `clipped_grad`'s. `ClipStats.per_example_norms` are these
      bounds. Without ghost layers the result is `clipped_grad`'s up to
      float rounding.
    * Padding examples contribute exactly 0 (their inputs and output
      gradients are selected away before any sum), and so does an example
      whose loss, layer inputs, output gradients or norm are not finite.
    * `ClipStats` as `clipped_grad`'s.
  With `trainable_mask`, leaves outside it count in no norm and get a zero
  sum (as the vmap path's frozen leaves).
  """
  from fedjax_seg.privacy import clipping  # pylint: disable=g-import-not-at-top
  if norm_method not in NORM_METHODS:
    raise ValueError(f"norm_method must be one of {NORM_METHODS}, got "
                     f"{norm_method!r}.")
  _check_kernel_method(kernel_method)

  def fn(params, batch, is_padding_example=None, *, l2_clip_norm):
    x = batch[input_key]
    n = x.shape[0]
    real = (jnp.ones((n,), jnp.bool_) if is_padding_example is None
            else ~is_padding_example.astype(jnp.bool_))
    shape_tape, layers = _recorded_layers(apply_with_tape, params, x)
    trained = {}
    if trainable_mask is not None:
      for keypath, m in jax.tree_util.tree_flatten_with_path(
          trainable_mask)[0]:
        trained[_keys(keypath)] = bool(m)

    losses, inputs, out_grads = _tape_pass(apply_with_tape, loss_from_logits,
                                           params, batch, x, shape_tape, real)

    def per_example_all_finite(t):
      return jnp.all(jnp.isfinite(t.reshape(n, -1)), axis=1)

    finite = real & jnp.isfinite(losses)
    sq_norms = jnp.zeros((n,), jnp.float32)
    rounding = jnp.zeros((n,), jnp.float32)
    plans = {}
    for path, shapes in layers.items():
      kind = shape_tape.kinds[path]
      a, b = inputs[path], out_grads[path]
      kept = {name: s for name, s in shapes.items()
              if trained.get(path + (name,), True)}
      finite &= per_example_all_finite(a) & per_example_all_finite(b)
      ghost = _ghost_layer(kind, shapes, a, norm_method) and "kernel" in kept
      per_example = {}
      if ghost:
        kernel = tuple(shapes["kernel"][:-2])
        _, upper, slack = conv_ghost_norm_bounds(a, b, kernel)
        sq_norms += upper.astype(jnp.float32)
        rounding += slack.astype(jnp.float32)
        if "bias" in kept:
          per_example["bias"] = _spatial_sum(b)
      else:
        per_example = {k: v for k, v in layer_grads(
            kind, a, b, shapes, kernel_method).items() if k in kept}
      for g in per_example.values():
        sq_norms += jnp.sum(jnp.square(g.reshape(n, -1).astype(jnp.float32)),
                            axis=1)
        finite &= per_example_all_finite(g)
      plans[path] = (ghost, per_example)
    finite &= jnp.isfinite(sq_norms) & jnp.isfinite(rounding)
    # An upper bound of each example's gradient norm (exact where no layer
    # took a ghost norm, up to the rounding of the norm itself).
    norms = jnp.sqrt(jnp.where(finite, sq_norms, 0.0)) + jnp.where(
        finite, rounding, 0.0)
    clip = jnp.asarray(l2_clip_norm, jnp.float32)
    factor = jnp.where(finite, jnp.minimum(1.0, clip / jnp.maximum(
        norms, jnp.finfo(jnp.float32).tiny)), 0.0)

    def weighted(t, w):
      shape = (n,) + (1,) * (t.ndim - 1)
      return jnp.where(finite.reshape(shape), t * w.reshape(shape).astype(
          t.dtype), jnp.zeros_like(t))

    sums = {}
    for path, shapes in layers.items():
      ghost, per_example = plans[path]
      out = {name: jnp.sum(weighted(g, factor), axis=0)
             for name, g in per_example.items()}
      if ghost:
        kernel = tuple(shapes["kernel"][:-2])
        out["kernel"] = conv_kernel_grad_sum(
            weighted(inputs[path], jnp.ones((n,))),
            weighted(out_grads[path], factor), kernel)
      sums[path] = out

    def leaf(keypath, p):
      keys = _keys(keypath)
      got = sums[keys[:-1]].get(keys[-1])
      return (jnp.zeros(p.shape, jnp.float32) if got is None
              else got.astype(jnp.float32).reshape(p.shape))

    grad_sum = jax.tree_util.tree_map_with_path(leaf, params)
    stats = clipping.ClipStats(
        per_example_norms=jnp.where(real, jnp.where(finite, norms, jnp.inf),
                                    0.0),
        per_example_loss=jnp.where(real & jnp.isfinite(losses),
                                   losses.astype(jnp.float32), 0.0),
        num_clipped=jnp.sum(finite & (norms > clip)).astype(jnp.int32),
        num_real=jnp.sum(real).astype(jnp.int32),
        num_nonfinite=jnp.sum(real & ~finite).astype(jnp.int32),
        is_real=real)
    return grad_sum, stats

  return fn

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


def _spatial_sum(b: jax.Array) -> jax.Array:
  return jnp.sum(b, axis=tuple(range(1, b.ndim - 1)))


def conv_kernel_grad(a: jax.Array, b: jax.Array,
                     kernel_size: tuple[int, ...]) -> jax.Array:
  """Per-example kernel gradient [N, *k, C_in, C_out] of a stride-1 "SAME"
  convolution with input a [N, *S, C_in] and output gradient b
  [N, *S, C_out]: one contraction per tap over the zero-padded input."""
  spatial = a.shape[1:-1]
  if all(k == 1 for k in kernel_size):
    g = jnp.einsum("n...i,n...o->nio", a, b)
    return g.reshape((a.shape[0],) + kernel_size + g.shape[1:])
  pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in kernel_size] + [(0, 0)]
  padded = jnp.pad(a, pads)
  taps = []
  for offset in itertools.product(*(range(k) for k in kernel_size)):
    window = padded[(slice(None),) + tuple(
        slice(o, o + n) for o, n in zip(offset, spatial))]
    taps.append(jnp.einsum("n...i,n...o->nio", window, b))
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
        a1[None], w, (1,) * d, "SAME", dimension_numbers=dn)
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
                       b.reshape(split))
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
    shape_tape = Tape()
    jax.eval_shape(lambda p, v: apply_with_tape(p, v, shape_tape), params, x)
    layers = _layer_params(params)
    missing = sorted(str(p) for p in layers if p not in shape_tape.kinds)
    if missing:
      raise ValueError(f"parameters of layers {missing} are not recorded on "
                       "the tape; use vmap per-example gradients.")

    def total_loss(perturbations):
      tape = Tape(perturbations)
      logits = apply_with_tape(params, x, tape)
      losses = jax.vmap(loss_from_logits)(logits, batch)
      return jnp.sum(losses), (losses, tape.inputs)

    zeros = {path: jnp.zeros(s.shape, s.dtype)
             for path, s in shape_tape.outputs.items()}
    (_, (losses, inputs)), out_grads = jax.value_and_grad(
        total_loss, has_aux=True)(zeros)
    per_layer = {path: layer_grads(shape_tape.kinds[path], inputs[path],
                                   out_grads[path], shapes, kernel_method)
                 for path, shapes in layers.items()}

    def leaf(keypath, p):
      keys = _keys(keypath)
      return per_layer[keys[:-1]][keys[-1]].astype(p.dtype)

    return losses, jax.tree_util.tree_map_with_path(leaf, params)

  return value_and_grads


"""2D and 3D U-Nets in Flax NNX, safe under per-example DP.

Normalisation is GroupNorm or InstanceNorm only (statistics per example), so
no example's output depends on another's: a requirement of per-example
clipping (BatchNorm would mix examples and break the DP guarantee).

Downstream code never touches the NNX module: `SegmentationModel` splits it
once into a graph definition and a plain nested-dict params pytree, and
exposes pure `init(key, input_shape) -> params` and
`apply(params, x) -> logits`, which compose with jax.vmap / jax.grad / optax.
"""

import dataclasses
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

NORMS = ("group", "instance")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a U-Net.

  Attributes:
    spatial_dims: 2 (images [B, H, W, C]) or 3 (volumes [B, D, H, W, C]).
    in_channels: input channels C.
    num_classes: output channels (logits per class).
    widths: feature channels per resolution level; depth = len(widths).
    norm: "group" (GroupNorm with `groups` groups) or "instance".
    groups: GroupNorm groups (reduced to a divisor of the channel count).
    dropout: dropout rate in each block (needs a key in `apply`).
    residual: residual (ResNet-style) blocks with a 1x1 projection.
    dtype: compute dtype (params stay float32).
  """

  spatial_dims: int = 2
  in_channels: int = 1
  num_classes: int = 3
  widths: tuple[int, ...] = (16, 32, 64)
  norm: str = "group"
  groups: int = 8
  dropout: float = 0.0
  residual: bool = False
  dtype: Any = jnp.float32

  def __post_init__(self):
    if self.spatial_dims not in (2, 3):
      raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS} (no BatchNorm: it mixes "
                       f"examples and breaks per-example DP), got "
                       f"{self.norm!r}.")
    if not self.widths or min(self.widths) < 1:
      raise ValueError(f"widths must be positive ints, got {self.widths}.")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
    if self.in_channels < 1 or self.num_classes < 2:
      raise ValueError("need in_channels >= 1 and num_classes >= 2.")

  @property
  def depth(self) -> int:
    return len(self.widths)


# Parameter counts are those of the 2D model with 1 input channel and 3
# classes; a 3D model with the same widths has about 3x as many (3^3 kernels).
PRESETS = {
    "tiny": dict(widths=(16, 32, 64)),  # ~0.12M params
    "small": dict(widths=(24, 48, 96, 192)),  # ~1.1M
    "base": dict(widths=(64, 128, 256, 512)),  # ~7.8M
}


def preset(name: str, **overrides) -> UNetConfig:
  """A `UNetConfig` preset ("tiny", "small", "base") with field overrides."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}.")
  return UNetConfig(**{**PRESETS[name], **overrides})


def _norm(channels: int, config: UNetConfig, rngs: nnx.Rngs) -> nnx.GroupNorm:
  groups = channels if config.norm == "instance" else math.gcd(
      channels, config.groups)
  return nnx.GroupNorm(channels, num_groups=groups, dtype=config.dtype,
                       rngs=rngs)


def _dropout(x, rate, key):
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _max_pool2(x: jax.Array) -> jax.Array:
  """2^d max pooling with stride 2 of [B, *spatial, C] (even sizes).

  The same values as `nnx.max_pool(x, (2,) * d, strides=(2,) * d)`, as a
  reshape and a max: XLA's CPU backend runs the gradient of a window
  reduction (select-and-scatter) 1.3-3x slower (BENCHMARKS.md). Gradients
  agree except at exact ties inside a window, which after the blocks' ReLU
  are zeros whose gradient the ReLU stops anyway.
  """
  spatial = x.shape[1:-1]
  split = [x.shape[0]]
  for n in spatial:
    split += [n // 2, 2]
  pooled_axes = tuple(range(2, 2 * len(spatial) + 1, 2))
  return jnp.max(x.reshape(split + [x.shape[-1]]), axis=pooled_axes)


def _upsample2(upconv: nnx.ConvTranspose, x: jax.Array,
               dtype: Any) -> jax.Array:
  """`upconv(x)` for a ConvTranspose with kernel 2^d and stride 2, as one
  contraction and a depth-to-space reshape (same parameters, same values).

  Each output pixel 2i + a gets exactly one input pixel i, through the
  kernel tap flipped along every spatial axis (lax.conv_transpose without
  transpose_kernel): y[2i + a] = sum_c x[i, c] w[1 - a, c, :] + b. XLA's
  CPU backend runs the lhs-dilated convolution behind ConvTranspose and its
  gradient 2-8x slower than this matmul (BENCHMARKS.md).
  """
  d = x.ndim - 2
  kernel = jnp.flip(upconv.kernel[...], axis=tuple(range(d))).astype(dtype)
  x = x.astype(dtype)
  letters = "dhw"[-d:]
  taps = "ajk"[-d:]
  out = "b" + "".join(l + t for l, t in zip(letters, taps)) + "o"
  y = jnp.einsum(f"b{letters}i,{taps}io->{out}", x, kernel)
  shape = (x.shape[0],) + tuple(2 * n for n in x.shape[1:-1]) + (
      kernel.shape[-1],)
  y = y.reshape(shape)
  if upconv.bias is not None:
    y = y + upconv.bias[...].astype(dtype)
  return y


def _layer(tape, path: tuple, kind: str, module, x, fn=None):
  """`module(x)` (or `fn(x)`), recorded on `tape` when one is given.

  `tape` (`privacy.layer_gradients.Tape`) keeps each parametrised layer's input and
  adds a zero perturbation to its output, whose gradient is the layer's
  output gradient: what per-layer per-example gradients are made of.
  """
  fn = module if fn is None else fn
  if tape is None:
    return fn(x)
  return tape.record(path, kind, module, x, fn(x))


class ConvBlock(nnx.Module):
  """Two (conv 3^d -> norm -> ReLU) layers, optionally residual."""

  def __init__(self, in_ch: int, out_ch: int, config: UNetConfig,
               rngs: nnx.Rngs):
    k = (3,) * config.spatial_dims
    self.conv1 = nnx.Conv(in_ch, out_ch, k, dtype=config.dtype, rngs=rngs)
    self.norm1 = _norm(out_ch, config, rngs)
    self.conv2 = nnx.Conv(out_ch, out_ch, k, dtype=config.dtype, rngs=rngs)
    self.norm2 = _norm(out_ch, config, rngs)
    self.skip = (nnx.Conv(in_ch, out_ch, (1,) * config.spatial_dims,
                          dtype=config.dtype, rngs=rngs)
                 if config.residual and in_ch != out_ch else None)
    self.residual = config.residual
    self.rate = config.dropout

  def __call__(self, x, dropout_key=None, tape=None, path=()):
    h = _layer(tape, path + ("conv1",), "conv", self.conv1, x)
    h = nnx.relu(_layer(tape, path + ("norm1",), "norm", self.norm1, h))
    h = _dropout(h, self.rate, dropout_key)
    h = _layer(tape, path + ("conv2",), "conv", self.conv2, h)
    h = _layer(tape, path + ("norm2",), "norm", self.norm2, h)
    if self.residual:
      h = h + (_layer(tape, path + ("skip",), "conv", self.skip, x)
               if self.skip is not None else x)
    return nnx.relu(h)


class UNet(nnx.Module):
  """Encoder-decoder with skip connections; logits at input resolution."""

  def __init__(self, config: UNetConfig, rngs: nnx.Rngs):
    self.config = config
    d = config.spatial_dims
    widths = config.widths
    self.down = nnx.List([
        ConvBlock(config.in_channels if i == 0 else widths[i - 1], w, config,
                  rngs) for i, w in enumerate(widths)])
    self.upconv = nnx.List([
        nnx.ConvTranspose(widths[i + 1], widths[i], (2,) * d, strides=(2,) * d,
                          dtype=config.dtype, rngs=rngs)
        for i in reversed(range(len(widths) - 1))])
    self.up = nnx.List([ConvBlock(2 * widths[i], widths[i], config, rngs)
                        for i in reversed(range(len(widths) - 1))])
    self.head = nnx.Conv(widths[0], config.num_classes, (1,) * d,
                         dtype=config.dtype, rngs=rngs)

  def __call__(self, x, dropout_key=None, tape=None):
    keys = (jax.random.split(dropout_key, 2 * len(self.down))
            if dropout_key is not None else [None] * (2 * len(self.down)))
    skips = []
    h = x.astype(self.config.dtype)
    for i, block in enumerate(self.down):
      if i > 0:
        h = _max_pool2(h)
      h = block(h, keys[i], tape, ("down", i))
      skips.append(h)
    for j, (upconv, block) in enumerate(zip(self.upconv, self.up)):
      h = _layer(tape, ("upconv", j), "upsample2", upconv, h,
                 functools.partial(_upsample2, upconv,
                                   dtype=self.config.dtype))
      h = jnp.concatenate([h, skips[-2 - j]], axis=-1)
      h = block(h, keys[len(self.down) + j], tape, ("up", j))
    return _layer(tape, ("head",), "conv", self.head, h).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SegmentationModel:
  """Pure functional face of a U-Net: params are a plain nested dict.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> model = SegmentationModel(preset("tiny"))
    >>> params = model.init(jax.random.key(0), (1, 32, 32, 1))
    >>> model.apply(params, jnp.zeros((2, 32, 32, 1))).shape
    (2, 32, 32, 3)
  """

  config: UNetConfig

  def _check_shape(self, input_shape):
    d = self.config.spatial_dims
    if len(input_shape) != d + 2:
      raise ValueError(f"input shape {tuple(input_shape)} must be [B, "
                       f"{'D, ' if d == 3 else ''}H, W, C] for a {d}D U-Net.")
    if input_shape[-1] != self.config.in_channels:
      raise ValueError(f"input has {input_shape[-1]} channels, the model "
                       f"expects {self.config.in_channels}.")
    factor = 2 ** (self.config.depth - 1)
    if any(s % factor for s in input_shape[1:-1]):
      raise ValueError(f"spatial size {tuple(input_shape[1:-1])} must be a "
                       f"multiple of {factor} (2^(depth-1)).")

  def init(self, key: jax.Array, input_shape) -> dict:
    """Fresh params (a nested dict of float32 arrays), deterministic in key."""
    self._check_shape(tuple(input_shape))
    return _init_params(self.config, key)

  def apply(self, params: dict, x: jax.Array,
            dropout_key: jax.Array | None = None, tape=None) -> jax.Array:
    """Logits [B, ..., num_classes] float32 for inputs [B, ..., C].

    Each example's logits depend on that example only (GroupNorm /
    InstanceNorm; dropout masks do not depend on data). A `tape`
    (`privacy.layer_gradients.Tape`) records every parametrised layer for
    per-layer per-example gradients; the logits are the same.
    """
    self._check_shape(x.shape)
    module = nnx.merge(_graphdef_cached(self.config), params)
    return module(x, dropout_key, tape)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(config: UNetConfig, key: jax.Array) -> dict:
  # One compiled program instead of one eager dispatch (and compile) per
  # initialiser: several seconds on CPU otherwise.
  module = UNet(config, rngs=nnx.Rngs(params=key))
  return nnx.to_pure_dict(nnx.split(module, nnx.Param)[1])


_GRAPHDEFS: dict = {}


def _graphdef_cached(config: UNetConfig):
  """The graph definition of a config, built once (it holds no arrays)."""
  if config not in _GRAPHDEFS:
    module = nnx.eval_shape(lambda: UNet(config, rngs=nnx.Rngs(0)))
    _GRAPHDEFS[config] = nnx.split(module, nnx.Param)[0]
  return _GRAPHDEFS[config]


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


def is_norm_param(path: tuple) -> bool:
  """True for a normalisation scale/bias (kept site-local by FedBN)."""
  return any(str(getattr(k, "key", k)).startswith("norm") for k in path)


PARAM_GROUPS = ("encoder", "decoder", "head", "norm")


def trainable_mask(params, groups) -> Any:
  """A pytree of bools like `params`: True for the parameters in `groups`
  (of `PARAM_GROUPS`): "encoder" the down path (bottleneck included),
  "decoder" the up path and its transposed convolutions, "head" the final
  1x1 convolution, "norm" every normalisation scale and bias."""
  unknown = [g for g in groups if g not in PARAM_GROUPS]
  if unknown:
    raise ValueError(f"unknown parameter groups {unknown}; choose from "
                     f"{PARAM_GROUPS}.")

  def selected(path, _):
    top = str(getattr(path[0], "key", path[0]))
    group = {"down": "encoder", "up": "decoder", "upconv": "decoder",
             "head": "head"}.get(top)
    return group in groups or ("norm" in groups and is_norm_param(path))

  return jax.tree_util.tree_map_with_path(selected, params)


def norm_param_mask(params) -> Any:
  """A pytree of bools like `params`: True for normalisation parameters."""
  return jax.tree_util.tree_map_with_path(lambda p, _: is_norm_param(p),
                                          params)

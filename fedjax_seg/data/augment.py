"""Slice augmentations that keep image and mask aligned, and augmentation
multiplicity (De et al. 2022) for DP-SGD.

`augment_slice(image, label, key, config)` draws one random transform of a
2D slice: a horizontal flip, a small rotation and scaling about the centre
(bilinear for the image, nearest for the mask, the same warp for both), an
intensity scale and shift, a gamma curve (on the slice's own min-max
range, so it applies to z-scored MRI as well as [0, 1] CT and X-ray) and
additive Gaussian noise. Everything is jnp, jit- and vmap-compatible, and
static in shape.

`multiplicity_loss(loss_fn, K, config)` turns a per-unit loss into the mean
loss over K augmented copies of the unit. Its gradient is the mean of the K
copies' gradients, computed BEFORE the unit is clipped: the unit still
makes one clipped contribution, so the privacy accounting is unchanged
(augmentation multiplicity is free in epsilon), while the averaged gradient
has less augmentation noise. The copies' randomness comes from an
"augment_key" leaf the client adds to each sampled unit
(`Purpose.AUGMENT`); without that leaf the loss is the plain loss.
"""

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

PyTree = Any
AUGMENTATIONS = ("flip", "affine", "intensity", "gamma", "noise")
KEY_LEAF = "augment_key"
# Optional [len(AUGMENTATIONS)] bool leaf: which transforms apply to this
# example (e.g. by its site's modality; `ops_table`).
OPS_LEAF = "augment_ops"


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Which transforms, and how strong.

  Attributes:
    augmentations: subset of `AUGMENTATIONS` (applied in the order of
      `AUGMENTATIONS`, whatever the order given).
    max_rotation_degrees: rotation drawn uniformly in +-this.
    max_scale: scaling drawn uniformly in [1 - this, 1 + this].
    intensity_scale: multiplicative factor in [1 - this, 1 + this].
    intensity_shift: additive shift in +-this (image units).
    max_log_gamma: gamma = exp(u), u uniform in +-this.
    noise_std: std of the additive Gaussian noise (image units).
  """

  augmentations: tuple[str, ...] = AUGMENTATIONS
  max_rotation_degrees: float = 10.0
  max_scale: float = 0.1
  intensity_scale: float = 0.1
  intensity_shift: float = 0.1
  max_log_gamma: float = 0.2
  noise_std: float = 0.03

  def __post_init__(self):
    unknown = [a for a in self.augmentations if a not in AUGMENTATIONS]
    if unknown:
      raise ValueError(f"unknown augmentations {unknown}; choose from "
                       f"{AUGMENTATIONS}.")
    values = (self.max_rotation_degrees, self.max_scale, self.intensity_scale,
              self.intensity_shift, self.max_log_gamma, self.noise_std)
    if min(values) < 0 or self.max_scale >= 1 or self.intensity_scale >= 1:
      raise ValueError("augmentation strengths must be >= 0, and max_scale "
                       "and intensity_scale < 1.")


def _warp(image: jax.Array, label: jax.Array, angle: jax.Array,
          scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Rotates by `angle` (radians) and scales by `scale` about the centre."""
  h, w = label.shape
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32),
                        jnp.arange(w, dtype=jnp.float32), indexing="ij")
  cy, cx = (h - 1) / 2, (w - 1) / 2
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # The output pixel (y, x) reads the input at R^-1 (p - c) / s + c.
  dy, dx = (yy - cy) / scale, (xx - cx) / scale
  src_y = cos * dy + sin * dx + cy
  src_x = -sin * dy + cos * dx + cx
  coords = [src_y, src_x]
  warped = jnp.stack([
      ndimage.map_coordinates(image[..., c], coords, order=1, mode="nearest")
      for c in range(image.shape[-1])], axis=-1)
  warped_label = ndimage.map_coordinates(label.astype(jnp.float32), coords,
                                         order=0, mode="nearest")
  return warped, jnp.round(warped_label).astype(label.dtype)


def augment_slice(image: jax.Array, label: jax.Array, key: jax.Array,
                  config: AugmentConfig = AugmentConfig(),
                  enabled: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """One random transform of a slice.

  Args:
    image: [H, W, C] float.
    label: [H, W] int mask (soft [H, W, K] labels are not supported).
    key: PRNG key of this copy.
    config: the transforms.
    enabled: optional [len(AUGMENTATIONS)] bool (may be traced): of
      `config.augmentations`, only these apply (the others are computed and
      discarded, so that every site runs one program).

  Returns:
    (image [H, W, C] float32, label like `label`), aligned.
  """
  if label.ndim != 2:
    raise ValueError(f"label must be an [H, W] mask, got shape {label.shape}.")
  image = jnp.asarray(image, jnp.float32)
  keys = jax.random.split(key, len(AUGMENTATIONS))
  k = dict(zip(AUGMENTATIONS, keys))
  ops = config.augmentations

  def apply(name, new_image, new_label):
    if enabled is None:
      return new_image, new_label
    on = enabled[AUGMENTATIONS.index(name)]
    return jnp.where(on, new_image, image), jnp.where(on, new_label, label)

  if "flip" in ops:
    flip = jax.random.bernoulli(k["flip"])
    image, label = apply("flip", jnp.where(flip, image[:, ::-1], image),
                         jnp.where(flip, label[:, ::-1], label))
  if "affine" in ops:
    ka, ks = jax.random.split(k["affine"])
    angle = jax.random.uniform(ka, minval=-1.0, maxval=1.0) * (
        config.max_rotation_degrees * math.pi / 180)
    scale = 1.0 + jax.random.uniform(ks, minval=-1.0, maxval=1.0) * (
        config.max_scale)
    image, label = apply("affine", *_warp(image, label, angle, scale))
  if "intensity" in ops:
    ka, kb = jax.random.split(k["intensity"])
    a = 1.0 + jax.random.uniform(ka, minval=-1.0, maxval=1.0) * (
        config.intensity_scale)
    b = jax.random.uniform(kb, minval=-1.0, maxval=1.0) * (
        config.intensity_shift)
    image, label = apply("intensity", a * image + b, label)
  if "gamma" in ops:
    gamma = jnp.exp(jax.random.uniform(k["gamma"], minval=-1.0, maxval=1.0)
                    * config.max_log_gamma)
    low, high = jnp.min(image), jnp.max(image)
    span = jnp.maximum(high - low, 1e-6)
    image, label = apply(
        "gamma", low + span * ((image - low) / span) ** gamma, label)
  if "noise" in ops:
    image, label = apply("noise", image + config.noise_std * jax.random.normal(
        k["noise"], image.shape), label)
  return image, label


def ops_table(site_modalities, default: tuple[str, ...],
              by_modality: dict[str, tuple[str, ...]]
              ) -> tuple[tuple[bool, ...], ...]:
  """[sites][len(AUGMENTATIONS)] which transforms each site's examples get:
  its modality's entry of `by_modality`, else `default`."""
  return tuple(tuple(op in by_modality.get(m.upper(), default)
                     for op in AUGMENTATIONS) for m in site_modalities)


def multiplicity_loss(loss_fn: Callable[[PyTree, dict], jax.Array],
                      copies: int, config: AugmentConfig = AugmentConfig()
                      ) -> Callable[[PyTree, dict], jax.Array]:
  """`(params, example) -> []`: the mean of `loss_fn` over `copies`
  augmented copies of the example when it carries a `KEY_LEAF` (raw key
  data [2] uint32), else `loss_fn` itself (evaluation, the attack)."""
  if copies < 1:
    raise ValueError(f"copies must be >= 1, got {copies}.")

  def loss(params, example):
    if KEY_LEAF not in example:
      return loss_fn(params, example)
    rest = {k: v for k, v in example.items()
            if k not in (KEY_LEAF, OPS_LEAF)}
    key = jax.random.wrap_key_data(example[KEY_LEAF])
    enabled = example.get(OPS_LEAF)

    def one(copy_key):
      image, label = augment_slice(rest["image"], rest["label"], copy_key,
                                   config, enabled)
      return loss_fn(params, {**rest, "image": image, "label": label})

    return jnp.mean(jax.vmap(one)(jax.random.split(key, copies)))

  return loss


def with_augment_keys(examples: dict, key: jax.Array,
                      enabled: jax.Array | None = None) -> dict:
  """`examples` (leaves [*lead, ...], images [*lead, H, W, C]) with a fresh
  `KEY_LEAF` [*lead, 2] per example, split from `key`, and with `enabled`
  ([len(AUGMENTATIONS)] bool) as every example's `OPS_LEAF`."""
  lead = examples["image"].shape[:-3]
  keys = jax.random.split(key, math.prod(lead))
  out = {**examples,
         KEY_LEAF: jax.random.key_data(keys).reshape(lead + (-1,))}
  if enabled is not None:
    out[OPS_LEAF] = jnp.broadcast_to(jnp.asarray(enabled, bool),
                                     lead + (len(AUGMENTATIONS),))
  return out

"""Soft Dice + cross-entropy (the nnU-Net pair), per example and masked.

`dice_ce_loss` is the loss of ONE example (no batch axis), which is what
per-example clipping differentiates; `batch_dice_ce_loss` maps it over a
batch and zeroes padded examples.
"""

import jax
import jax.numpy as jnp
import optax


def _target(label: jax.Array, k: int) -> jax.Array:
  """[..., K] class probabilities: one-hot of int `label` [...], or `label`
  itself when it is already a float [..., K] (soft labels, e.g. a mask an
  attack optimises)."""
  if jnp.issubdtype(label.dtype, jnp.floating):
    return label.astype(jnp.float32)
  return jax.nn.one_hot(label, k, dtype=jnp.float32)


def soft_dice_loss(logits: jax.Array, label: jax.Array, *,
                   include_background: bool = False,
                   smooth: float = 1e-5) -> jax.Array:
  """1 - mean soft Dice over classes, for one example.

  Args:
    logits: [..., K] float logits (spatial dims then classes).
    label: [...] int class indices (or [..., K] float class probabilities).
    include_background: average over class 0 too.
    smooth: added to numerator and denominator; a class absent from both the
      label and the (soft) prediction then scores Dice ~1 (loss ~0).

  Returns:
    Scalar float32 loss in [0, 1].
  """
  k = logits.shape[-1]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = _target(label, k)
  axes = tuple(range(probs.ndim - 1))
  intersection = jnp.sum(probs * onehot, axis=axes)
  total = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = (2.0 * intersection + smooth) / (total + smooth)
  if not include_background:
    dice = dice[1:]
  return 1.0 - jnp.mean(dice)


def cross_entropy_loss(logits: jax.Array, label: jax.Array,
                       class_weights: jax.Array | None = None) -> jax.Array:
  """Mean (optionally class-weighted) pixel cross-entropy, one example
  (`label` int [...] or float class probabilities [..., K])."""
  logits = logits.astype(jnp.float32)
  if jnp.issubdtype(label.dtype, jnp.floating):
    target = _target(label, logits.shape[-1])
    ce = optax.softmax_cross_entropy(logits, target)
    if class_weights is None:
      return jnp.mean(ce)
    w = target @ jnp.asarray(class_weights, jnp.float32)
    return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-8)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits, label.astype(jnp.int32))
  if class_weights is None:
    return jnp.mean(ce)
  w = jnp.asarray(class_weights, jnp.float32)[label]
  return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1e-8)


def dice_ce_loss(logits: jax.Array, label: jax.Array, *,
                 class_weights: jax.Array | None = None,
                 dice_weight: float = 1.0, ce_weight: float = 1.0) -> jax.Array:
  """`dice_weight * soft Dice + ce_weight * CE` of one example (scalar).

  Example:
    >>> import jax.numpy as jnp
    >>> label = jnp.array([[0, 1], [1, 2]])
    >>> perfect = 20.0 * jax.nn.one_hot(label, 3) - 10.0
    >>> float(dice_ce_loss(perfect, label)) < 1e-3
    True
  """
  return dice_weight * soft_dice_loss(logits, label) + ce_weight * (
      cross_entropy_loss(logits, label, class_weights))


def batch_dice_ce_loss(logits: jax.Array, labels: jax.Array,
                       mask: jax.Array | None = None, **kwargs) -> jax.Array:
  """[B] per-example losses; 0 where `mask` ([B] bool) is False."""
  losses = jax.vmap(lambda lg, lb: dice_ce_loss(lg, lb, **kwargs))(logits,
                                                                   labels)
  if mask is None:
    return losses
  return jnp.where(mask, losses, 0.0)

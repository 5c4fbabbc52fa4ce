"""Tests for fedjax_seg.models.losses."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg.models import losses


def test_soft_dice_by_hand():
  # Two pixels, two classes; probabilities 0.5 everywhere.
  logits = jnp.zeros((2, 2))
  label = jnp.array([1, 0])
  # Class 1: intersection 0.5, sum probs 1.0 + sum onehot 1 -> dice 0.5.
  np.testing.assert_allclose(losses.soft_dice_loss(logits, label, smooth=0.0),
                             0.5, rtol=1e-6)
  np.testing.assert_allclose(
      losses.soft_dice_loss(logits, label, include_background=True,
                            smooth=0.0), 0.5, rtol=1e-6)


def test_perfect_prediction_has_near_zero_loss_and_ce_matches_optax():
  label = jax.random.randint(jax.random.key(0), (8, 8), 0, 3)
  perfect = 30.0 * jax.nn.one_hot(label, 3) - 15.0
  assert float(losses.dice_ce_loss(perfect, label)) < 1e-4
  logits = jax.random.normal(jax.random.key(1), (8, 8, 3))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, label).mean()
  np.testing.assert_allclose(losses.cross_entropy_loss(logits, label), ce,
                             rtol=1e-6)


def test_class_weights():
  logits = jax.random.normal(jax.random.key(1), (4, 4, 3))
  label = jnp.zeros((4, 4), jnp.int32).at[0].set(2)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, label)
  w = jnp.array([1.0, 1.0, 5.0])[label]
  np.testing.assert_allclose(
      losses.cross_entropy_loss(logits, label, jnp.array([1.0, 1.0, 5.0])),
      jnp.sum(ce * w) / jnp.sum(w), rtol=1e-6)


def test_batch_loss_is_per_example_and_masked():
  logits = jax.random.normal(jax.random.key(2), (3, 4, 4, 3))
  labels = jax.random.randint(jax.random.key(3), (3, 4, 4), 0, 3)
  out = jax.jit(losses.batch_dice_ce_loss)(logits, labels,
                                           jnp.array([True, False, True]))
  assert out.shape == (3,) and float(out[1]) == 0.0
  np.testing.assert_allclose(out[2], losses.dice_ce_loss(logits[2], labels[2]),
                             rtol=1e-6)
  # Changing a padded example changes nothing, gradient included.
  grad = jax.jit(jax.grad(lambda lg: losses.batch_dice_ce_loss(
      lg, labels, jnp.array([True, False, True])).sum()))(logits)
  assert float(jnp.abs(grad[1]).max()) == 0.0

"""Tests for fedjax_seg.metrics against hand-computed and SciPy values."""

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import distance

from fedjax_seg import metrics


def _logits(pred, k=3):
  return jax.nn.one_hot(jnp.asarray(pred), k) * 10.0


def test_dice_and_iou_by_hand():
  label = jnp.array([[[0, 1, 1, 0], [0, 1, 2, 0]]])
  pred = jnp.array([[[0, 1, 0, 0], [1, 1, 2, 2]]])
  scores = metrics.per_example_scores(_logits(pred), label)
  # Class 1: |P|=3, |T|=3, I=2 -> Dice 4/6, IoU 2/4. Class 2: |P|=2, |T|=1, I=1.
  np.testing.assert_allclose(scores["dice"][0, 1:], [4 / 6, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(scores["iou"][0, 1:], [0.5, 0.5], rtol=1e-6)


def test_empty_cases_are_defined():
  label = jnp.zeros((1, 4, 4), jnp.int32)
  scores = metrics.per_example_scores(_logits(label), label)
  np.testing.assert_array_equal(scores["dice"], [[1.0, 1.0, 1.0]])
  missed = jnp.zeros((1, 4, 4), jnp.int32).at[0, 0, 0].set(2)
  scores = metrics.per_example_scores(_logits(label), missed)
  assert float(scores["dice"][0, 2]) == 0.0 and float(scores["iou"][0, 2]) == 0


def _numpy_dice(pred, label, k):
  out = []
  for c in range(k):
    p, t = pred == c, label == c
    denom = p.sum() + t.sum()
    out.append(1.0 if denom == 0 else 2 * (p & t).sum() / denom)
  return np.array(out)


def test_against_independent_numpy_and_per_site_masking():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (2, 5, 6, 6))
  preds = np.where(rng.uniform(size=labels.shape) < 0.7, labels,
                   rng.integers(0, 3, labels.shape))
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  scores = jax.vmap(metrics.per_example_scores)(_logits(preds),
                                                jnp.asarray(labels))
  ref = np.array([[_numpy_dice(preds[s, m], labels[s, m], 3) for m in range(5)]
                  for s in range(2)])
  np.testing.assert_allclose(scores["dice"], ref, rtol=1e-6)
  site = metrics.per_site(scores["dice"], jnp.asarray(mask))
  np.testing.assert_allclose(site[0], ref[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(site[1], ref[1].mean(0), rtol=1e-6)
  # Padding never changes a metric, whatever it holds.
  garbage = scores["dice"].at[0, 3:].set(123.0)
  np.testing.assert_allclose(metrics.per_site(garbage, jnp.asarray(mask)),
                             site)
  modality = metrics.per_modality(scores["dice"], jnp.asarray(mask),
                                  jnp.array([1, 1]), 2)
  assert np.isnan(modality[0]).all()
  np.testing.assert_allclose(
      modality[1], np.concatenate([ref[0, :3], ref[1]]).mean(0), rtol=1e-6)
  np.testing.assert_allclose(metrics.mean_foreground(site),
                             site[:, 1:].mean(-1), rtol=1e-6)


def _brute_hd95(a, b):
  from scipy import ndimage
  sa = np.argwhere(a & ~ndimage.binary_erosion(a, border_value=0))
  sb = np.argwhere(b & ~ndimage.binary_erosion(b, border_value=0))
  d = distance.cdist(sa, sb)
  return np.percentile(np.concatenate([d.min(1), d.min(0)]), 95)


def test_hd95_against_brute_force_and_edge_cases():
  rng = np.random.default_rng(1)
  for _ in range(5):
    a = np.zeros((20, 20), bool)
    b = np.zeros((20, 20), bool)
    x, y = rng.integers(3, 12, 2)
    a[x:x + 6, y:y + 5] = True
    x, y = rng.integers(3, 12, 2)
    b[x:x + 4, y:y + 7] = True
    np.testing.assert_allclose(metrics.hd95(a, b), _brute_hd95(a, b),
                               rtol=1e-9)
  empty = np.zeros((6, 8), bool)
  assert metrics.hd95(empty, empty) == 0.0
  assert metrics.hd95(a[:6, :8] | True, empty) == 10.0  # 6-8-10 diagonal.
  square = np.zeros((10, 10), bool)
  square[2:5, 2:5] = True
  assert metrics.hd95(square, square) == 0.0
  shifted = np.roll(square, 2, axis=0)
  assert metrics.hd95(square, shifted, spacing=(2.0, 1.0)) == 4.0


def test_hd95_per_site_ignores_padding():
  labels = np.zeros((1, 3, 8, 8), np.int64)
  labels[0, :, 2:5, 2:5] = 1
  logits = np.asarray(_logits(labels, 2))
  mask = np.array([[True, True, False]])
  logits_garbage = logits.copy()
  logits_garbage[0, 2] = np.asarray(_logits(np.zeros((8, 8), int), 2))
  np.testing.assert_array_equal(
      metrics.hd95_per_site(logits, labels, mask),
      metrics.hd95_per_site(logits_garbage, labels, mask))
  assert metrics.hd95_per_site(logits, labels, mask)[0, 0] == 0.0

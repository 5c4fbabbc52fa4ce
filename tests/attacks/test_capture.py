"""The updates the attack study captures: exactly the engine's releases."""

import jax
from jax import flatten_util
import numpy as np
import pytest

from fedjax_seg import models
from fedjax_seg.segmentation import task as segmentation_task
from fedjax_seg.attacks import capture
from fedjax_seg.attacks import gradient_inversion
from fedjax_seg.models import unet


def _setup(batch=3, size=8):
  model = models.SegmentationModel(unet.UNetConfig(widths=(4,), groups=2))
  params = model.init(jax.random.key(0), (1, size, size, 1))
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(batch, size, size, 1)).astype(np.float32)
  labels = rng.integers(0, 2, size=(batch, size, size)).astype(np.int32)
  return segmentation_task.example_loss(model), params, images, labels


def _flat(tree):
  return np.asarray(flatten_util.ravel_pytree(tree)[0], np.float64)


@pytest.mark.slow
def test_nodp_is_the_mean_gradient():
  loss, params, x, y = _setup()
  got = _flat(capture.capture_update(loss, params, x, y, "nodp"))
  want = np.asarray(gradient_inversion.gradient_of(loss, params, x, y))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_clipping_bounds_per_slice_and_per_patient_without_noise():
  loss, params, x, y = _setup(batch=3)
  key = jax.random.key(1)
  per_slice = [_flat(capture.capture_update(loss, params, x[i:i + 1],
                                            y[i:i + 1], "nodp"))
               for i in range(3)]
  clip = 0.2 * min(np.linalg.norm(g) for g in per_slice)  # all clipped
  example = 3 * _flat(capture.capture_update(
      loss, params, x, y, "example", l2_clip_norm=clip, noise_multiplier=0.0,
      noise_key=key))
  # Each slice's gradient rescaled to norm C, then summed (B * release).
  np.testing.assert_allclose(
      example, sum(clip * g / np.linalg.norm(g) for g in per_slice),
      rtol=1e-4, atol=1e-7)
  patient = 3 * _flat(capture.capture_update(
      loss, params, x, y, "patient", l2_clip_norm=clip, noise_multiplier=0.0,
      noise_key=key))
  # One unit: the mean gradient of the three slices, rescaled to norm C.
  mean = np.mean(per_slice, axis=0)
  np.testing.assert_allclose(patient, clip * mean / np.linalg.norm(mean),
                             rtol=1e-4, atol=1e-7)
  assert np.linalg.norm(patient) <= clip * (1 + 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("setting", ["example", "patient"])
def test_noise_has_std_sigma_c_over_b(setting):
  loss, params, x, y = _setup(batch=2)
  args = dict(l2_clip_norm=0.5, noise_key=jax.random.key(3))
  clean = _flat(capture.capture_update(loss, params, x, y, setting,
                                       noise_multiplier=0.0, **args))
  noisy = _flat(capture.capture_update(loss, params, x, y, setting,
                                       noise_multiplier=2.0, **args))
  noise = noisy - clean
  want = 2.0 * 0.5 / 2  # sigma * C / B
  # n coordinates: the sample std is within 5 standard errors.
  tolerance = 5 * want / np.sqrt(2 * noise.size)
  assert abs(noise.std() - want) < tolerance, (noise.std(), want)
  assert abs(noise.mean()) < 5 * want / np.sqrt(noise.size)


def test_bad_arguments_are_refused():
  loss, params, x, y = _setup(batch=1)
  with pytest.raises(ValueError, match="setting"):
    capture.capture_update(loss, params, x, y, "record")
  with pytest.raises(ValueError, match="noise_key"):
    capture.capture_update(loss, params, x, y, "example",
                           noise_multiplier=1.0)
  with pytest.raises(ValueError, match="l2_clip_norm"):
    capture.capture_update(loss, params, x, y, "patient", l2_clip_norm=0.0,
                           noise_key=jax.random.key(0))

"""Image metrics on known pairs."""

import numpy as np
import pytest

from fedjax_seg.attacks import image_metrics


def _image(seed=0, size=32):
  yy, xx = np.mgrid[:size, :size] / size
  rng = np.random.default_rng(seed)
  img = 0.5 + 0.3 * np.sin(6 * xx + rng.uniform(0, 3)) * np.cos(4 * yy)
  return img[None, :, :, None].astype(np.float32)


def test_identical_images():
  a = _image()
  assert float(image_metrics.ssim(a, a)[0]) == pytest.approx(1.0, abs=1e-6)
  assert float(image_metrics.mse(a, a)[0]) == 0.0
  assert np.isinf(float(image_metrics.psnr(a, a)[0]))


def test_independent_noise_has_ssim_near_zero():
  rng = np.random.default_rng(0)
  a, b = (rng.uniform(size=(4, 64, 64, 1)).astype(np.float32)
          for _ in range(2))
  assert np.all(np.abs(np.asarray(image_metrics.ssim(a, b))) < 0.05)


def test_constant_shift_matches_the_closed_form():
  """x and x + c with x constant mu: contrast and structure terms are 1
  (zero variances, C2 / C2), so SSIM = (2 mu (mu + c) + C1) / (mu^2 +
  (mu + c)^2 + C1) with C1 = (0.01 L)^2 (Wang et al. 2004, eq. 13), and
  PSNR = 10 log10(L^2 / c^2)."""
  mu, c = 0.3, 0.2
  a = np.full((1, 32, 32, 1), mu, np.float32)
  b = a + c
  c1 = 0.01 ** 2
  expected = (2 * mu * (mu + c) + c1) / (mu ** 2 + (mu + c) ** 2 + c1)
  assert float(image_metrics.ssim(a, b)[0]) == pytest.approx(expected,
                                                             rel=1e-4)
  assert float(image_metrics.psnr(a, b)[0]) == pytest.approx(
      10 * np.log10(1 / c ** 2), rel=1e-4)
  # Float32 means over 1024 pixels: 1.4e-5 off on some CPUs.
  assert float(image_metrics.mse(a, b)[0]) == pytest.approx(c ** 2, rel=1e-4)


@pytest.mark.slow
def test_reconstructions_are_matched_to_their_images():
  targets = np.concatenate([_image(s) for s in range(3)])
  rng = np.random.default_rng(1)
  noisy = targets + 0.02 * rng.normal(size=targets.shape).astype(np.float32)
  shuffled = noisy[[2, 0, 1]]
  out = image_metrics.matched_metrics(shuffled, targets)
  np.testing.assert_array_equal(out["match"], [1, 2, 0])
  assert np.all(out["ssim"] > 0.9) and out["psnr"].shape == (3,)

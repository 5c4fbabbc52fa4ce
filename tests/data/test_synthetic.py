"""Tests for fedjax_seg.data.synthetic."""

import dataclasses

import numpy as np
import pytest

from fedjax_seg.data import synthetic

SMALL = synthetic.SyntheticConfig(image_size=24, num_slices=4,
                                  patients_scale=0.0625)


def test_deterministic_in_the_seed():
  a, b = synthetic.generate(SMALL), synthetic.generate(SMALL)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.label, b.label)
  c = synthetic.generate(dataclasses.replace(SMALL, seed=1))
  assert not np.array_equal(a.image, c.image)


def test_more_patients_leave_existing_patients_unchanged():
  small = synthetic.generate(SMALL)
  large = synthetic.generate(dataclasses.replace(SMALL, patients_scale=0.125))
  for name in small.patient_names[:3] + small.patient_names[-2:]:
    i = small.patient_names.index(name)
    j = large.patient_names.index(name)
    np.testing.assert_array_equal(small.image[small.patient == i],
                                  large.image[large.patient == j])


def test_default_sites_modalities_and_ragged_sizes():
  config = synthetic.SyntheticConfig()
  data = synthetic.generate(dataclasses.replace(config, image_size=16,
                                                num_slices=2))
  assert data.num_sites == 8
  assert set(data.site_modalities) == {"CT", "MRI", "XRAY"}
  patients = [config.num_patients(s) for s in range(8)]
  assert min(patients) == 32 and max(patients) == 240
  assert data.class_names == ("background", "organ", "lesion")
  assert set(np.unique(data.label)) == {0, 1, 2}
  assert np.isfinite(data.image).all()
  # X-ray patients give one projection, CT/MRI patients num_slices slices.
  for s, modality in enumerate(data.site_modalities):
    per_patient = np.bincount(data.patient[data.site == s])
    per_patient = per_patient[per_patient > 0]
    assert set(per_patient) == ({1} if modality == "XRAY" else {2})


def test_sites_show_domain_shift():
  data = synthetic.generate(SMALL)
  by_site = {}
  for s, name in enumerate(data.site_names):
    sel = data.site == s
    organ = data.image[sel][data.label[sel] == 1]
    by_site[name] = (float(organ.mean()), float(data.image[sel].std()))
  # The organ looks different per modality, and per scanner within one.
  assert by_site["mri_t1_1p5t"][0] < 0.5 < by_site["ct_scanner_a"][0]
  assert abs(by_site["ct_scanner_a"][0] - by_site["ct_scanner_b"][0]) > 0.02
  assert abs(by_site["xray_digital"][0] - by_site["xray_film"][0]) > 0.02
  lesion_share = {n: st["class_fraction"]["lesion"]
                  for n, st in data.site_stats().items()}
  positive = [v for v in lesion_share.values() if v > 0]
  assert max(positive) > 5 * min(positive)  # Class balance differs by site.


def test_ct_images_are_windowed_and_mri_z_scored():
  data = synthetic.generate(SMALL)
  ct = data.image[data.modality == 0]
  mri = data.image[data.modality == 1]
  assert ct.min() >= 0.0 and ct.max() <= 1.0
  assert mri.min() < -1.0  # z-scored: background air well below the mean.


def test_bad_configs_are_refused():
  with pytest.raises(ValueError, match="image_size"):
    synthetic.SyntheticConfig(image_size=8)
  with pytest.raises(ValueError, match="modality"):
    synthetic.SiteSpec("x", "PET", 3)
  with pytest.raises(ValueError, match="unique"):
    synthetic.SyntheticConfig(sites=(synthetic.SiteSpec("a", "CT", 2),) * 2)


def test_xray_ray_sampling_keeps_the_projection(monkeypatch):
  # Above XRAY_RAY_SAMPLES pixels an X-ray is projected from a volume with
  # fewer samples along each ray than pixels; its labels and intensities must
  # match the full-cube projection's statistics.
  config = synthetic.SyntheticConfig(image_size=48)
  site = [s.modality for s in config.sites].index("XRAY")
  def stats():
    labels, means = [], []
    for patient in range(6):
      image, label = synthetic.patient_volume(config, site, patient)
      assert image.shape == label.shape == (1, 48, 48)
      labels.append(np.bincount(label.ravel(), minlength=3) / label.size)
      means.append(image.mean())
    return np.mean(labels, 0), np.mean(means)
  sampled_labels, sampled_mean = stats()
  monkeypatch.setattr(synthetic, "XRAY_RAY_SAMPLES", 48)
  cube_labels, cube_mean = stats()
  np.testing.assert_allclose(sampled_labels, cube_labels, atol=0.03)
  assert abs(sampled_mean - cube_mean) < 0.05
  assert sampled_labels[1] > 0.03  # An organ is there to compare.

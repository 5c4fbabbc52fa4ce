"""Synthetic patients written as NIfTI come back through data_prep as the
same slices (CT exactly, MRI up to the z-score, labels exactly)."""

import csv

import numpy as np
import pytest

from fedjax_seg.data import export
from fedjax_seg.data import nifti
from fedjax_seg.data import prepare
from fedjax_seg.data import synthetic
from fedjax_seg.data import tfds_io


def test_exported_cases_prepare_back_to_the_synthetic_slices(tmp_path):
  config = synthetic.SyntheticConfig(image_size=16, num_slices=4,
                                     patients_scale=0.05)
  sites = ("ct_scanner_a", "mri_t1_1p5t", "xray_digital")
  path = export.write_nifti_cases(tmp_path / "nii", config, sites)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  index = {s.name: k for k, s in enumerate(config.sites)}
  assert len(rows) == sum(config.num_patients(index[s]) for s in sites)
  prepare.prepare_dataset(
      str(path), str(tmp_path / "data"), "exported",
      nifti.PreprocessConfig(image_size=(16, 16),
                             background_slice_fraction=1.0),
      None, class_names=["background", "organ", "lesion"])
  data = tfds_io.load("exported", str(tmp_path / "data"))["train"]
  assert data.site_names == sites
  for s, name in enumerate(sites):
    k = index[name]
    got = data.patient[data.site == s]
    assert len(np.unique(got)) == config.num_patients(k)
    # Patient 0 of the site, slice by slice.
    image, label = synthetic.patient_volume(config, k, 0)
    first = data.patient_names.index(f"{name}_p000")
    rows_of = np.flatnonzero(data.patient == first)
    order = rows_of[np.argsort(data.slice_index[rows_of])]
    np.testing.assert_array_equal(data.label[order], label)
    if name.startswith("ct"):
      np.testing.assert_allclose(data.image[order, ..., 0], image, atol=1e-5)
    elif name.startswith("mri"):
      # Re-z-scored over the foreground (positive voxels): the same image
      # up to an affine map.
      corr = np.corrcoef(data.image[order, ..., 0].ravel(), image.ravel())
      assert corr[0, 1] > 0.999


def test_unknown_site_is_refused(tmp_path):
  with pytest.raises(ValueError, match="unknown synthetic sites"):
    export.write_nifti_cases(tmp_path, sites=("nowhere",))

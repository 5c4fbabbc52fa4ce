"""Tests for fedjax_seg.data.nifti on small NIfTI files written here."""

import numpy as np
import pytest

from fedjax_seg.data import nifti
from tests.data import fixtures

CONFIG = nifti.PreprocessConfig(image_size=(32, 32),
                                background_slice_fraction=1.0)


def _case(tmp_path, image, label, image_affine=None, label_affine=None):
  img = fixtures.save(tmp_path / "img.nii.gz", image, image_affine)
  lbl = fixtures.save(tmp_path / "lbl.nii.gz", label, label_affine)
  return nifti.CaseRef(str(img), str(lbl), "p0", modality="CT")


def test_load_case_shapes_window_and_labels(tmp_path):
  image, label = fixtures.volume_pair(0)
  out_image, out_label = nifti.load_case(_case(tmp_path, image, label), CONFIG,
                                         allowed_labels=[0, 1, 2])
  assert out_image.shape == (fixtures.SHAPE[2], 32, 32, 1)
  assert out_label.shape == (fixtures.SHAPE[2], 32, 32)
  assert out_image.dtype == np.float32 and out_label.dtype == np.uint8
  assert 0.0 <= out_image.min() and out_image.max() <= 1.0
  # Padding keeps every labelled voxel.
  assert np.bincount(out_label.ravel(), minlength=3)[1:].tolist() == \
      np.bincount(label.ravel(), minlength=3)[1:].tolist()


def test_reorientation_to_ras(tmp_path):
  image, label = fixtures.volume_pair(1)
  ras = nifti.load_case(_case(tmp_path / "a", image, label), CONFIG)
  # The same volume stored left-right and anterior-posterior flipped (LPS).
  flip = np.diag([-1.0, -1.0, 1.0, 1.0]) @ fixtures.affine()
  lps = nifti.load_case(_case(tmp_path / "b", image[::-1, ::-1],
                              label[::-1, ::-1], flip, flip), CONFIG)
  np.testing.assert_allclose(ras[0], lps[0], atol=1e-6)
  np.testing.assert_array_equal(ras[1], lps[1])


def test_resampling_to_target_spacing(tmp_path):
  image, label = fixtures.volume_pair(2)
  config = nifti.PreprocessConfig(image_size=(48, 48),
                                  target_spacing=(0.5, 0.5, 5.0),
                                  background_slice_fraction=1.0)
  out_image, out_label = nifti.load_case(_case(tmp_path, image, label), config)
  assert out_image.shape[0] == 3  # 6 slices of 2.5 mm -> 3 of 5 mm.
  # In-plane 24 x 20 voxels at 1 mm -> 48 x 40 at 0.5 mm (then padded).
  assert (out_label[:, :, :4] == 0).all() and (out_label[:, :, -4:] == 0).all()
  assert set(np.unique(out_label)) <= {0, 1, 2}


def test_mri_z_score_and_generic_percentiles():
  volume = np.zeros((10, 10, 4))
  volume[2:8, 2:8] = np.random.default_rng(0).uniform(100, 200, (6, 6, 4))
  mri = nifti.normalize(volume, "MRI", CONFIG)
  assert abs(mri[volume > 0].mean()) < 1e-5 and abs(mri[volume > 0].std()
                                                    - 1) < 1e-4
  generic = nifti.normalize(volume, "generic", CONFIG)
  assert generic.min() == 0.0 and generic.max() == 1.0
  assert nifti.normalization_for("T2") == "MRI"
  assert nifti.normalization_for("ct") == "CT"


def test_background_slices_and_label_map(tmp_path):
  image, label = fixtures.volume_pair(3)
  label[..., 0] = 0  # One slice without foreground... at least.
  case = _case(tmp_path, image, label)
  none = nifti.PreprocessConfig(image_size=(32, 32),
                                background_slice_fraction=0.0)
  _, out_label = nifti.load_case(case, none)
  kept = nifti.select_slices(out_label, none, "p0")
  assert all(out_label[k].any() for k in kept)
  assert len(kept) < out_label.shape[0]
  merged = nifti.PreprocessConfig(image_size=(32, 32), label_map={2: 1})
  _, merged_label = nifti.load_case(case, merged, allowed_labels=[0, 1, 2])
  assert set(np.unique(merged_label)) == {0, 1}


@pytest.mark.parametrize("problem,match,culprit", [
    ("unreadable", "not a readable NIfTI", "image"),
    ("shape", "does not match", "label"),
    ("affine", "affine differs", "label"),
    ("nan", "NaN or infinite", "image"),
    ("label_value", r"label values \[7\] are not declared", "label"),
    ("empty", "empty volume", "image"),
])
def test_bad_cases_raise_naming_the_file(tmp_path, problem, match, culprit):
  image, label = fixtures.volume_pair(4)
  image_affine = label_affine = None
  if problem == "shape":
    label = label[:-1]
  elif problem == "affine":
    label_affine = fixtures.affine((1.0, 1.0, 3.0))
  elif problem == "nan":
    image[3, 3, 3] = np.nan
  elif problem == "label_value":
    label[0, 0, 0] = 7
  elif problem == "empty":
    image[:] = 0
  case = _case(tmp_path, image, label, image_affine, label_affine)
  if problem == "unreadable":
    with open(case.image, "wb") as f:
      f.write(b"this is not a nifti file")
  with pytest.raises(nifti.DataError, match=match) as err:
    nifti.load_case(case, CONFIG, allowed_labels=[0, 1, 2])
  assert getattr(case, culprit) in str(err.value)


def test_msd_and_csv_readers(tmp_path):
  root = fixtures.write_msd(tmp_path / "msd", num_cases=3)
  cases, meta = nifti.read_msd(root)
  assert [c.patient for c in cases] == ["case_000", "case_001", "case_002"]
  assert nifti.msd_labels(meta) == [0, 1, 2] and cases[0].modality == "CT"
  csv_path = fixtures.write_csv(tmp_path / "csv", with_split=True)
  rows = nifti.read_csv(csv_path)
  assert {r.site for r in rows} == {"hospital_a", "hospital_b"}
  assert {r.split for r in rows} == {"train", "val", "test"}


def test_reader_errors_name_the_file(tmp_path):
  root = fixtures.write_msd(tmp_path / "msd", num_cases=2)
  (root / "labelsTr" / "case_001.nii.gz").unlink()
  with pytest.raises(nifti.DataError, match="case_001.nii.gz"):
    nifti.read_msd(root)
  (root / "dataset.json").write_text("{not json")
  with pytest.raises(nifti.DataError, match="dataset.json"):
    nifti.read_msd(root)
  bad_csv = tmp_path / "bad.csv"
  bad_csv.write_text("image,label,patient\na,b,c\n")
  with pytest.raises(nifti.DataError, match=r"bad.csv: missing column.*site"):
    nifti.read_csv(bad_csv)

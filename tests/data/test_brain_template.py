"""Tests for fedjax_seg.data.brain_template.

Most tests use a small template written here with nibabel (an ellipsoid
brain: white-matter core, gray-matter shell); one reads the real ICBM 2009a
template from the installed nilearn wheel.
"""

import csv
import os

import nibabel as nib
import numpy as np
import pytest

from fedjax_seg.data import brain_template
from fedjax_seg.data import nifti
from fedjax_seg.data import prepare
from fedjax_seg.data import tfds_io

SHAPE = (40, 48, 30)  # 2 mm voxels: 80 x 96 x 60 mm.
AFFINE = np.array([[2.0, 0, 0, -40.0], [0, 2.0, 0, -50.0],
                   [0, 0, 2.0, -30.0], [0, 0, 0, 1.0]])
SMALL = brain_template.CohortConfig(z_range_mm=(-10.0, 10.0))
SITES = (
    brain_template.ScannerProfile("scanner_a", 3, (4.0, 4.0, 5.0)),
    brain_template.ScannerProfile("scanner_b", 2, (5.0, 5.0, 5.0), gamma=1.3,
                                  noise_std=0.05, orientation="LPS"),
)


def _write_template(root, shape=SHAPE, affine=AFFINE):
  """Writes t1/gm/wm NIfTI files (uint8, like nilearn's) and returns paths."""
  ijk = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  world = [affine[a, a] * ijk[a] + affine[a, 3] for a in range(3)]
  r = np.sqrt((world[0] / 34) ** 2 + (world[1] / 42) ** 2
              + (world[2] / 26) ** 2)
  wm = np.clip((0.6 - r) / 0.1 + 0.5, 0, 1)
  brain = np.clip((0.95 - r) / 0.1 + 0.5, 0, 1)
  gm = np.clip(brain - wm, 0, 1)
  t1 = 0.9 * wm + 0.55 * gm
  paths = {}
  for key, data in (("t1", t1), ("gm", gm), ("wm", wm)):
    paths[key] = root / f"{key}.nii.gz"
    nib.save(nib.Nifti1Image(np.rint(data * 255).astype(np.uint8), affine),
             str(paths[key]))
  return paths


@pytest.fixture(name="template")
def _template(tmp_path):
  paths = _write_template(tmp_path)
  return brain_template.load_template(paths["t1"], paths["gm"], paths["wm"])


def test_patient_shapes_labels_and_grid(template):
  image, label, affine = brain_template.make_patient(template, SITES[0], 0,
                                                     SMALL)
  # 80 x 96 mm at 4 mm in-plane; z from -10 to 10 mm at 5 mm.
  assert image.shape == label.shape == (20, 24, 4)
  assert image.dtype == np.int16 and label.dtype == np.uint8
  assert image.min() >= 0
  assert set(np.unique(label)) == {0, 1, 2}
  np.testing.assert_allclose(np.diag(affine)[:3], (4.0, 4.0, 5.0))
  # Voxel centres sit half a voxel inside the slab.
  np.testing.assert_allclose(affine[:3, 3], (-39.0, -49.0, -7.5))


def test_without_anatomy_or_scanner_effects_the_labels_are_the_template(
    template):
  still = brain_template.CohortConfig(z_range_mm=(-11.0, 9.0),
                                      rotation_deg=0, scale_range=0,
                                      shift_mm=0, warp_mm=0)
  # The template's own grid: z = -10, -8, ... 8 mm are voxels k = (z + 30) / 2.
  profile = brain_template.ScannerProfile("same_grid", 1, (2.0, 2.0, 2.0),
                                          bias_std=0.0, noise_std=0.0)
  image, label, _ = brain_template.make_patient(template, profile, 0, still)
  gm, wm = template.gm[:, :, 10:20], template.wm[:, :, 10:20]
  expected = np.argmax(np.stack([np.clip(1 - gm - wm, 0, 1), gm, wm]), axis=0)
  np.testing.assert_array_equal(label, expected)
  # Intensities are the PSF-blurred T1 in scanner units (gamma 1, no bias,
  # no noise): the white-matter core is brighter than the gray shell.
  assert image[label == 2].mean() > image[label == 1].mean() > 0


def test_patients_are_deterministic_and_distinct(template):
  a0 = brain_template.make_patient(template, SITES[0], 0, SMALL)
  again = brain_template.make_patient(template, SITES[0], 0, SMALL)
  a1 = brain_template.make_patient(template, SITES[0], 1, SMALL)
  other_seed = brain_template.make_patient(
      template, SITES[0], 0,
      brain_template.CohortConfig(z_range_mm=(-10.0, 10.0), seed=1))
  np.testing.assert_array_equal(a0[0], again[0])
  np.testing.assert_array_equal(a0[1], again[1])
  assert not np.array_equal(a0[1], a1[1])  # Anatomy differs per patient.
  assert not np.array_equal(a0[0], other_seed[0])


def test_a_site_is_the_same_whatever_the_other_sites(tmp_path, template):
  both = brain_template.write_cohort(tmp_path / "both", template, SITES, SMALL)
  alone = brain_template.write_cohort(tmp_path / "alone", template, SITES[1:],
                                      SMALL)
  for path in ("scanner_b/scanner_b_0001_t1.nii.gz",
               "scanner_b/scanner_b_0001_seg.nii.gz"):
    np.testing.assert_array_equal(
        np.asarray(nib.load(str(both.parent / path)).dataobj),
        np.asarray(nib.load(str(alone.parent / path)).dataobj))


def test_stored_orientation_reads_back_as_the_ras_patient(tmp_path, template):
  cases = brain_template.write_cohort(tmp_path / "cohort", template, SITES,
                                      SMALL)
  image, label, affine = brain_template.make_patient(template, SITES[1], 1,
                                                     SMALL)
  stored = nib.load(str(cases.parent / "scanner_b/scanner_b_0001_t1.nii.gz"))
  assert nib.aff2axcodes(stored.affine) == ("L", "P", "S")
  data, ras_affine, zooms = nifti.read_nifti(
      cases.parent / "scanner_b/scanner_b_0001_t1.nii.gz")
  np.testing.assert_array_equal(data, image)
  np.testing.assert_allclose(ras_affine, affine, atol=1e-5)
  np.testing.assert_allclose(zooms, (5.0, 5.0, 5.0))
  seg, _, _ = nifti.read_nifti(cases.parent /
                               "scanner_b/scanner_b_0001_seg.nii.gz")
  np.testing.assert_array_equal(seg, label)


def test_cohort_prepares_into_a_dataset(tmp_path, template):
  cases = brain_template.write_cohort(tmp_path / "cohort", template, SITES,
                                      SMALL)
  with open(cases, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5 and {r["modality"] for r in rows} == {"MRI"}
  assert len({r["patient"] for r in rows}) == 5
  path = prepare.prepare_dataset(
      cases, tmp_path / "data", "tiny_brain",
      nifti.PreprocessConfig(image_size=(24, 24), target_spacing=(4, 4, 5)),
      class_names=list(brain_template.CLASS_NAMES))
  stats = tfds_io.read_stats("tiny_brain", tmp_path / "data")
  assert path.is_dir()
  assert stats["class_names"] == list(brain_template.CLASS_NAMES)
  assert set(stats["sites"]) == {"scanner_a", "scanner_b"}


def test_write_cohort_leaves_nothing_on_failure(tmp_path, template):
  class Boom:

    def __init__(self):
      self.calls = 0

    def update(self, n):
      self.calls += n
      if self.calls == 3:
        raise RuntimeError("interrupted")

  with pytest.raises(RuntimeError, match="interrupted"):
    brain_template.write_cohort(tmp_path / "cohort", template, SITES, SMALL,
                                progress=Boom())
  assert os.listdir(tmp_path) == [name for name in os.listdir(tmp_path)
                                  if name in ("t1.nii.gz", "gm.nii.gz",
                                              "wm.nii.gz")]
  brain_template.write_cohort(tmp_path / "cohort", template, SITES, SMALL)
  with pytest.raises(FileExistsError, match="cohort"):
    brain_template.write_cohort(tmp_path / "cohort", template, SITES, SMALL)


def test_template_errors_name_the_file(tmp_path):
  paths = _write_template(tmp_path)
  other = tmp_path / "other"
  other.mkdir()
  off_grid = _write_template(other, shape=(20, 24, 15),
                             affine=np.diag([4.0, 4.0, 4.0, 1.0]))
  with pytest.raises(nifti.DataError, match="wm.nii.gz: not on the grid"):
    brain_template.load_template(paths["t1"], paths["gm"], off_grid["wm"])
  with pytest.raises(ValueError, match="all of t1, gm and wm"):
    brain_template.load_template(paths["t1"])
  broken = tmp_path / "broken.nii.gz"
  broken.write_bytes(b"not a nifti")
  with pytest.raises(nifti.DataError, match="broken.nii.gz"):
    brain_template.load_template(broken, paths["gm"], paths["wm"])


def test_the_real_icbm_template_from_nilearn():
  template = brain_template.load_template()
  assert template.t1.shape == template.gm.shape == (197, 233, 189)
  assert "ICBM 2009a" in template.source
  assert float((template.gm + template.wm).max()) <= 1.0 + 1e-2
  image, label, _ = brain_template.make_patient(template,
                                                brain_template.SITES[3], 0)
  assert image.shape == (98, 116, 8)
  fractions = np.bincount(label.ravel(), minlength=3) / label.size
  # An axial brain slab: about a fifth of the voxels each gray and white
  # matter (measured 0.21 and 0.18), the rest background and CSF.
  assert 0.1 < fractions[1] < 0.35 and 0.1 < fractions[2] < 0.35
  # White matter is brighter than gray matter on T1.
  assert image[label == 2].mean() > image[label == 1].mean()

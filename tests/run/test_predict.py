"""Tests for fedjax_seg.run.predict and experiments/predict.py: segmenting new
NIfTI scans with a trained run's model, on files the tests write."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import nibabel as nib
import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import loop
from fedjax_seg import models
from fedjax_seg.run import predict
from fedjax_seg.run import state as state_lib
from fedjax_seg.data import export
from fedjax_seg.data import nifti
from fedjax_seg.data import prepare
from fedjax_seg.data import synthetic

REPO = pathlib.Path(__file__).resolve().parents[2]
SYNTH = synthetic.SyntheticConfig(image_size=32, num_slices=4,
                                  patients_scale=0.15)
SITES = ("ct_scanner_a", "ct_scanner_b")
# Resampled from the export's 1 x 1 x 2.5 mm: slices of 26 x 26 px, padded.
PREP = nifti.PreprocessConfig(image_size=(32, 32),
                              target_spacing=(1.25, 1.25, 2.5),
                              background_slice_fraction=1.0)


def _oblique_flipped_affine(spacing, degrees=4.0):
  """Axes permuted (file x is S, y is L->R flipped, z is A), a small
  rotation about S, anisotropic voxels: the closest RAS axes still map
  every file axis to one patient axis."""
  t = np.deg2rad(degrees)
  rotation = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                       [0, 0, 1]])
  axes = np.array([[0, -1, 0], [0, 0, 1], [1, 0, 0]], float)  # RAS <- ijk
  affine = np.eye(4)
  affine[:3, :3] = rotation @ axes @ np.diag(spacing)
  affine[:3, 3] = (-20.0, 15.0, -7.0)
  return affine


def _store_like(volume_dxy: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """A [D, rows, cols] synthetic volume laid out on the axes of
  `_oblique_flipped_affine`'s file, so that it reads back (in RAS, rows
  along R, cols along A, slices along S) as the export would."""
  ras = np.transpose(volume_dxy, (1, 2, 0))  # x = row, y = col, z = slice
  ornt = nib.orientations.io_orientation(affine)
  back = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")), ornt)
  return nib.orientations.apply_orientation(ras, back)


def _held_out_ct(tmp, site=0, patient=1000):
  """A CT patient no run has seen (its own seed), stored in HU on an
  oblique, flipped, permuted grid with anisotropic voxels."""
  image, label = synthetic.patient_volume(SYNTH, site, patient)
  lo, hi = synthetic.CT_WINDOW
  affine = _oblique_flipped_affine((2.5, 1.0, 1.0))
  paths = []
  for kind, volume, dtype in (("image", image * (hi - lo) + lo, np.int16),
                              ("label", label, np.uint8)):
    path = tmp / f"held_out_{kind}.nii.gz"
    data = _store_like(volume, affine).astype(dtype)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    paths.append(path)
  return paths


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A non-private run on a prepared two-site CT dataset (exported from the
  synthetic generator, resampled by data_prep.prepare)."""
  root = tmp_path_factory.mktemp("predict")
  cases = export.write_nifti_cases(root / "cases", SYNTH, sites=SITES)
  prepare.prepare_dataset(cases, root / "data", "predict_ct", PREP,
                          class_names=list(synthetic.CLASS_NAMES))
  config = C.ExperimentConfig(
      data=C.DataConfig(dataset="predict_ct", data_dir=str(root / "data")),
      privacy=C.PrivacyConfig(enabled=False),
      federated=C.FederatedConfig(rounds=8, local_steps=4, batch_size=4,
                                  learning_rate=0.01, local_optimizer="adam",
                                  ema_decay=0.0),
      eval_every=100, checkpoint_every=4)
  loop.train_and_evaluate(config, root / "run")
  return root


def test_preprocessing_is_prepares_and_geometry_is_undone(tmp_path):
  image_path, label_path = _held_out_ct(tmp_path)
  img = nib.load(str(image_path))
  data = img.get_fdata()[..., None]
  slices, geometry = predict.preprocess(img, data, PREP, "CT")
  # Exactly what data_prep.prepare makes of the file.
  want, want_label = nifti.load_case(
      nifti.CaseRef(str(image_path), str(label_path), "p"), PREP,
      modality="CT")
  np.testing.assert_allclose(slices, want, atol=1e-6)
  assert geometry.shape == img.shape
  x, y, z = geometry.canonical_shape  # Resampled (slices along z):
  assert geometry.sliced_shape != (z, x, y)
  # One-hot of the preprocessed labels, mapped back, is the file's label
  # (up to the nearest/linear resampling at boundaries).
  probs = np.eye(3, dtype=np.float32)[want_label]
  back = predict.restore_geometry(probs, geometry, PREP)
  label = np.asarray(nib.load(str(label_path)).dataobj)
  assert back.shape == label.shape + (3,)
  np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
  agreement = np.mean(back.argmax(-1) == label)
  assert agreement > 0.97, agreement
  # The last plane of an axis resampled back gets its probabilities too
  # (no zeros read from past the edge).
  edge = nib.Nifti1Image(np.ones((26, 26, 26), np.float32),
                         np.diag([0.75, 0.75, 0.75, 1.0]))
  spacing = dataclasses.replace(PREP, target_spacing=(1.3, 1.3, 1.3),
                                image_size=(16, 16))
  slices, geometry = predict.preprocess(edge, np.ones((26, 26, 26, 1)),
                                        spacing, "CT")
  back = predict.restore_geometry(
      np.eye(3, dtype=np.float32)[np.ones(slices.shape[:3], int)], geometry,
      spacing)
  np.testing.assert_allclose(back.sum(-1), 1.0, atol=1e-5)
  # Crop and pad undone: a smaller image size crops rows, a larger pads.
  cropped = dataclasses.replace(PREP, image_size=(20, 40), target_spacing=None)
  slices, geometry = predict.preprocess(img, data, cropped, "CT")
  assert slices.shape[1:3] == (20, 40)
  _, want_label = nifti.load_case(
      nifti.CaseRef(str(image_path), str(label_path), "p"), cropped,
      modality="CT")
  back = predict.restore_geometry(np.eye(3, dtype=np.float32)[want_label],
                                  geometry, cropped).argmax(-1)
  # What the crop kept, in RAS, then in the file's axes.
  canonical = np.zeros(geometry.canonical_shape, bool)
  canonical[6:26] = True  # Rows 32 -> 20: 6 off each side.
  kept = nib.orientations.apply_orientation(canonical, nib.orientations.
                                            ornt_transform(
                                                nib.orientations.axcodes2ornt(
                                                    ("R", "A", "S")),
                                                geometry.orientation))
  np.testing.assert_array_equal(back[kept], label[kept])
  assert np.all(back[~kept] == 0)  # Cropped away: background.


@pytest.mark.slow
def test_cli_segments_a_held_out_scan_on_its_own_grid(trained_run, tmp_path):
  image_path, label_path = _held_out_ct(tmp_path)
  csv = tmp_path / "cases.csv"
  csv.write_text(f"image,label,case\n{image_path.name},{label_path.name},"
                 "held_out\n")
  out = tmp_path / "predictions"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.predict",
       f"--workdir={trained_run / 'run'}", f"--input={csv}",
       f"--output_dir={out}", "--probabilities"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 0, result.stderr[-2000:]
  assert "segmented 1 case(s)" in result.stdout
  assert "mean foreground Dice" in result.stdout
  img = nib.load(str(image_path))
  seg = nib.load(str(out / "held_out_seg.nii.gz"))
  assert seg.shape == img.shape
  np.testing.assert_allclose(seg.affine, img.affine, atol=1e-5)
  assert seg.get_data_dtype() == np.uint8
  probs = nib.load(str(out / "held_out_probabilities.nii.gz"))
  assert probs.shape == img.shape + (3,)
  np.testing.assert_allclose(probs.get_fdata().sum(-1), 1.0, atol=1e-4)
  pred = np.asarray(seg.dataobj)
  np.testing.assert_array_equal(pred, probs.get_fdata().argmax(-1))
  record = json.loads((out / predict.METRICS_FILE).read_text())
  organ = record["cases_metrics"]["held_out"]["dice"]["organ"]
  # Better than chance: a labelling drawn at random with the label's class
  # frequencies has expected Dice equal to the class's voxel fraction.
  label = np.asarray(nib.load(str(label_path)).dataobj)
  chance = float(np.mean(label >= 1))
  assert organ > 0.3 and organ > 5 * chance, (organ, chance)
  hd95 = record["cases_metrics"]["held_out"]["hd95_mm"]["organ"]
  assert 0 <= hd95 < 10.0  # Millimetres, on the file's 2.5 x 1 x 1 mm grid.
  assert record["model"]["privacy"]["dp"] is False
  assert "NOT PRIVATE" in record["model"]["privacy"]["predictions"]
  assert record["model"]["preprocessing"]["settings"]["target_spacing"] == [
      1.25, 1.25, 2.5]
  assert sorted(p.name for p in out.iterdir()) == [
      "held_out_probabilities.nii.gz", "held_out_seg.nii.gz", "metrics.json"]


@pytest.mark.slow
def test_bad_inputs_name_the_file_and_leave_nothing(trained_run, tmp_path):
  run = trained_run / "run"
  trained = predict.load_trained(run)
  assert trained.round_index == 8
  assert predict.load_trained(run, round_index=4).round_index == 4
  with pytest.raises(predict.PredictError, match=r"--round=3: .*\[4, 8\]"):
    predict.load_trained(run, round_index=3)
  with pytest.raises(predict.PredictError, match="no checkpoints"):
    predict.load_trained(tmp_path)
  with pytest.raises(predict.PredictError, match="--site"):
    predict.load_trained(run, site="ct_scanner_a")  # Not a FedBN run.
  assert trained.modality_of(None) == "CT"
  with pytest.raises(predict.PredictError, match=r"trained on \['CT'\] only"):
    trained.modality_of("MRI")
  good, _ = _held_out_ct(tmp_path)
  affine = nib.load(str(good)).affine
  four_d = tmp_path / "two_channels.nii.gz"
  nib.save(nib.Nifti1Image(np.ones((8, 8, 4, 2), np.float32), affine),
           str(four_d))
  with pytest.raises(predict.PredictError,
                     match="two_channels.nii.gz: a 4D image"):
    predict.load_image(four_d, 1)
  with pytest.raises(predict.PredictError, match="2 channel.*takes 3"):
    predict.load_image(four_d, 3)
  broken = tmp_path / "broken.nii.gz"
  broken.write_bytes(b"not a nifti file")
  with pytest.raises(predict.PredictError, match="broken.nii.gz: not a "
                     "readable NIfTI"):
    predict.load_image(broken, 1)
  nan = tmp_path / "nan.nii.gz"
  nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), affine),
           str(nan))
  with pytest.raises(predict.PredictError, match="nan.nii.gz: 256 voxels"):
    predict.load_image(nan, 1)
  # A failing case after a good one: no output at all, no temporary left.
  out = tmp_path / "out"
  cases = [predict.Case("good", str(good)), predict.Case("bad", str(broken))]
  with pytest.raises(predict.PredictError, match="broken.nii.gz"):
    predict.predict_cases(trained, cases, out, progress=False)
  assert not out.exists()
  assert not [p for p in tmp_path.iterdir() if "incomplete" in p.name]
  # Inputs: a folder, a duplicate id, an empty folder, a CSV without image.
  folder = tmp_path / "folder"
  folder.mkdir()
  (folder / "a.nii.gz").write_bytes(good.read_bytes())
  (folder / "notes.txt").write_text("ignored")
  assert [c.case_id for c in predict.find_cases(folder)] == ["a"]
  (folder / "a.nii").write_bytes(b"")
  with pytest.raises(predict.PredictError, match="two scans would be"):
    predict.find_cases(folder)
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(predict.PredictError, match="no NIfTI scan"):
    predict.find_cases(empty)
  bad_csv = tmp_path / "bad.csv"
  bad_csv.write_text("path\nx.nii.gz\n")
  with pytest.raises(predict.PredictError, match="needs an image column"):
    predict.find_cases(bad_csv)


@pytest.mark.slow
def test_fedbn_site_choice_and_synthetic_preprocessing(tmp_path):
  config = C.ExperimentConfig(
      data=C.DataConfig(image_size=16, num_slices=2, patients_scale=0.0625),
      model=C.ModelConfig(widths=(4,)),
      privacy=C.PrivacyConfig(enabled=False),
      federated=C.FederatedConfig(algorithm="fedbn", rounds=2, local_steps=2,
                                  batch_size=2, learning_rate=0.5,
                                  ema_decay=0.5),
      eval_every=100, checkpoint_every=1)
  loop.train_and_evaluate(config, tmp_path / "run")
  with pytest.raises(predict.PredictError, match="--site: .* FedBN"):
    predict.load_trained(tmp_path / "run")
  with pytest.raises(predict.PredictError, match="--site=nowhere"):
    predict.load_trained(tmp_path / "run", site="nowhere")
  a = predict.load_trained(tmp_path / "run", site="ct_scanner_a")
  b = predict.load_trained(tmp_path / "run", site="mri_t1_1p5t")
  # Each site's normalisation parameters from its own state; the rest is
  # the evaluated (EMA) global model, the same for both.
  sim = loop.Simulation(config, tmp_path / "run")
  mask = models.norm_param_mask(a.params)
  for k, chosen in ((0, a), (3, b)):
    jax.tree.map(lambda m, got, want: np.testing.assert_allclose(
        got, want, rtol=1e-6), mask, chosen.params,
                 state_lib.site_params(sim.run, sim.state, True)(k))
  outputs = [predict.segment(t, np.random.default_rng(0).normal(
      size=(2, 16, 16, 1)).astype(np.float32)) for t in (a, b)]
  assert not np.allclose(outputs[0], outputs[1])
  # The built-in data's preprocessing: exported CT comes back as trained on.
  assert a.preprocess.image_size == (16, 16)
  assert a.modality_of(None) == "CT" and b.modality_of(None) == "MRI"
  synth = synthetic.SyntheticConfig(image_size=16, num_slices=2)
  image, _ = synthetic.patient_volume(synth, 0, 0)
  lo, hi = synthetic.CT_WINDOW
  stored = np.transpose(image * (hi - lo) + lo, (1, 2, 0))
  img = nib.Nifti1Image(stored.astype(np.float32), np.diag([1, 1, 2.5, 1]))
  slices, _ = predict.preprocess(img, stored[..., None], a.preprocess, "CT")
  np.testing.assert_allclose(slices[..., 0], image, atol=1e-5)


def test_a_consortium_runs_sites_are_those_of_its_data_seed():
  from fedjax_seg.data import consortium  # pylint: disable=g-import-not-at-top
  config = C.ExperimentConfig(data=C.DataConfig(num_sites=50, data_seed=3),
                              federated=C.FederatedConfig(sites_per_round=5))
  _, _, names, modalities, _ = predict._data_description(config, None)
  want = consortium.Consortium(num_sites=50, seed=3)
  assert names == want.site_names and modalities == want.site_modalities
  assert names != consortium.Consortium(num_sites=50, seed=0).site_names

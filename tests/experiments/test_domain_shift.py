"""The domain_shift experiment runs as a user runs it, and shows the shift."""

import json
import pathlib
import subprocess
import sys
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pooled_model_beats_a_model_of_another_modality(tmp_path):
  out = tmp_path / "shift.json"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.domain_shift", "--steps=120",
       "--batch_size=16", "--image_size=16", "--patients_scale=0.25",
       "--single_sites=xray_digital",
       f"--output={out}"], cwd=REPO, capture_output=True, text=True,
      check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  runs = json.loads(out.read_text())["runs"]
  pooled, xray = runs["pooled"], runs["only_xray_digital"]
  # At this tiny size (16x16, 120 steps) the gaps were 0.59 (CT) and 0.18
  # (MRI): clear, but the MRI one moves by a few hundredths with the float
  # summation order of the model, so the margin is 0.1.
  for modality in ("CT", "MRI"):
    assert pooled["dice_per_modality"][modality] > (
        xray["dice_per_modality"][modality] + 0.1), runs
  assert "pooled" in result.stdout and "XRAY" in result.stdout


@pytest.mark.slow
def test_bad_flag_names_the_flag():
  result = subprocess.run(
      [sys.executable, "-m", "experiments.domain_shift",
       "--single_sites=nowhere"], cwd=REPO, capture_output=True, text=True,
      check=False)
  assert result.returncode != 0 and "--single_sites" in result.stderr

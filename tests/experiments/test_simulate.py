"""`python -m experiments.simulate` as a user runs it."""

import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--image_size=16", "--num_slices=2", "--patients_scale=0.0625",
              "--widths=4", "--rounds=2", "--local_steps=1", "--batch_size=4",
              "--eval_every=1"]


def _run(args, tmp_path):
  return subprocess.run([sys.executable, "-m", "experiments.simulate"] + args,
                        cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_tiny_run_writes_a_complete_report(tmp_path):
  workdir = tmp_path / "run"
  result = _run(TINY_FLAGS + [f"--workdir={workdir}"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / "report.json").read_text())
  for key in ("rounds_completed", "stopped_reason", "privacy", "metrics",
              "config", "versions", "device", "timing"):
    assert key in report
  for key in ("enabled", "unit", "delta", "accountant", "epsilon_per_site",
              "epsilon_max", "epsilon_pld_per_site", "ledger"):
    assert key in report["privacy"]
  for key in ("dice_per_site", "dice_per_modality", "dice_mean",
              "iou_per_site", "hd95_per_site"):
    assert key in report["metrics"]
  assert report["rounds_completed"] == 2 and report["privacy"]["enabled"]
  assert report["privacy"]["epsilon_max"] > 0
  assert set(report["metrics"]["dice_per_modality"]) == {"CT", "MRI", "XRAY"}
  for name in ("rounds.csv", "dice_per_site.png", "epsilon_per_site.png",
               "sigma_and_clip.png", "dice_vs_epsilon.png"):
    assert (workdir / name).stat().st_size > 0
  assert "round 2/2" in result.stderr and "ETA" in result.stderr


@pytest.mark.parametrize("flag,named", [
    ("--noise_multiplier=-1", "--noise_multiplier"),
    ("--delta=1", "--delta"),
    ("--dataset=not_prepared", "--data_dir"),
    ("--unit=voxel", "--unit"),
])
def test_bad_flags_fail_naming_the_flag_and_write_nothing(tmp_path, flag,
                                                          named):
  workdir = tmp_path / "never"
  result = _run(TINY_FLAGS + [flag, f"--workdir={workdir}"], tmp_path)
  assert result.returncode != 0
  assert named in result.stderr
  assert not workdir.exists()


def test_unknown_dataset_in_data_dir(tmp_path):
  workdir = tmp_path / "never"
  result = _run(TINY_FLAGS + ["--dataset=missing", f"--data_dir={tmp_path}",
                              f"--workdir={workdir}"], tmp_path)
  assert result.returncode != 0 and "--dataset" in result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_every_flagfile_parses():
  """Each flagfile gives a valid config (one process: imports are slow);
  sweep_*.flags are read by experiments.sweep and give their members."""
  code = """
import sys, pathlib
from absl import flags
from experiments import sweep as sweep_main  # simulate's flags and --sweep*.
from fedjax_seg.run import config_flags, sweep
for flagfile in sorted(pathlib.Path('experiments/flags').glob('*.flags')):
  for flag in flags.FLAGS:  # Back to defaults between flagfiles.
    flags.FLAGS[flag].unparse()
  flags.FLAGS(['x', f'--flagfile={flagfile}', '--data_dir=/nonexistent'])
  config = config_flags.config_from_flags()
  if flagfile.name.startswith('sweep_'):
    grid = sweep.parse_sweep_flags(flags.FLAGS.sweep)
    if flags.FLAGS.nonprivate_reference:
      grid.append({'dp': False})
    print('members', flagfile.name, len(sweep.build_members(config, grid)))
  print('ok', flagfile.name)
"""
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                          capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  names = {p.name for p in (REPO / "experiments" / "flags").glob("*.flags")}
  assert result.stdout.count("ok ") == len(names) >= 10
  assert "members sweep_schedules.flags 16" in result.stdout

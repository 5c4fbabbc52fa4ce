"""`python -m experiments.attack` as a user runs it: trains a run when the
workdir has none, attacks it, and refuses flags that contradict a run."""

import json
import pathlib
import subprocess
import sys
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = ["--image_size=16", "--num_slices=2", "--patients_scale=0.0625",
        "--widths=4", "--rounds=2", "--local_steps=1", "--batch_size=4"]


def _attack(*args):
  return subprocess.run([sys.executable, "-m", "experiments.attack", *args],
                        cwd=REPO, capture_output=True, text=True, check=False)


@pytest.mark.slow
def test_attack_command_trains_attacks_and_writes_outputs(tmp_path):
  workdir = tmp_path / "run"
  result = _attack(*TINY, f"--workdir={workdir}", "--attack_iterations=3",
                   "--attack_batch_sizes=1", "--attack_sites=xray_digital",
                   "--attack_settings=nodp,patient")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SSIM" in result.stdout
  report = json.loads((workdir / "report.json").read_text())
  attack = json.loads((workdir / "attack.json").read_text())
  assert attack["run"]["rounds_completed"] == 2
  assert attack["grids"] == ["attack_xray_digital_b1.png"]
  assert (workdir / "attack_xray_digital_b1.png").stat().st_size > 0
  got = {(e["round"], e["setting"]): e for e in attack["attacks"]}
  assert set(got) == {(r, s) for r in ("first", "last")
                      for s in ("nodp", "patient")}
  for e in got.values():
    assert set(e["ssim"]) == {"mean", "std", "min", "max"}
    assert len(e["targets"]) == 2 and e["batch_size"] == 1
  assert got["last", "patient"]["epsilon"] == \
      report["privacy"]["epsilon_per_site"]["xray_digital"]
  assert got["last", "patient"]["epsilon_label"] == "epsilon per patient"
  # The run is read back from its report: a flag that contradicts it is
  # refused, naming the flag, before anything is written.
  before = (workdir / "attack.json").read_bytes()
  refused = _attack(f"--workdir={workdir}", "--rounds=3")
  assert refused.returncode != 0
  assert "--rounds=3" in refused.stderr and "--rounds=2" in refused.stderr
  assert (workdir / "attack.json").read_bytes() == before

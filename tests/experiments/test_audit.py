"""`python -m experiments.audit` as a user runs it, and `--audit` inside a
run: the report's audit, kill and resume."""

import json
import pathlib
import subprocess
import sys
import pytest

from fedjax_seg.run import config_flags
from fedjax_seg.run import loop
from fedjax_seg import verifier

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY = dict(image_size=16, num_slices=2, patients_scale=0.0625, widths=(4,),
            rounds=2, local_steps=1, batch_size=4, eval_every=1,
            checkpoint_every=1, audit_canaries=200, noise_seed=0)
AUDIT_FIELDS = {"site", "unit", "claimed_epsilon", "claimed_epsilon_pld",
                "epsilon_lower_bound", "num_canaries", "num_included",
                "guesses", "correct_guesses", "noise_seed", "canary_kind",
                "contradicts_claim", "significance", "delta"}


@pytest.mark.slow
def test_audit_command_writes_audit_json_and_resume_is_identical(tmp_path):
  flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
           for k, v in TINY.items()]
  result = subprocess.run(
      [sys.executable, "-m", "experiments.audit", *flags,
       "--audit_site=mri_t2_3t", f"--workdir={tmp_path / 'cli'}"],
      cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "empirical lower bound" in result.stdout
  audit = json.loads((tmp_path / "cli" / "audit.json").read_text())
  assert AUDIT_FIELDS <= set(audit)
  assert audit["site"] == "mri_t2_3t" and audit["unit"] == "patient"
  assert audit["num_canaries"] == 200
  assert 0 <= audit["epsilon_lower_bound"] <= audit["claimed_epsilon"]
  assert not audit["contradicts_claim"]
  assert audit["canary_contributions"] > 0
  report = json.loads((tmp_path / "cli" / "report.json").read_text())
  assert verifier.verify_report(report).ok
  assert report["privacy"]["audit"]["epsilon_lower_bound"] == \
      audit["epsilon_lower_bound"]
  # The same run with --audit, killed after round 1 and resumed: the
  # audit state is checkpointed, so every figure is the same.
  values = dict(TINY, audit=True, audit_site="mri_t2_3t")
  killed = config_flags.config_from_values(dict(values, stop_after_rounds=1))
  assert loop.train_and_evaluate(killed, tmp_path / "resumed")[
      "stopped_reason"] == "interrupted"
  resumed = loop.train_and_evaluate(
      config_flags.config_from_values(values), tmp_path / "resumed")
  got = resumed["privacy"]["audit"]
  for key in AUDIT_FIELDS | {"canary_contributions"}:
    assert got[key] == audit[key], key
  assert resumed["final_params_sha256"] == report["final_params_sha256"]

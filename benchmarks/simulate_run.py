"""Runs `experiments.simulate` (or a wrapper of it) in a fresh process and
reads what the run wrote; shared by the whole-run benchmarks."""

import csv
import json
import pathlib
import subprocess
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def run(cmd: list[str], run_dir: str) -> tuple[list[dict], dict, float]:
  """(rounds.csv rows with the *_seconds columns as floats, report.json,
  wall seconds of the process) of the run `cmd` writes to `run_dir`."""
  start = time.perf_counter()
  done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                        check=False)
  wall = time.perf_counter() - start
  if done.returncode:
    raise RuntimeError(f"{' '.join(cmd[:3])} ... failed:\n"
                       f"{done.stderr[-3000:]}")
  with open(f"{run_dir}/rounds.csv", newline="") as f:
    rows = [{k: float(v) if k.endswith("seconds") else v
             for k, v in row.items()} for row in csv.DictReader(f)]
  with open(f"{run_dir}/report.json") as f:
    report = json.load(f)
  return rows, report, wall

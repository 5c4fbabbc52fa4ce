r"""Whole runs of the default simulation at several image sizes.

For each --sizes S, runs `python -m experiments.simulate` (the default
flags: built-in data, patient-level DP, tiny U-Net) with --image_size=S and
--rounds, in a fresh process and a temporary workdir, and reads its
rounds.csv and report.json. Per size it reports:

  first round      wall seconds of round 1 (it compiles the round);
  compile (est.)   first round minus the median later round;
  round            median wall seconds of rounds 2.. without validation;
  validation       median seconds of a validation pass (the first one
                   compiles the evaluation and is reported apart);
  setup + final    whole run minus the rounds: data, model, accountant
                   calibration, final test evaluation (Dice, IoU, HD95),
                   report and plots;
  whole run        the process's wall time.

Ratios are against the first size, measured in the same invocation; the
pixel ratio (S / S0)^2 is the reference for the round.

  python benchmarks/bench_image_size.py --sizes=32,64,128 --rounds=4
"""

import argparse
import json
import os
import pathlib
import statistics
import sys
import tempfile

import simulate_run
from fedjax_seg.run import artifacts


def run(size: int, rounds: int, eval_every: int, extra: list[str]) -> dict:
  """Runs one simulation; its timings in seconds."""
  with tempfile.TemporaryDirectory(prefix=f"bench_size{size}_") as workdir:
    cmd = [sys.executable, "-m", "experiments.simulate",
           f"--workdir={workdir}/run", f"--image_size={size}",
           f"--rounds={rounds}", f"--eval_every={eval_every}", *extra]
    rows, report, wall = simulate_run.run(cmd, f"{workdir}/run")
  later = rows[1:]
  plain = [r["wall_seconds"] for r in later if not r["evaluation_seconds"]]
  evals = [r["evaluation_seconds"] for r in rows if r["evaluation_seconds"]]
  round_median = statistics.median(plain or [r["wall_seconds"]
                                             for r in later])
  rounds_total = sum(r["wall_seconds"] for r in rows)
  return {
      "first_round": rows[0]["wall_seconds"],
      "compile_estimate": rows[0]["wall_seconds"] - round_median,
      "round": round_median,
      "round_device": statistics.median(r["device_seconds"] for r in later),
      "first_validation": evals[0] if evals else None,
      "validation": statistics.median(evals[1:]) if len(evals) > 1 else None,
      "setup_and_final": report["timing"]["total_seconds"] - rounds_total,
      "whole_run": wall,
      "test_dice_mean": report["metrics"]["dice_mean"],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="32,64,128")
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--eval_every", type=int, default=2)
  parser.add_argument("--output", default=None, help="Write JSON here.")
  parser.add_argument("extra", nargs="*",
                      help="More simulate flags, after --, e.g. --nodp.")
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(",")]
  results = {"rounds": args.rounds, "eval_every": args.eval_every,
             "extra_flags": args.extra, "cpus": os.cpu_count(), "sizes": {}}
  for size in sizes:
    t = run(size, args.rounds, args.eval_every, args.extra)
    results["sizes"][size] = t
    base = results["sizes"][sizes[0]]
    print(f"{size}x{size}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in t.items() if v is not None)
          + f" | round {t['round'] / base['round']:.1f}x the {sizes[0]}px "
          f"round (pixels {(size / sizes[0]) ** 2:.0f}x)", flush=True)
  if args.output:
    artifacts.atomic_write(pathlib.Path(args.output),
                            json.dumps(results, indent=1).encode())


if __name__ == "__main__":
  main()

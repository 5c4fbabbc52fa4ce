r"""Round time and memory against the number of sites (`--num_sites`).

For each --num_sites N, runs `experiments.simulate` on the built-in
consortium (`fedjax_seg.data.consortium`) with a cohort of --cohort sites
per round (default flags otherwise: patient-level DP at epsilon 8, tiny
U-Net, 32x32), each N in a fresh process, and reports:

  setup            process start to round 1: data counts, the privacy plan
                   (one calibration per distinct site size), model, trainer;
  round            median wall seconds of rounds 2.. without validation,
                   with its device and host parts (host: rendering the
                   cohort, accounting, the history row);
  per slice        device milliseconds per expected slice of the round's
                   cohort (sum over its sites of q_k x units x slices per
                   unit x local steps): heavy-tailed sizes make cohorts
                   differ, so this is the figure comparable across N;
  final            the final test evaluation, report (with the independent
                   privacy verification), CSVs and plots;
  host RSS         the process's peak resident memory;
  device arrays    the peak over rounds of what a round holds for the
                   device when it starts: the bytes of all live jax arrays
                   (every site's state, the model) plus the round's inputs
                   (the cohort's data at the fixed capacity). On CPU the
                   device is host memory, so this is counted, not read
                   from an allocator.

The reference for "flat in N" is the N = first value row, measured in the
same invocation.

  python benchmarks/bench_many_sites.py --num_sites=10,100,1000,10000
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

NUM_SLICES = 8  # simulate's default --num_slices: slices per CT/MRI patient.

# Runs simulate's main in the child process, measuring what each round holds
# for the device when it starts, the setup and final times, and the peak RSS
# at exit.
_CHILD = r"""
import atexit, json, resource, sys, time
start = time.perf_counter()
stats_path = sys.argv[1]
import jax
from fedjax_seg import federated as fed
from fedjax_seg.run import loop
from fedjax_seg.run import round as round_lib
measured = {"device_bytes": 0, "first_round_start": None}
inner_round, inner_finish = round_lib.device_round, loop.Simulation.finish
inner_trainer_round = fed.FederatedTrainer.run_round
def run_round(*args, **kwargs):
  if measured["first_round_start"] is None:
    measured["first_round_start"] = time.perf_counter() - start
  return inner_round(*args, **kwargs)
def trainer_round(self, *args, **kwargs):
  # What the round holds: every live jax array (states, params, the
  # accountant's nothing) plus the round's inputs not yet on the device
  # (the cohort's data, which the loop backend moves one site at a time).
  inputs = sum(x.nbytes for x in jax.tree.leaves((args, kwargs))
               if hasattr(x, "nbytes") and not isinstance(x, jax.Array))
  live = sum(a.nbytes for a in jax.live_arrays())
  measured["device_bytes"] = max(measured["device_bytes"], live + inputs)
  return inner_trainer_round(self, *args, **kwargs)
fed.FederatedTrainer.run_round = trainer_round
def finish(self):
  t = time.perf_counter()
  out = inner_finish(self)
  measured["final_seconds"] = time.perf_counter() - t
  return out
round_lib.device_round, loop.Simulation.finish = run_round, finish
def report():
  measured["rss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  with open(stats_path, "w") as f:
    json.dump(measured, f)
atexit.register(report)
sys.argv = ["simulate"] + sys.argv[2:]
from experiments import simulate
from absl import app
app.run(simulate.main)
"""


def run(num_sites: int, cohort: int, rounds: int, extra: list[str]) -> dict:
  with tempfile.TemporaryDirectory(prefix=f"bench_sites{num_sites}_") as tmp:
    stats = f"{tmp}/stats.json"
    cmd = [sys.executable, "-c", _CHILD, stats, f"--workdir={tmp}/run",
           f"--num_sites={num_sites}", f"--sites_per_round={cohort}",
           f"--rounds={rounds}", f"--eval_every={rounds}",
           "--eval_sites=10", "--test_sites=10", *extra]
    rows, report, wall = simulate_run.run(cmd, f"{tmp}/run")
    with open(stats) as f:
      measured = json.load(f)
  plain = [r for r in rows[1:] if not r["evaluation_seconds"]]
  median = lambda key: statistics.median(r[key] for r in plain)
  # The cohort decides the work: heavy-tailed sizes make some cohorts much
  # larger than others. The expected number of slices a round's DP steps
  # process (public: participants, q_k and sizes are in the report) puts
  # rounds of different cohorts on one scale.
  plan = report["privacy"]["plan"]
  steps = plan["local_steps"]
  def expected_slices(row):
    total = 0.0
    for s in row["participants"]:
      per_unit = 1 if report["sites"][s]["modality"] == "XRAY" else NUM_SLICES
      total += (plan["sampling_rate_per_site"][s]
                * plan["dataset_size_per_site"][s] * per_unit * steps)
    return total
  history = {h["round"]: h for h in report["history"]}
  per_slice = [1e3 * float(r["device_seconds"])
               / expected_slices(history[int(r["round"])]) for r in plain]
  return {
      "setup_seconds": measured["first_round_start"],
      "first_round_seconds": rows[0]["wall_seconds"],
      "round_seconds": median("wall_seconds"),
      "round_device_seconds": median("device_seconds"),
      "round_host_seconds": median("host_seconds"),
      "round_expected_slices": statistics.median(
          expected_slices(history[int(r["round"])]) for r in plain),
      "device_ms_per_expected_slice": statistics.median(per_slice),
      "final_seconds": measured["final_seconds"],
      "whole_run_seconds": wall,
      "host_rss_mb": measured["rss_kb"] / 1024,
      "device_array_mb": measured["device_bytes"] / 2**20,
      "epsilon_max": report["privacy"]["epsilon_max"],
      "sites_charged": report["sites_summary"]["sites_charged"]
                       if "sites_summary" in report else None,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_sites", default="10,100,1000,10000")
  parser.add_argument("--cohort", type=int, default=10)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--output", default=None, help="Write JSON here.")
  parser.add_argument("extra", nargs="*", help="More simulate flags, after --.")
  args = parser.parse_args()
  sizes = [int(n) for n in args.num_sites.split(",")]
  results = {"cohort": args.cohort, "rounds": args.rounds,
             "extra_flags": args.extra, "cpus": os.cpu_count(), "runs": {}}
  for n in sizes:
    t = run(n, args.cohort, args.rounds, args.extra)
    results["runs"][n] = t
    base = results["runs"][sizes[0]]
    print(f"N={n}: " + ", ".join(
        f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in t.items())
          + f" | round {t['round_seconds'] / base['round_seconds']:.2f}x, "
          f"RSS {t['host_rss_mb'] / base['host_rss_mb']:.2f}x, device "
          f"{t['device_array_mb'] / base['device_array_mb']:.2f}x the "
          f"N={sizes[0]} run", flush=True)
  if args.output:
    artifacts.atomic_write(pathlib.Path(args.output),
                            json.dumps(results, indent=1).encode())


if __name__ == "__main__":
  main()

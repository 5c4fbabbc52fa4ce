r"""A sweep of S members against S sequential simulate runs, in one run.

The S members (noise schedule x target epsilon, default settings otherwise)
run three ways, each as a user would run it, as a fresh process with a fresh
(empty) persistent compilation cache per mode:
  * sequential: `python -m experiments.simulate --flagfile=<member flags>`
    once per member, one after the other (they share the cache between
    them, as a user's runs would);
  * loop: `python -m experiments.sweep --member_backend=loop` (data loaded
    once, one compiled program, members' rounds in turn);
  * vmap: `python -m experiments.sweep --member_backend=vmap` (one program
    over a member axis).
Reports wall seconds and the speed-up sequential / sweep (the target on a
GPU: >= 0.8 * S); checks that every sweep member's final parameters equal
its sequential run's (sha256 under loop, Dice within 1e-4 under vmap).

  python benchmarks/bench_sweep.py --rounds=3 --output=bench_sweep.json
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from fedjax_seg.run import config_flags
from fedjax_seg.run import sweep

_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds per member.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Synthetic image size.")
_SCHEDULES = flags.DEFINE_list(
    "schedules", ["constant", "linear", "exponential", "cosine"],
    "Noise schedules (members: schedules x targets).")
_TARGETS = flags.DEFINE_list("targets", ["4", "8"], "Target epsilons.")
_MODES = flags.DEFINE_list("modes", ["sequential", "loop", "vmap"],
                           "Which ways to run the members.")
_EXTRA = flags.DEFINE_list("extra", [], "More base flags, e.g. backend=vmap.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(args, cache: pathlib.Path) -> float:
  env = dict(os.environ, FEDJAX_SEG_COMPILATION_CACHE=str(cache))
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m"] + args, cwd=REPO, env=env,
                 check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main(argv):
  del argv
  base_values = {"rounds": _ROUNDS.value, "image_size": _IMAGE_SIZE.value}
  for item in _EXTRA.value:
    name, _, value = item.partition("=")
    base_values[name] = config_flags.parse_value(name, value)
  base = config_flags.config_from_values(base_values)
  grid = [{"noise_schedule": s, "target_epsilon": float(t)}
          for s in _SCHEDULES.value for t in _TARGETS.value]
  members = sweep.build_members(base, grid)
  report = {"members": len(members), "rounds": _ROUNDS.value,
            "image_size": _IMAGE_SIZE.value, "cpu_count": os.cpu_count(),
            "seconds": {}, "checks": {}}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    members_file = tmp / "members.json"
    members_file.write_text(json.dumps(grid))
    base_flags = [f"--{line[2:]}" if line.startswith("--") else line
                  for line in config_flags.to_flagfile(base).splitlines()]
    results = {}
    for mode in _MODES.value:
      cache = tmp / f"cache_{mode}"
      if mode == "sequential":
        total = 0.0
        for m in members:
          flagfile = tmp / f"{m.name}.flags"
          flagfile.write_text(config_flags.to_flagfile(m.config))
          total += _run(["experiments.simulate", f"--flagfile={flagfile}",
                         f"--workdir={tmp / 'seq' / m.name}"], cache)
        report["seconds"][mode] = total
        results[mode] = {
            m.name: json.loads((tmp / "seq" / m.name / "report.json")
                               .read_text()) for m in members}
      else:
        workdir = tmp / mode
        report["seconds"][mode] = _run(
            ["experiments.sweep", *base_flags, f"--sweep_file={members_file}",
             f"--member_backend={mode}", f"--workdir={workdir}"], cache)
        summary = json.loads((workdir / sweep.SWEEP_JSON).read_text())
        results[mode] = {e["name"]: e for e in summary["members"]}
      print(f"{mode:10s} {len(members)} members: "
            f"{report['seconds'][mode]:.1f} s", flush=True)
    if "sequential" in results:
      seq = results["sequential"]
      for mode in ("loop", "vmap"):
        if mode not in results:
          continue
        report[f"speedup_{mode}"] = (report["seconds"]["sequential"]
                                     / report["seconds"][mode])
        same_eps = all(results[mode][n]["epsilon_per_site"]
                       == seq[n]["privacy"]["epsilon_per_site"] for n in seq)
        if mode == "loop":
          same = all(results[mode][n]["final_params_sha256"]
                     == seq[n]["final_params_sha256"] for n in seq)
        else:
          same = all(abs(results[mode][n]["dice_mean"]
                         - seq[n]["metrics"]["dice_mean"]) < 1e-4
                     for n in seq)
        report["checks"][mode] = {"epsilons_identical": same_eps,
                                  "results_equal": same}
        print(f"speed-up of {mode} over sequential: "
              f"{report[f'speedup_{mode}']:.2f}x (target on a GPU >= "
              f"{0.8 * len(members):.1f}x); epsilons identical {same_eps}, "
              f"results equal {same}")
  if "loop" in results and "vmap" in results:
    loop, vmapped = results["loop"], results["vmap"]
    report["vmap_over_loop_seconds"] = (report["seconds"]["vmap"]
                                        / report["seconds"]["loop"])
    report["checks"]["vmap_vs_loop"] = {
        "epsilons_identical": all(vmapped[n]["epsilon_per_site"]
                                  == loop[n]["epsilon_per_site"]
                                  for n in loop),
        "dice_within_1e-4": all(abs(vmapped[n]["dice_mean"]
                                    - loop[n]["dice_mean"]) < 1e-4
                                for n in loop)}
    print(f"vmap / loop wall time: {report['vmap_over_loop_seconds']:.2f}; "
          f"{report['checks']['vmap_vs_loop']}")
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)

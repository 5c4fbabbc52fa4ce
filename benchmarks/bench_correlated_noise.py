r"""The cost of correlated noise: a round with banded MF or BLT noise against
a round with independent noise (DP-SGD), in whole runs.

Each repeat runs the default patient-level simulation for --rounds rounds
once per mechanism, in turn (independent, banded, blt, independent, ...),
each in a fresh process; a run's round time is the median of its rounds'
device seconds after the first (which compiles). Ratios are mechanism /
independent, medians over the repeats, measured in the same invocation.
The stream's state per site is (b - 1) x the parameters (banded) or
buffers x the parameters (BLT), read from each report (at the server, one
stream: `--extra=flagfile=experiments/flags/dp_ftrl_site.flags`).

  python benchmarks/bench_correlated_noise.py --rounds=8 --repeats=3
"""

import json
import platform
import statistics
import sys
import tempfile

from absl import app
from absl import flags

import simulate_run

_ROUNDS = flags.DEFINE_integer("rounds", 8, "Rounds per run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Runs per mechanism.")
_BANDS = flags.DEFINE_integer("mf_bands", 4, "--mf_bands of the banded runs.")
_EXTRA = flags.DEFINE_list("extra", [], "More simulate flags, e.g. "
                           "local_steps=4 (without the dashes).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")

MECHANISMS = ("independent", "banded", "blt")


def main(argv):
  del argv
  rounds = {m: [] for m in MECHANISMS}
  memory = {}
  for repeat in range(_REPEATS.value):
    for mech in MECHANISMS:
      with tempfile.TemporaryDirectory() as workdir:
        # The extra flags (maybe a flagfile) first: the mechanism and the
        # run's length given after them win.
        cmd = [sys.executable, "-m", "experiments.simulate"]
        cmd += [f"--{e}" for e in _EXTRA.value]
        cmd += [f"--workdir={workdir}", f"--rounds={_ROUNDS.value}",
                f"--eval_every={_ROUNDS.value}", "--noise_seed=0",
                f"--noise_mechanism={mech}", f"--mf_bands={_BANDS.value}"]
        rows, report, _ = simulate_run.run(cmd, workdir)
      seconds = [r["device_seconds"] for r in rows[1:]]
      rounds[mech].append(statistics.median(seconds))
      section = report["privacy"].get("noise_mechanism")
      if section:  # In every site, or one stream at the server.
        memory[mech] = section.get(
            "state_copies_of_parameters_per_site",
            section.get("state_copies_of_parameters"))
      print(f"repeat {repeat} {mech:11s} round {rounds[mech][-1]:.3f} s",
            flush=True)
  base = statistics.median(rounds["independent"])
  results = {m: {"round_s": statistics.median(v), "rounds_s": v,
                 "ratio_vs_independent": statistics.median(v) / base,
                 "state_copies_of_parameters_per_site": memory.get(m, 0)}
             for m, v in rounds.items()}
  for m, r in results.items():
    print(f"{m:11s} round {r['round_s']:.3f} s  "
          f"x{r['ratio_vs_independent']:.3f} of independent  "
          f"state {r['state_copies_of_parameters_per_site']} x params/site")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"rounds": _ROUNDS.value, "repeats": _REPEATS.value,
                 "extra": _EXTRA.value, "machine": platform.machine(),
                 "python": sys.version.split()[0], "results": results}, f,
                indent=1)


if __name__ == "__main__":
  app.run(main)

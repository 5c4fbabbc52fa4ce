r"""Cost of per-site RDP accounting per round, and that it stays flat.

100 sites of different sizes, each recording one round (5 local steps at its
own q = 16 / N_k) per round, for --rounds rounds, in two modes:
  * constant: each site keeps its sigma (site-adaptive noise); the RDP of a
    repeated (sigma, q, steps) event is cached, so a round is vector sums;
  * schedule: sigma decays every round, so every site needs a new RDP
    evaluation (dp_accounting) every round.
Reports milliseconds of `record` + `epsilons()` per round over the first and
the last 20 rounds; their ratio shows whether the cost grows with rounds.

  python benchmarks/bench_accounting.py --rounds=100
"""

import json
import time

from absl import app
from absl import flags
import numpy as np

from fedjax_seg import privacy

_ROUNDS = flags.DEFINE_integer("rounds", 100, "Rounds to account.")
_SITES = flags.DEFINE_integer("sites", 100, "Sites.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")


def main(argv):
  del argv
  names = [f"site{k}" for k in range(_SITES.value)]
  sizes = np.random.default_rng(0).integers(50, 2000, _SITES.value)
  report = {"sites": _SITES.value, "rounds": _ROUNDS.value}
  for mode in ("constant", "schedule"):
    ledger = privacy.PrivacyLedger(names, delta=1e-5)
    times = []
    for r in range(_ROUNDS.value):
      sigma = 1.2 if mode == "constant" else round(1.2 * 0.999 ** r, 6)
      start = time.perf_counter()
      for name, n in zip(names, sizes):
        ledger.record(name, sigma, min(1.0, 16 / n), steps=5)
      ledger.epsilons()
      times.append(time.perf_counter() - start)
    first = 1e3 * float(np.mean(times[:20]))
    last = 1e3 * float(np.mean(times[-20:]))
    report[mode] = {"ms_per_round_first20": first,
                    "ms_per_round_last20": last,
                    "last_over_first": last / first,
                    "max_epsilon": ledger.max_epsilon()}
    print(f"{mode:8s} {_SITES.value} sites: {first:.1f} ms/round (first 20 "
          f"rounds), {last:.1f} ms/round (last 20): ratio "
          f"{last / first:.2f}; max epsilon {ledger.max_epsilon():.2f}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

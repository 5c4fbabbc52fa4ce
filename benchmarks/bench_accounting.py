r"""Cost of per-site RDP accounting per round, and that it stays flat.

100 sites of different sizes, each recording one round (5 local steps at its
own q = 16 / N_k) per round, for --rounds rounds, in two modes:
  * constant: each site keeps its sigma (site-adaptive noise); the RDP of a
    repeated (sigma, q, steps) event is cached, so a round is vector sums;
  * schedule: sigma decays every round, so every site needs a new RDP
    evaluation every round: all sites' together in one vectorised pass
    (`PrivacyLedger.record_events`, `privacy.rdp_vectorized`).
Reports milliseconds of recording + `epsilons()` per round over the first and
the last 20 rounds; their ratio shows whether the cost grows with rounds.
The baseline, in the same run: the schedule mode with each site's event
evaluated by dp_accounting's `RdpAccountant` (--baseline_rounds rounds).

  python benchmarks/bench_accounting.py --rounds=100
"""

import json
import time

from absl import app
from absl import flags
import dp_accounting
from dp_accounting import rdp
import numpy as np

from fedjax_seg import privacy

_ROUNDS = flags.DEFINE_integer("rounds", 100, "Rounds to account.")
_SITES = flags.DEFINE_integer("sites", 100, "Sites.")
_BASELINE_ROUNDS = flags.DEFINE_integer(
    "baseline_rounds", 5, "Rounds of the dp_accounting baseline (slow).")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")


def _baseline_ms(names, sizes, rounds):
  """ms per round of the schedule mode with dp_accounting's RdpAccountant."""
  orders = rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  totals = {name: np.zeros(len(orders)) for name in names}
  times = []
  for r in range(rounds):
    sigma = round(1.2 * 0.999 ** r, 6)
    start = time.perf_counter()
    for name, n in zip(names, sizes):
      acc = rdp.RdpAccountant(orders, relation)
      acc.compose(privacy.poisson_gaussian_event(sigma, min(1.0, 16 / n), 5))
      totals[name] = totals[name] + acc._rdp  # pylint: disable=protected-access
    for name in names:
      rdp.rdp_privacy_accountant.compute_epsilon(orders, totals[name], 1e-5)
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.mean(times))


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
      ledger.record_events({
          name: privacy.poisson_gaussian_event(sigma, min(1.0, 16 / n), 5)
          for name, n in zip(names, sizes)})
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
  baseline = _baseline_ms(names, sizes, _BASELINE_ROUNDS.value)
  report["schedule_dp_accounting_baseline_ms_per_round"] = baseline
  report["schedule_speedup_vs_dp_accounting"] = (
      baseline / report["schedule"]["ms_per_round_first20"])
  print(f"baseline (dp_accounting per site, schedule): {baseline:.1f} "
        f"ms/round; vectorised is {report['schedule_speedup_vs_dp_accounting']:.1f}x faster")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

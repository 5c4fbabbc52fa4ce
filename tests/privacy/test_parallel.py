"""Accounting spread over worker processes gives the one-by-one figures."""

import json
import pytest

from fedjax_seg.privacy import parallel
from fedjax_seg.verifier import epsilons
from fedjax_seg.privacy.accounting import PrivacyLedger
from tests.privacy import worker_functions

DELTA = 1e-5


def _ledger():
  """Three sites with per-round sigmas (distinct events), one untouched."""
  ledger = PrivacyLedger(["a", "b", "c", "d"], delta=DELTA)
  for r in range(4):
    for k, site in enumerate("abc"):
      ledger.record(site, noise_multiplier=1.0 + 0.1 * r + 0.05 * k,
                    sampling_rate=0.02 * (k + 1), steps=5 + r)
  return ledger


def test_uneven_split_keeps_order_and_a_failed_worker_falls_back():
  items = [(i,) for i in range(7)]
  assert parallel.process_map(worker_functions.double_noisily, items,
                              workers=3) == [2 * i for i in range(7)]
  assert parallel.process_map(worker_functions.double_here_only, items,
                              workers=3) == [2 * i for i in range(7)]


def test_small_work_runs_in_this_process():
  # A lambda cannot be sent to a worker: these run only in-process.
  multiply = lambda x, y: x * y
  assert parallel.process_map(multiply, [(1, 2), (3, 4)]) == [2, 12]
  assert parallel.process_map(multiply, [(1, 2), (3, 4)],
                              workers="auto") == [2, 12]


@pytest.mark.slow
def test_ledger_pld_in_workers_equals_one_by_one():
  ledger = _ledger()
  one_by_one = {s: ledger.epsilon_pld(s, 1e-3) for s in ledger.site_names}
  assert one_by_one["d"] == 0.0 and one_by_one["a"] > 0
  assert ledger.epsilons_pld(1e-3, workers=2) == one_by_one
  # 12 distinct events: "auto" computes in-process.
  assert ledger.epsilons_pld(1e-3, workers="auto") == one_by_one


@pytest.mark.slow
def test_verifier_in_workers_equals_one_by_one(caplog):
  dump = json.loads(json.dumps(_ledger().to_dict()))
  sites, orders = epsilons.parse_ledger(dump, "ledger")
  sequential = epsilons.recompute_sites(sites, orders, DELTA, 1e-3)
  assert epsilons.recompute_sites(sites, orders, DELTA, 1e-3,
                                  workers=3) == sequential
  # The workers ran (no fall-back to this process).
  assert "workers failed" not in caplog.text
  assert sequential["d"] == (0.0, 0.0)
  # Sites with equal events (a site-level ledger) are computed once.
  same = {s: sites["a"] for s in "xyz"}
  assert epsilons.recompute_sites(same, orders, DELTA, 1e-3, workers=3) == {
      s: sequential["a"] for s in "xyz"}

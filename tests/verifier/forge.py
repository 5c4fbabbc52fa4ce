"""Forged reports for the verifier's tests."""

import json

from fedjax_seg.privacy import PrivacyLedger


def reclaimed(report: dict) -> dict:
  """The report with every claim recomputed from its (tampered) ledger, so
  that only the plan's derivation can tell."""
  p = report["privacy"]
  ledger = PrivacyLedger.from_dict(p["ledger"])
  interval = p["pld_value_discretization_interval"]
  p.update(ledger=ledger.to_dict(), epsilon_per_site=ledger.epsilons(),
           epsilon_max=ledger.max_epsilon(),
           epsilon_pld_per_site={s: ledger.epsilon_pld(s, interval)
                                 for s in ledger.site_names})
  return json.loads(json.dumps(report))

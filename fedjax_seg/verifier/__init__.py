"""Independent epsilon verifier: `python -m fedjax_seg.verifier PATH`.

PATH is a run's workdir (its `report.json` is read), a `report.json` file, a
sweep's workdir (its `sweep.json`), or a bare `PrivacyLedger` JSON dump
(`ledger.to_json()`, e.g. from your own DP-SGD code; only the epsilons are
checked then). `python -m fedjax_seg.privacy.verify` is the same command.

What it recomputes, and from what (`epsilons`, `plan`, `report`):
  * Every epsilon the report claims, from the events saved in its privacy
    ledger(s), with plain dp_accounting: RDP per site (truncated sampling
    through a coupling) and PLD per site, at the report's delta, equal to
    the claims to a relative 1e-6.
  * The ledger's events against the plan re-derived from the run's config
    (every flag, `report.config`) and the site sizes (`report.sites`) alone:
    sampling rates, maximum batch, every round's sigma (a calibrated sigma
    is re-checked as the smallest meeting its target), the rounds each site
    was charged (and, where history rows publish participants, that they
    agree), the events a composed --init_from source brought (read from the
    source's own report.json), the budget.
  * For a sweep: every member, and the epsilon of releasing all private
    members together (`sweep.json` `release_all_members`).

What it trusts: the site sizes (public by the run's stated assumption), the
ledger's RDP orders (any orders give a valid bound), dp_accounting itself,
and the source run's report of a composed --init_from.

What it cannot check: that the recorded events are the ones the device
really applied (the runner checks the applied noise multiplier and sampling
rate against the plan at run time, before recording them); that the noise
root was secret and the sampler sound; anything never recorded.

This package imports nothing of the project outside itself and no jax: only
the standard library, numpy, scipy and dp_accounting, so the computation is
independent of the code that produced the ledger (a test checks it).
"""

from fedjax_seg.verifier.fields import load_report
from fedjax_seg.verifier.fields import ReportError
from fedjax_seg.verifier.report import format_table
from fedjax_seg.verifier.report import Row
from fedjax_seg.verifier.report import SweepResult
from fedjax_seg.verifier.report import verify_ledger
from fedjax_seg.verifier.report import verify_report
from fedjax_seg.verifier.report import verify_sweep
from fedjax_seg.verifier.report import VerifyResult

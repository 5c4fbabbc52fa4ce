"""`python -m fedjax_seg.verifier PATH`: recompute and check a run's epsilons.

PATH is a run's workdir (its report.json), a report.json file, a bare
`PrivacyLedger` JSON dump, or a sweep's workdir (its sweep.json: every member
and the epsilon of releasing them all). Exit codes: 0 verified (or the run is
not private: then it says so loudly and checks nothing); 1 at least one
mismatch (one FAIL line each); 2 the input cannot be read.
"""

import argparse
import logging
import os
import sys
from typing import Sequence

from fedjax_seg.verifier import fields
from fedjax_seg.verifier import report as report_lib

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT = 0, 1, 2


class _CountRdpConvergenceWarnings(logging.Filter):
  """Drops (and counts) dp_accounting's warning, once per order and event,
  that a fractional-order series did not converge and that order is left out
  (the RDP bound stays valid, slightly looser; the ledger did the same)."""

  def __init__(self):
    super().__init__()
    self.dropped = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.filename == "rdp_privacy_accountant.py"
        and "failed to converge" in record.getMessage()):
      self.dropped += 1
      return False
    return True


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m fedjax_seg.verifier") -> int:
  """The command line; `argv` without the program name. Returns the exit
  code: 0 verified (or not private), 1 mismatch, 2 unreadable input."""
  parser = argparse.ArgumentParser(
      prog=prog,
      description="Recompute every epsilon of a fedjax_seg report from its "
      "saved privacy ledger with plain dp_accounting, and check the ledger "
      "against the plan re-derived from the run's config and site sizes.")
  parser.add_argument("path", help="a run's workdir, its report.json, a "
                      "PrivacyLedger JSON dump (ledger.to_json()), or a "
                      "sweep's workdir")
  parser.add_argument("--no-plan", action="store_true",
                      help="for a hand-made report without a config: check "
                      "its epsilons and its own plan only (the output says "
                      "the plan was not re-derived)")
  args = parser.parse_args(argv)
  quiet = _CountRdpConvergenceWarnings()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    if os.path.isfile(os.path.join(args.path, report_lib.SWEEP_JSON)):
      return _sweep(args.path)
    result = report_lib.verify_report(fields.load_report(args.path),
                                      workers="auto",
                                      rederive=not args.no_plan)
  except fields.ReportError as e:
    print(f"verify: input error: {e}", file=sys.stderr)
    return EXIT_INPUT
  finally:
    absl_logger.removeFilter(quiet)
    if quiet.dropped:
      print(f"note: dp_accounting left out {quiet.dropped} non-converging "
            "fractional RDP orders (valid, slightly looser bounds; the "
            "ledger did the same)", file=sys.stderr)
  if not result.private:
    print("NOT PRIVATE: nothing to verify: privacy.enabled is false, this run "
          "was trained without clipping or noise and has no epsilon.")
    return EXIT_OK
  print(report_lib.format_table(result.rows))
  for line in result.problems:
    print(line)
  print(result.summary)
  return EXIT_OK if result.ok else EXIT_MISMATCH


def _sweep(path: str) -> int:
  result = report_lib.verify_sweep(path, workers="auto")
  for name, member in result.members.items():
    print(f"member {name}: {member.summary}")
  if result.release is not None:
    print("releasing every private member together:")
    print(report_lib.format_table(result.release.rows))
  for line in result.problems:
    print(line)
  print(result.summary)
  return EXIT_OK if result.ok else EXIT_MISMATCH


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

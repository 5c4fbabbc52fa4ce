"""`python -m fedjax_seg.privacy.verify PATH`: the verifier's former name.

The verifier is the package `fedjax_seg.verifier` (`python -m
fedjax_seg.verifier PATH`), which imports no project code and no jax; this
module, inside `privacy/`, runs the package's `__init__` (and so jax) first,
and only forwards.
"""

import sys

from fedjax_seg.verifier import __main__ as _cli
from fedjax_seg.verifier.epsilons import recompute_epsilons
from fedjax_seg.verifier.fields import load_report
from fedjax_seg.verifier.fields import ReportError
from fedjax_seg.verifier.report import format_table
from fedjax_seg.verifier.report import Row
from fedjax_seg.verifier.report import verify_ledger
from fedjax_seg.verifier.report import verify_report
from fedjax_seg.verifier.report import verify_sweep
from fedjax_seg.verifier.report import VerifyResult

EXIT_OK, EXIT_MISMATCH, EXIT_INPUT = (_cli.EXIT_OK, _cli.EXIT_MISMATCH,
                                      _cli.EXIT_INPUT)


def main(argv=None) -> int:
  return _cli.main(argv, prog="python -m fedjax_seg.privacy.verify")


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

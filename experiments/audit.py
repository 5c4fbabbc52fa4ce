r"""Empirical privacy audit of a run: `python -m experiments.audit`.

Runs the simulation `experiments.simulate` would run with the same flags,
plus the one-run canary audit (`--audit`, Steinke, Nasr and Jagielski 2023;
`fedjax_seg.privacy.auditing`): m gradient canaries, each included with
probability 1/2, join one site's clipped sums as units of that site; after
training each is scored on the site's released (noised) gradients and
jax_privacy's one-run test gives an epsilon lower bound at 95% confidence.

  python -m experiments.audit --workdir=runs/audit
  python -m experiments.audit --workdir=runs/audit_eps1 --target_epsilon=1 \
      --audit_canaries=1000 --audit_site=mri_scanner_a

Writes --workdir/audit.json (claimed epsilon per the ledger in the run's
unit, the empirical lower bound, m, guesses, correct guesses, noise seed,
...)
beside the usual report.json (which holds the same under privacy.audit).
A rerun resumes the run, as simulate does.
"""

import json
import pathlib

from absl import app
from absl import flags

from experiments import runner
from fedjax_seg.run import config_flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/audit",
                               "Output directory (resumes if it has a run).")
config_flags.define_config_flags()

AUDIT_JSON = "audit.json"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report = runner.run_from_flags(_WORKDIR.value, audit=True)
  if report is None:
    return
  from fedjax_seg.run import distributed  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import artifacts  # pylint: disable=g-import-not-at-top
  if not distributed.is_writer():
    return  # Host 0 writes for all hosts.
  audit = dict(report["privacy"]["audit"],
               rounds_completed=report["rounds_completed"],
               stopped_reason=report["stopped_reason"])
  path = pathlib.Path(_WORKDIR.value) / AUDIT_JSON
  artifacts.atomic_write(path, json.dumps(audit, indent=1).encode())
  print(f"audit of site {audit['site']}: claimed {audit['epsilon_label']} "
        f"{audit['claimed_epsilon']:.3f}, empirical lower bound "
        f"{audit['epsilon_lower_bound']:.3f} (95%, m={audit['num_canaries']}, "
        f"{audit['correct_guesses']}/{audit['guesses']} guesses correct); "
        f"{path}")


if __name__ == "__main__":
  app.run(main)

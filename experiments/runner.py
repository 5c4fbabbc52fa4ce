"""What the experiment commands share: flags to a config, then the run."""

import dataclasses

from absl import app
from absl import flags

from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags

# Several hosts (`fedjax_seg.run.distributed`): where to run, not what; they are
# not part of the run's configuration, so a run can resume on other hosts.
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, to run over several processes/hosts "
    "(jax.distributed); with --num_processes and --process_id. Under SLURM "
    "or on a multi-host Cloud TPU slice the environment provides them.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes (hosts) in the run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0 .. --num_processes - 1.")


def start_distributed() -> bool:
  """`jax.distributed.initialize` when the flags or a cluster ask for it
  (before any JAX computation); a bad combination is an app.UsageError."""
  from fedjax_seg.run import distributed  # pylint: disable=g-import-not-at-top
  try:
    return distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                                  _PROCESS_ID.value)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e


def run_from_flags(workdir: str, **privacy_overrides) -> dict | None:
  """Builds the config from the parsed flags (with `privacy_overrides`
  applied), runs or resumes it in `workdir` and returns the report; None if
  --stop_after_rounds interrupted it. A bad flag is an app.UsageError
  naming it."""
  try:
    config = config_flags.config_from_flags()
    if privacy_overrides:
      config = dataclasses.replace(config, privacy=dataclasses.replace(
          config.privacy, **privacy_overrides))
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  start_distributed()
  # Imported here so that --help and flag errors are fast.
  from fedjax_seg.run import loop  # pylint: disable=g-import-not-at-top
  try:
    report = loop.train_and_evaluate(config, workdir)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  if report.get("stopped_reason") == "interrupted":
    return None
  return report

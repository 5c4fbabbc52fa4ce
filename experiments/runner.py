"""What the experiment commands share: flags to a config, then the run."""

import dataclasses

from absl import app

from fedjax_seg import config as config_lib
from fedjax_seg import config_flags


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
  # Imported here so that --help and flag errors are fast.
  from fedjax_seg import experiment  # pylint: disable=g-import-not-at-top
  try:
    report = experiment.train_and_evaluate(config, workdir)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  if report.get("stopped_reason") == "interrupted":
    return None
  return report

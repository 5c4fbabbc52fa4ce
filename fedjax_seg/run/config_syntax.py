"""What the configuration's flags may hold: each choice flag's vocabulary,
the grammar of the list flags' entries (scenario changes over rounds,
augmentation by modality), and `ConfigError`, the error that names a flag.

Shared by `config.py` (which checks a config's syntax when it is built and
re-exports `ConfigError`) and by the modules that turn entries into a run
(`scenarios.py`, `setup.py`). Like `config.py`, it imports nothing of the
library: the vocabularies below are the library's, written out (a test
checks they agree).
"""

import math

ALGORITHMS = ("fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedbn")
PRIVACY_UNITS = ("example", "patient", "site")  # privacy.units.UNITS
NOISE_SCHEDULES = ("constant", "linear", "exponential", "cosine", "step")
NOISE_MECHANISMS = ("independent", "banded", "blt")  # privacy.correlated
ADAPTIVE_MODES = ("off", "geometric", "percentile")
AUDIT_CANARY_KINDS = ("random", "dirac")
# models.unet's PRESETS, NORMS and PARAM_GROUPS.
UNET_PRESETS = ("tiny", "small", "base")
NORMS = ("group", "instance")
PARAM_GROUPS = ("encoder", "decoder", "head", "norm")
# data.AUGMENTATIONS.
AUGMENTATIONS = ("flip", "affine", "intensity", "gamma", "noise")
# The federated engine's choices (federated.client and federated.rounds).
LOCAL_OPTIMIZERS = ("sgd", "momentum", "adam")
LOCAL_LOOPS = ("auto", "scan", "unroll")
PER_EXAMPLE_GRADS = ("vmap", "layers", "ghost")
BACKENDS = ("auto", "vmap", "map", "shard", "loop")


class ConfigError(ValueError):
  """An invalid setting; the message names the flag."""


def check(condition: bool, flag: str, message: str) -> None:
  """Raises ConfigError "--flag: message" unless `condition`."""
  if not condition:
    raise ConfigError(f"--{flag}: {message}")


def scenario_fields(entry: str, flag: str, count: int) -> list[str]:
  """The `count` ':'-separated fields of a scenario entry."""
  parts = [p.strip() for p in entry.split(":")]
  if len(parts) != count or not all(parts):
    raise ConfigError(
        f"--{flag}: entry {entry!r} must have {count} fields separated by "
        "':'.")
  return parts


def scenario_round(text: str, flag: str, entry: str) -> int:
  """A scenario entry's round (1-based)."""
  try:
    value = int(text)
  except ValueError as e:
    raise ConfigError(
        f"--{flag}: entry {entry!r}: round {text!r} is not an integer.") from e
  if value < 1:
    raise ConfigError(
        f"--{flag}: entry {entry!r}: rounds count from 1.")
  return value


def drift_rates(entry: str) -> tuple[str, float, float]:
  """(site, gain rate, offset rate) of an --intensity_drift entry."""
  count = 3 if entry.count(":") == 2 else 2
  parts = scenario_fields(entry, "intensity_drift", count)
  rates = []
  for text in parts[1:] + ["0"] * (3 - count):
    try:
      rates.append(float(text))
    except ValueError as e:
      raise ConfigError(
          f"--intensity_drift: entry {entry!r}: rate {text!r} is not a "
          "number.") from e
    if not math.isfinite(rates[-1]):
      raise ConfigError(
          f"--intensity_drift: entry {entry!r}: rate {text!r} is not "
          "finite.")
  return parts[0], rates[0], rates[1]


def parse_by_modality(entries) -> dict[str, tuple[str, ...]]:
  """{MODALITY: ops} from entries "MODALITY:op+op" ("XRAY:intensity+noise";
  "MRI:" for none). Raises ValueError naming a bad entry."""
  out = {}
  for entry in entries:
    modality, sep, ops = entry.partition(":")
    names = tuple(o for o in ops.split("+") if o)
    unknown = [o for o in names if o not in AUGMENTATIONS]
    if not sep or not modality.strip() or unknown:
      raise ValueError(f"{entry!r}: expected MODALITY:op+op with ops from "
                       f"{AUGMENTATIONS}.")
    out[modality.strip().upper()] = names
  return out


def any_scenario(data) -> bool:
  """Whether any flag of a scenario that changes over rounds is set."""
  return bool(data.scanner_changes or data.intensity_drift or data.site_joins
              or data.site_leaves)


def check_scenario_entries(data) -> None:
  """Checks the scenario flags' syntax (sites and rounds are checked
  against the run by `scenarios.Scenario.build`)."""
  for entry in data.scanner_changes:
    scenario_round(scenario_fields(entry, "scanner_changes", 3)[1],
                   "scanner_changes", entry)
  for entry in data.intensity_drift:
    drift_rates(entry)
  for flag in ("site_joins", "site_leaves"):
    for entry in getattr(data, flag):
      scenario_round(scenario_fields(entry, flag, 2)[1], flag, entry)

"""absl flags for every field of `fedjax_seg.run.config`, defined once.

`experiments/simulate.py` and `experiments/sweep.py` both call
`define_config_flags()`, so they accept (and `--help` lists) the same flags.
Each field of the config sections gets a flag of the same name (the model
preset is --model, DP on/off is --dp/--nodp); its type comes from the
dataclass's type hints (`typing.get_type_hints`) and its help text from the
class docstring's Attributes section (`docstring_parser`).

Example:
  >>> from absl import flags
  >>> values = flags.FlagValues()
  >>> specs = define_config_flags(values)
  >>> values(["prog", "--rounds=3", "--nodp"])
  [...'prog']
  >>> config = config_from_flags(values)
  >>> config.federated.rounds, config.privacy.enabled
  (3, False)
"""

import dataclasses
import types
import typing
from typing import Any, Mapping

from absl import flags
import docstring_parser

from fedjax_seg.run import config as config_lib

SECTIONS = {
    "data": config_lib.DataConfig,
    "model": config_lib.ModelConfig,
    "privacy": config_lib.PrivacyConfig,
    "federated": config_lib.FederatedConfig,
    "performance": config_lib.PerformanceConfig,
}
TOP_LEVEL = ("seed", "noise_seed", "sweep_member", "eval_every",
             "checkpoint_every", "stop_after_rounds",
             "release_training_diagnostics", "tensorboard")
_RENAMED = {"preset": "model", "enabled": "dp"}


@dataclasses.dataclass(frozen=True)
class FlagSpec:
  """Where a flag's value goes in the config, and its type.

  Attributes:
    name: the flag's name.
    section: the config section ("data", ...) or None for a top-level field.
    field: the dataclass field name.
    kind: int, float, bool, str or a tuple type.
    optional: the field accepts None ("none" on the command line).
  """

  name: str
  section: str | None
  field: str
  kind: Any
  optional: bool


def _field_help(cls) -> dict[str, str]:
  """{field: help} from the class docstring's Attributes section."""
  out = {}
  for param in docstring_parser.parse(cls.__doc__ or "").params:
    text = " ".join(param.description.split()) if param.description else ""
    for name in param.arg_name.split(","):
      out[name.strip()] = text
  return out


def _spec(section, cls, field, hints) -> FlagSpec:
  annotation = hints[field.name]
  optional = False
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = len(args) < len(typing.get_args(annotation))
    annotation = args[0]
  return FlagSpec(_RENAMED.get(field.name, field.name), section, field.name,
                  annotation, optional)


def _all_specs() -> list[tuple[FlagSpec, Any, str]]:
  """[(spec, default, help)] for every flag, in definition order."""
  out = []
  for section, cls in SECTIONS.items():
    hints, helps = typing.get_type_hints(cls), _field_help(cls)
    for field in dataclasses.fields(cls):
      out.append((_spec(section, cls, field, hints), field.default,
                  helps.get(field.name, f"{cls.__name__}.{field.name}")))
  cls = config_lib.ExperimentConfig
  hints, helps = typing.get_type_hints(cls), _field_help(cls)
  for field in dataclasses.fields(cls):
    if field.name in TOP_LEVEL:
      out.append((_spec(None, cls, field, hints), field.default,
                  helps.get(field.name, f"{cls.__name__}.{field.name}")))
  return out


SPECS: dict[str, FlagSpec] = {s.name: s for s, _, _ in _all_specs()}


def define_config_flags(
    flag_values: flags.FlagValues = flags.FLAGS) -> dict[str, FlagSpec]:
  """Defines one flag per config field in `flag_values`; returns the specs."""
  for spec, default, help_text in _all_specs():
    kw = dict(flag_values=flag_values)
    if spec.optional:  # A string flag, so that --name=none gives None.
      flags.DEFINE_string(spec.name, None if default is None else str(default),
                          help_text + " ('none' for None)", **kw)
    elif typing.get_origin(spec.kind) is tuple:
      flags.DEFINE_list(spec.name, [str(v) for v in default], help_text, **kw)
    elif spec.kind is bool:
      flags.DEFINE_bool(spec.name, default, help_text, **kw)
    elif spec.kind is int:
      flags.DEFINE_integer(spec.name, default, help_text, **kw)
    elif spec.kind is float:
      flags.DEFINE_float(spec.name, default, help_text, **kw)
    else:
      flags.DEFINE_string(spec.name, default, help_text, **kw)
  return dict(SPECS)


def parse_value(name: str, value: Any) -> Any:
  """`value` (a string from the command line, or already typed) as the
  flag's type; raises ConfigError naming --name."""
  if name not in SPECS:
    raise config_lib.ConfigError(f"--{name}: no such flag.")
  spec = SPECS[name]
  if value is None or (isinstance(value, str)
                       and value.strip().lower() in ("", "none")):
    if spec.optional or value is None:
      return None
    raise config_lib.ConfigError(f"--{name}: needs a value.")
  try:
    if typing.get_origin(spec.kind) is tuple:
      item = typing.get_args(spec.kind)[0]
      if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
      return tuple(item(v) for v in value)
    if spec.kind is bool:
      if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0"):
          raise ValueError("expected true or false")
        return text in ("true", "1")
      return bool(value)
    if spec.kind is int and isinstance(value, float) and not value.is_integer():
      raise ValueError("expected an integer")
    return spec.kind(value)
  except (TypeError, ValueError) as e:
    kind = getattr(spec.kind, "__name__", spec.kind)
    raise config_lib.ConfigError(
        f"--{name}: cannot read {value!r} as {kind} ({e}).") from e


def config_from_values(values: Mapping[str, Any]) -> config_lib.ExperimentConfig:
  """Builds and validates the config from {flag name: value} (every flag
  not given takes the field's default); raises ConfigError naming a flag."""
  unknown = set(values) - set(SPECS)
  if unknown:
    raise config_lib.ConfigError(
        f"--{sorted(unknown)[0]}: no such flag.")
  sections = {s: {} for s in SECTIONS}
  top = {}
  for name, value in values.items():
    spec = SPECS[name]
    (sections[spec.section] if spec.section else top)[spec.field] = (
        parse_value(name, value))
  return config_lib.ExperimentConfig(
      **{s: SECTIONS[s](**v) for s, v in sections.items()}, **top)


def config_from_flags(
    flag_values: flags.FlagValues = flags.FLAGS) -> config_lib.ExperimentConfig:
  """The config of the parsed flags (raises ConfigError naming a flag)."""
  return config_from_values({name: flag_values[name].value for name in SPECS})


def config_to_values(config: config_lib.ExperimentConfig) -> dict[str, Any]:
  """{flag name: value} of a config (inverse of `config_from_values`)."""
  out = {}
  for name, spec in SPECS.items():
    holder = getattr(config, spec.section) if spec.section else config
    out[name] = getattr(holder, spec.field)
  return out


def to_flagfile(config: config_lib.ExperimentConfig) -> str:
  """The config as flagfile lines (`--name=value`) that reproduce it."""
  lines = []
  for name, value in config_to_values(config).items():
    spec = SPECS[name]
    if spec.kind is bool and not spec.optional:
      lines.append(f"--{name}" if value else f"--no{name}")
    elif value is None:
      lines.append(f"--{name}=none")
    elif isinstance(value, tuple):
      lines.append(f"--{name}={','.join(str(v) for v in value)}")
    else:
      lines.append(f"--{name}={value!r}" if isinstance(value, float)
                   else f"--{name}={value}")
  return "\n".join(lines) + "\n"


def config_from_dict(data: Mapping[str, Any]) -> config_lib.ExperimentConfig:
  """The config of `ExperimentConfig.to_dict()` output (e.g. a report's
  "config"), validated as flags are."""
  values = {}
  for name, spec in SPECS.items():
    holder = data[spec.section] if spec.section else data
    if spec.field in holder:
      values[name] = holder[spec.field]
  if "noise_seed" not in data and "seed" in data:
    # Written before --noise_seed existed: that run drew its noise from
    # --seed (what --noise_seed=SEED does now).
    values["noise_seed"] = data["seed"]
  return config_from_values(values)

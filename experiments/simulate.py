r"""Simulate federated training of a segmentation U-Net under DP.

With no flags: the built-in synthetic dataset (8 sites, CT/MRI/X-ray), the
tiny U-Net, FedAvg with patient-level DP-SGD in every site.

  python -m experiments.simulate --workdir=runs/default
  python -m experiments.simulate --flagfile=experiments/flags/nonprivate.flags \
      --workdir=runs/nonprivate

Every field of `fedjax_seg.config` has a flag of the same name (the model
preset is --model, DP on/off is --dp/--nodp). Outputs in --workdir:
report.json, rounds.csv, PNG plots, checkpoints (a rerun resumes).
"""

import dataclasses
import re
import types
import typing

from absl import app
from absl import flags
from absl import logging

from fedjax_seg import config as config_lib

_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Output directory (resumes if it has a run).")

_SECTIONS = {
    "data": config_lib.DataConfig,
    "model": config_lib.ModelConfig,
    "privacy": config_lib.PrivacyConfig,
    "federated": config_lib.FederatedConfig,
    "performance": config_lib.PerformanceConfig,
}
_TOP_LEVEL = ("seed", "eval_every", "checkpoint_every", "stop_after_rounds",
              "release_training_diagnostics")
_RENAMED = {"preset": "model", "enabled": "dp"}
_FLAGS: dict[str, tuple[str | None, str, type]] = {}


def _field_help(cls) -> dict[str, str]:
  """Per-field help from the class docstring's Attributes section."""
  doc = cls.__doc__ or ""
  out, current = {}, None
  for line in doc.splitlines():
    m = re.match(r"^    ([a-z_, ]+): (.*)$", line)
    if m:
      current = [n.strip() for n in m.group(1).split(",")]
      for n in current:
        out[n] = m.group(2)
    elif current and line.startswith("      "):
      for n in current:
        out[n] += " " + line.strip()
    else:
      current = None
  return out


def _base_type(annotation):
  args = typing.get_args(annotation)
  if typing.get_origin(annotation) in (typing.Union, types.UnionType):
    annotation = next(a for a in args if a is not type(None))
  return annotation


def _define(section, cls, field, helps):
  name = _RENAMED.get(field.name, field.name)
  default = field.default
  kind = _base_type(field.type if not isinstance(field.type, str)
                    else eval(field.type, vars(config_lib)))  # pylint: disable=eval-used
  help_text = helps.get(field.name, f"{cls.__name__}.{field.name}")
  optional = type(None) in typing.get_args(
      field.type if not isinstance(field.type, str)
      else eval(field.type, vars(config_lib)))  # pylint: disable=eval-used
  if optional:  # A string flag, so that --name=none gives None.
    flags.DEFINE_string(name, None if default is None else str(default),
                        help_text + " ('none' for None)")
  elif typing.get_origin(kind) is tuple:
    flags.DEFINE_list(name, [str(v) for v in default], help_text)
  elif kind is bool:
    flags.DEFINE_bool(name, default, help_text)
  elif kind is int:
    flags.DEFINE_integer(name, default, help_text)
  elif kind is float:
    flags.DEFINE_float(name, default, help_text)
  else:
    flags.DEFINE_string(name, default, help_text)
  _FLAGS[name] = (section, field.name, kind)


for _section, _cls in _SECTIONS.items():
  _helps = _field_help(_cls)
  for _field in dataclasses.fields(_cls):
    _define(_section, _cls, _field, _helps)
_helps = _field_help(config_lib.ExperimentConfig)
for _field in dataclasses.fields(config_lib.ExperimentConfig):
  if _field.name in _TOP_LEVEL:
    _define(None, config_lib.ExperimentConfig, _field, _helps)


def _convert(name: str, value, kind):
  if value is None or (isinstance(value, str)
                       and value.strip().lower() in ("", "none")):
    return None
  try:
    if typing.get_origin(kind) is tuple:
      item = typing.get_args(kind)[0]
      return tuple(item(v) for v in value)
    if kind in (int, float) and isinstance(value, str):
      return kind(value)
  except ValueError as e:
    raise app.UsageError(f"--{name}: cannot read {value!r} ({e}).") from e
  return value


def config_from_flags() -> config_lib.ExperimentConfig:
  """Builds and validates the config (raises ConfigError naming a flag)."""
  sections = {s: {} for s in _SECTIONS}
  top = {}
  for name, (section, field, kind) in _FLAGS.items():
    value = _convert(name, flags.FLAGS[name].value, kind)
    (sections[section] if section else top)[field] = value
  return config_lib.ExperimentConfig(
      **{s: _SECTIONS[s](**v) for s, v in sections.items()}, **top)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = config_from_flags()
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  # Imported here so that --help and flag errors are fast.
  from fedjax_seg import experiment  # pylint: disable=g-import-not-at-top
  try:
    report = experiment.train_and_evaluate(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  if report.get("stopped_reason") == "interrupted":
    return
  p = report["privacy"]
  eps = (f"{p['epsilon_label']} max {p['epsilon_max']:.3f} (delta "
         f"{p['delta']:g}; verified: {p['verified']['ok']})" if p["enabled"]
         else "NOT PRIVATE (--nodp)")
  dice = report["metrics"]["dice_per_modality"]
  logging.info("done: %d rounds (%s); test Dice %s; %s; report in %s",
               report["rounds_completed"], report["stopped_reason"],
               {k: None if v is None else round(v, 3) for k, v in
                dice.items()}, eps, _WORKDIR.value)
  print(f"rounds {report['rounds_completed']} ({report['stopped_reason']}) | "
        f"test Dice per modality "
        f"{ {k: None if v is None else round(v, 3) for k, v in dice.items()} }"
        f" | {eps} | {_WORKDIR.value}/report.json")


if __name__ == "__main__":
  app.run(main)

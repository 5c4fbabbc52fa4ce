r"""Gradient inversion against a run's updates: `python -m experiments.attack`.

Attacks what the server of a run could see: for held-out test patients'
slices at the chosen sites, the update one local step on B of them would
release, at the first round (the initial model) and the last (the final
model), without DP and with DP at the run's sigma (per-slice clipping, and
the slices clipped together as one patient), with the "inverting gradients"
attack (`fedjax_seg.attacks`). See `fedjax_seg/run/attack_study.py`.

  # Attack a finished run (its settings are read from its report.json):
  python -m experiments.attack --workdir=runs/default
  # No run in --workdir: train one with simulate's flags first, then attack.
  python -m experiments.attack --workdir=runs/attack_eps1 --target_epsilon=1 \
      --attack_sites=ct_scanner_a,mri_t1_15t --attack_batch_sizes=1

Writes --workdir/attack.json (per attacked update: SSIM, PSNR, MSE per
target and their mean/std/min/max; sigma, clip norm and the epsilon of the
setting) and attack_<site>_b<B>.png (true slices, then each round and
setting's reconstruction).
"""

import json
import math
import pathlib

from absl import app
from absl import flags
from absl import logging

from experiments import runner
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags

_WORKDIR = flags.DEFINE_string(
    "workdir", "runs/default",
    "The run to attack; with no finished run there, one is trained with the "
    "other flags first.")
_SITES = flags.DEFINE_list("attack_sites", [],
                           "Sites to attack (default: the first training "
                           "site).")
_TARGETS = flags.DEFINE_integer(
    "attack_targets", 2, "Targets (held-out test patients) per site and B.")
_BATCH_SIZES = flags.DEFINE_list("attack_batch_sizes", ["1", "4"],
                                 "Batch sizes B of the attacked steps.")
_ROUNDS = flags.DEFINE_list("attack_rounds", ["first", "last"],
                            "Rounds: first (initial model), last (final).")
_SETTINGS = flags.DEFINE_list(
    "attack_settings", ["nodp", "example", "patient"],
    "Updates: nodp (mean gradient), example (per-slice clipping + noise), "
    "patient (the slices clipped as one patient + noise).")
_ITERATIONS = flags.DEFINE_integer("attack_iterations", 300,
                                   "Attack optimisation steps per restart.")
_RESTARTS = flags.DEFINE_integer("attack_restarts", 1,
                                 "Random restarts (best objective kept).")
_LEARNING_RATE = flags.DEFINE_float("attack_learning_rate", 0.05,
                                    "Adam step on the signed image gradient.")
_TV = flags.DEFINE_float("attack_tv", 0.01, "Total-variation weight.")
_OPTIMIZE_MASK = flags.DEFINE_bool(
    "attack_optimize_mask", False,
    "Optimise the masks too (default: the attacker knows them).")
config_flags.define_config_flags()

ATTACK_JSON = "attack.json"


def _stored_config(workdir: pathlib.Path):
  """The config of the finished run in `workdir` (None if none), after
  checking that no config flag given on the command line contradicts it."""
  path = workdir / "report.json"
  if not path.exists():
    return None
  config = config_flags.config_from_dict(
      json.loads(path.read_text())["config"])
  stored = config_flags.config_to_values(config)
  for name in config_flags.SPECS:
    if flags.FLAGS[name].present:
      given = config_flags.parse_value(name, flags.FLAGS[name].value)
      if given != stored[name]:
        raise app.UsageError(
            f"--{name}={flags.FLAGS[name].value}: the run in --workdir="
            f"{workdir} was made with --{name}={stored[name]}; leave the flag"
            " out, or use a new --workdir to train another run.")
  return config


def _study_config():
  from fedjax_seg.attacks import gradient_inversion  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import attack_study as study  # pylint: disable=g-import-not-at-top
  try:
    batch_sizes = tuple(int(b) for b in _BATCH_SIZES.value)
    inversion = gradient_inversion.InversionConfig(
        iterations=_ITERATIONS.value, restarts=_RESTARTS.value,
        learning_rate=_LEARNING_RATE.value, tv_weight=_TV.value,
        optimize_mask=_OPTIMIZE_MASK.value)
  except ValueError as e:
    raise app.UsageError(f"--attack_*: {e}") from e
  return study.StudyConfig(
      sites=tuple(_SITES.value), targets=_TARGETS.value,
      batch_sizes=batch_sizes, rounds=tuple(_ROUNDS.value),
      settings=tuple(_SETTINGS.value), inversion=inversion)


def _finite_or_none(value):
  """JSON-ready: NaN and inf become null (strict JSON has neither)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _finite_or_none(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_finite_or_none(v) for v in value]
  return value


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = pathlib.Path(_WORKDIR.value)
  try:
    study_config = _study_config()
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  config = _stored_config(workdir)
  if config is None:
    logging.info("no finished run in %s: training one", workdir)
    if runner.run_from_flags(str(workdir)) is None:
      return
    config = config_flags.config_from_flags()
  else:
    runner.start_distributed()  # (run_from_flags started it above.)
  # Imported here so that --help and flag errors are fast.
  from fedjax_seg.run import distributed  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import artifacts  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import data as data_lib  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import loop  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import attack_study as study  # pylint: disable=g-import-not-at-top
  from fedjax_seg.data import sites as sites_lib  # pylint: disable=g-import-not-at-top
  splits = data_lib.load(config.data, config.data_seed)
  try:
    sim = loop.Simulation(config, workdir, splits=splits)
    results, images = study.run_study(
        sim, study_config, sites_lib.stack_sites(splits["train"]))
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from e
  if not distributed.is_writer():
    return  # Host 0 writes for all hosts.
  grids = study.write_grids(workdir, results, images)
  results["grids"] = [p.name for p in grids]
  path = workdir / ATTACK_JSON
  artifacts.atomic_write(path, json.dumps(
      _finite_or_none(results), indent=1, allow_nan=False).encode())
  for e in results["attacks"]:
    eps = ("no DP" if e["epsilon"] is None
           else f"{e['epsilon_label']} {e['epsilon']:.2f}")
    print(f"{e['site']} B={e['batch_size']} round {e['round']:5s} "
          f"{e['setting']:7s} SSIM {e['ssim']['mean']:.3f} "
          f"+- {e['ssim']['std']:.3f}  PSNR {e['psnr']['mean']:5.1f} dB  "
          f"({eps})")
  print(f"wrote {path} and {', '.join(p.name for p in grids)}")


if __name__ == "__main__":
  app.run(main)

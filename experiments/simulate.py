r"""Simulate federated training of a segmentation U-Net under DP.

With no flags: the built-in synthetic dataset (8 sites, CT/MRI/X-ray), the
tiny U-Net, FedAvg with patient-level DP-SGD in every site.

  python -m experiments.simulate --workdir=runs/default
  python -m experiments.simulate --flagfile=experiments/flags/nonprivate.flags \
      --workdir=runs/nonprivate

Every field of `fedjax_seg.run.config` has a flag of the same name (the model
preset is --model, DP on/off is --dp/--nodp). Outputs in --workdir:
report.json, rounds.csv, PNG plots, checkpoints (a rerun resumes).
"""

from absl import app
from absl import flags
from absl import logging

from experiments import runner
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/default",
                               "Output directory (resumes if it has a run).")
config_flags.define_config_flags()


def config_from_flags() -> config_lib.ExperimentConfig:
  """Builds and validates the config (raises ConfigError naming a flag)."""
  return config_flags.config_from_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  report = runner.run_from_flags(_WORKDIR.value)
  if report is None:
    return
  from fedjax_seg.run import distributed  # pylint: disable=g-import-not-at-top
  if not distributed.is_writer():
    return  # Host 0 reports for all hosts.
  p = report["privacy"]
  eps = (f"{p['epsilon_label']} max {p['epsilon_max']:.3f} (delta "
         f"{p['delta']:g}; verified: {p['verified']['ok']})" if p["enabled"]
         else "NOT PRIVATE (--nodp)")
  dice = report["metrics"]["dice_per_modality"]
  logging.info("done: %d rounds (%s); test Dice %s; %s; report in %s",
               report["rounds_completed"], report["stopped_reason"],
               {k: None if v is None else round(v, 3) for k, v in
                dice.items()}, eps, _WORKDIR.value)
  if p.get("audit"):
    a = p["audit"]
    eps += (f" | audit: lower bound {a['epsilon_lower_bound']:.3f} vs "
            f"claimed {a['claimed_epsilon']:.3f} at {a['site']}")
  print(f"rounds {report['rounds_completed']} ({report['stopped_reason']}) | "
        f"test Dice per modality "
        f"{ {k: None if v is None else round(v, 3) for k, v in dice.items()} }"
        f" | {eps} | {_WORKDIR.value}/report.json")


if __name__ == "__main__":
  app.run(main)

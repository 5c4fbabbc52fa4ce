r"""Is the synthetic data's domain shift real? Pooled vs single-site training.

Trains the same non-private U-Net (a) on the training patients of all sites
pooled, and (b) on the training patients of one site only, then evaluates
both on every site's test patients: mean foreground Dice per site and per
modality. A model trained on one modality should do clearly worse on the
others than the pooled model does.

  python -m experiments.domain_shift --steps=300 --output=domain_shift.json
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

from fedjax_seg.segmentation import centralized
from fedjax_seg.segmentation import evaluation
from fedjax_seg import models
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic

_STEPS = flags.DEFINE_integer("steps", 300, "Adam steps per model.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Slices per step.")
_LR = flags.DEFINE_float("learning_rate", 3e-3, "Adam learning rate.")
_MODEL = flags.DEFINE_enum("model", "tiny", list(models.PRESETS),
                           "U-Net preset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "Synthetic image side.")
_SOURCES = flags.DEFINE_list(
    "single_sites", ["xray_digital", "ct_scanner_a"],
    "Sites to train single-site models on.")
_PATIENTS_SCALE = flags.DEFINE_float(
    "patients_scale", 1.0, "Multiplies every synthetic site's patient count.")
_SEED = flags.DEFINE_integer("seed", 0, "Data, split and training seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON here.")


def _summary(result, data):
  fg_site = np.nanmean(result["dice_per_site"][:, 1:], axis=-1)
  fg_mod = np.nanmean(result["dice_per_modality"][:, 1:], axis=-1)
  return {"dice_per_site": dict(zip(data.site_names, map(float, fg_site))),
          "dice_per_modality": dict(zip(data.modality_names,
                                        map(float, fg_mod)))}


def main(argv):
  del argv
  if _STEPS.value < 1 or _BATCH.value < 1:
    raise app.UsageError("--steps and --batch_size must be >= 1.")
  if not _PATIENTS_SCALE.value > 0:
    raise app.UsageError("--patients_scale must be > 0.")
  config = synthetic.SyntheticConfig(image_size=_IMAGE_SIZE.value,
                                     patients_scale=_PATIENTS_SCALE.value,
                                     seed=_SEED.value)
  data = synthetic.generate(config)
  unknown = set(_SOURCES.value) - set(data.site_names)
  if unknown:
    raise app.UsageError(f"--single_sites: unknown {sorted(unknown)}; sites "
                         f"are {list(data.site_names)}.")
  parts = sites.split_by_patient(data, seed=_SEED.value)
  test = sites.stack_sites(parts["test"])
  model = models.SegmentationModel(models.preset(_MODEL.value))
  train_config = centralized.TrainConfig(_STEPS.value, _BATCH.value,
                                         _LR.value, _SEED.value)
  report = {"config": {"steps": _STEPS.value, "batch_size": _BATCH.value,
                       "model": _MODEL.value, "image_size": _IMAGE_SIZE.value,
                       "seed": _SEED.value},
            "device": str(jax.devices()[0]), "runs": {}}
  trainings = [("pooled", parts["train"])] + [
      (f"only_{s}", parts["train"].select(
          parts["train"].site == data.site_names.index(s)))
      for s in _SOURCES.value]
  for name, train_data in trainings:
    start = time.time()
    params, losses = centralized.train(model, train_data, train_config)
    seconds = time.time() - start
    summary = _summary(evaluation.evaluate(model, params, test), data)
    summary.update(train_seconds=seconds, final_loss=losses[-1],
                   train_slices=train_data.num_examples)
    report["runs"][name] = summary
    logging.info("%s: %.0f s, Dice per modality %s", name, seconds,
                 {k: round(v, 3) for k, v in
                  summary["dice_per_modality"].items()})
  header = "run".ljust(22) + "".join(m.rjust(8) for m in data.modality_names)
  print(header)
  for name, run in report["runs"].items():
    print(name.ljust(22) + "".join(f"{run['dice_per_modality'][m]:8.3f}"
                                   for m in data.modality_names))
  if _OUTPUT.value:
    tmp = _OUTPUT.value + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
    os.replace(tmp, _OUTPUT.value)


if __name__ == "__main__":
  app.run(main)

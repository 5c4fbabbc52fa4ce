r"""Segment new NIfTI scans with a trained run's model.

  python -m experiments.predict --workdir=runs/default \
      --input=scans/ --output_dir=runs/default/predictions

--input is one NIfTI file, a folder of them, an MSD task folder (imagesTr
with labelsTr, and imagesTs) or a CSV with an image column (optional label,
modality and case columns). Each scan is preprocessed as the run's training
data were (the settings stored with its prepared dataset, or the built-in
data's), segmented (2D models slice by slice, 3D models in tiles of the
training depth), mapped back onto the scan's own voxel grid and written as
<case>_seg.nii.gz (uint8, the scan's shape, affine and header); with
--probabilities also <case>_probabilities.nii.gz. With labels, metrics.json
holds Dice, IoU and HD95 (mm) per case and class. The model is the run's
released (DP) model: predictions are post-processing and cost no privacy.
"""

from absl import app
from absl import flags
from absl import logging

from fedjax_seg.run import predict

_WORKDIR = flags.DEFINE_string("workdir", None,
                               "The simulate run whose model to apply.")
_INPUT = flags.DEFINE_string(
    "input", None, "A NIfTI file, a folder of them, an MSD task folder, or a "
    "CSV with an image column (label, modality, case optional).")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None,
                                  "Where the label maps go.")
_ROUND = flags.DEFINE_integer(
    "round", None, "Use the checkpoint after this many rounds (default: the "
    "latest; a run keeps its last two).")
_SITE = flags.DEFINE_string(
    "site", None, "FedBN runs (required there): the site whose "
    "normalisation parameters to use (and whose modality scans without "
    "one are taken to have).")
_MODALITY = flags.DEFINE_string(
    "modality", None, "The scans' modality (CT, MRI, X-ray, ...) when the "
    "run's sites have several and the CSV has no modality column; it picks "
    "the run's normalisation for that modality.")
_PROBABILITIES = flags.DEFINE_bool(
    "probabilities", False, "Also write per-class probability maps.")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the run's prepared dataset is now (default: "
    "the run's --data_dir); its stats file holds the preprocessing.")
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", None, "Slices per model call (default: by image size).")

flags.mark_flags_as_required(["workdir", "input", "output_dir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _BATCH_SIZE.value is not None and _BATCH_SIZE.value < 1:
    raise app.UsageError("--batch_size must be >= 1.")
  try:
    cases = predict.find_cases(_INPUT.value)
    trained = predict.load_trained(_WORKDIR.value, _ROUND.value,
                                   _SITE.value, _DATA_DIR.value)
    if trained.round_index < trained.rounds_planned:
      logging.warning("%s: using the checkpoint after round %d of %d (the "
                      "run has not finished).", _WORKDIR.value,
                      trained.round_index, trained.rounds_planned)
    summary = predict.predict_cases(trained, cases, _OUTPUT_DIR.value,
                                    _PROBABILITIES.value, _BATCH_SIZE.value,
                                    modality=_MODALITY.value)
  except predict.PredictError as e:
    raise app.UsageError(str(e)) from e
  dice = summary["dice_mean_foreground"]
  print(f"segmented {summary['cases']} case(s) in {summary['seconds']:.1f} s"
        f" with {_WORKDIR.value} (round {trained.round_index})"
        + (f" | mean foreground Dice {dice:.3f} over "
           f"{len(summary['metrics'])} labelled case(s)" if dice is not None
           else "")
        + f" | {_OUTPUT_DIR.value}")


if __name__ == "__main__":
  app.run(main)

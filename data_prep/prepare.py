r"""Prepare a NIfTI dataset (MSD folder or CSV) as a TFDS slice dataset.

MSD task (sites assigned by a hash of the patient id):
  python -m data_prep.prepare --input=Task03_Liver --output_dir=DATA_DIR \
      --name=msd_liver --image_size=128 --target_spacing=1.5,1.5,3 \
      --site_rule=hash --num_sites=4

CSV with columns image,label,site,patient[,split][,modality]:
  python -m data_prep.prepare --input=cases.csv --output_dir=DATA_DIR \
      --name=my_hospitals --class_names=background,organ,lesion

The simulator then reads it with --dataset=NAME --data_dir=DATA_DIR.
"""

from absl import app
from absl import flags
from absl import logging

from fedjax_seg.data import nifti
from fedjax_seg.data import prepare

_INPUT = flags.DEFINE_string(
    "input", None, "MSD task folder (with dataset.json) or CSV of cases.",
    required=True)
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "TFDS data dir to write NAME into.", required=True)
_NAME = flags.DEFINE_string("name", None, "Dataset name (lower_snake_case).",
                            required=True)
_IMAGE_SIZE = flags.DEFINE_list(
    "image_size", ["128"], "In-plane size: one int (square) or H,W.")
_TARGET_SPACING = flags.DEFINE_list(
    "target_spacing", [], "Resample to this spacing in mm: x,y,z (RAS). "
    "Empty: keep the files' spacing.")
_SLICE_AXIS = flags.DEFINE_integer(
    "slice_axis", 2, "RAS axis to slice along: 0 sagittal, 1 coronal, 2 axial.")
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", None, list(nifti.NORMALIZATIONS),
    "Force one normalisation; default: from each case's modality.")
_CT_WINDOW = flags.DEFINE_list("ct_window", ["-160", "240"],
                               "CT window low,high in HU.")
_BACKGROUND_FRACTION = flags.DEFINE_float(
    "background_slice_fraction", 0.1,
    "Fraction of slices without foreground that are kept.")
_LABEL_MAP = flags.DEFINE_list(
    "label_map", [], "Label remapping src:dst,... e.g. 2:1 merges tumour into "
    "organ.")
_CLASS_NAMES = flags.DEFINE_list(
    "class_names", None, "Names of the output classes, background first.")
_MODALITY = flags.DEFINE_string(
    "modality", None, "Modality of cases that declare none (CT, MRI, ...).")
_SITE_RULE = flags.DEFINE_enum(
    "site_rule", None, list(prepare.SITE_RULES),
    "Site assignment; default: csv for a CSV, hash for an MSD folder.")
_NUM_SITES = flags.DEFINE_integer("num_sites", 4,
                                  "Sites for --site_rule=hash|dirichlet.")
_ALPHA = flags.DEFINE_float("dirichlet_alpha", 0.5,
                            "Dirichlet concentration (small = more skew).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the background-slice choice "
                             "and of the Dirichlet split.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Replace a dataset built from other inputs.")


def _floats(flag, values, count):
  try:
    out = tuple(float(v) for v in values)
  except ValueError as e:
    raise app.UsageError(f"--{flag}: expected numbers, got {values}.") from e
  if len(out) != count:
    raise app.UsageError(f"--{flag}: expected {count} values, got {values}.")
  return out


def main(argv):
  del argv
  size = [int(v) for v in _IMAGE_SIZE.value]
  if len(size) == 1:
    size = size * 2
  try:
    label_map = {int(a): int(b) for a, b in
                 (item.split(":") for item in _LABEL_MAP.value)}
  except ValueError as e:
    raise app.UsageError(f"--label_map: expected src:dst pairs, got "
                         f"{_LABEL_MAP.value}.") from e
  try:
    config = nifti.PreprocessConfig(
        image_size=tuple(size),
        target_spacing=(_floats("target_spacing", _TARGET_SPACING.value, 3)
                        if _TARGET_SPACING.value else None),
        slice_axis=_SLICE_AXIS.value,
        normalization=_NORMALIZATION.value,
        ct_window=_floats("ct_window", _CT_WINDOW.value, 2),
        background_slice_fraction=_BACKGROUND_FRACTION.value,
        label_map=label_map or None,
        seed=_SEED.value)
    rule = None
    if _SITE_RULE.value is not None:
      rule = prepare.SiteRule(_SITE_RULE.value, _NUM_SITES.value,
                              _ALPHA.value, _SEED.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  path = prepare.prepare_dataset(
      _INPUT.value, _OUTPUT_DIR.value, _NAME.value, config, rule,
      class_names=_CLASS_NAMES.value, modality=_MODALITY.value,
      overwrite=_OVERWRITE.value)
  logging.info("dataset ready: %s", path)
  print(path)


if __name__ == "__main__":
  app.run(main)

r"""Write the built-in synthetic patients as NIfTI files and a cases CSV.

  python -m data_prep.export_synthetic --output_dir=runs/nifti_cases \
      --image_size=64 --num_slices=16 --sites=ct_scanner_a,mri_t1_1p5t
  python -m data_prep.prepare --input=runs/nifti_cases/cases.csv \
      --output_dir=runs/nifti_data --name=synthetic_nifti --image_size=64 \
      --class_names=background,organ,lesion

See `fedjax_seg/data/export.py`.
"""

from absl import app
from absl import flags

from fedjax_seg.data import export
from fedjax_seg.data import synthetic

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write.",
                                  required=True)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "In-plane size.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 16, "Slices per CT/MRI "
                                   "volume.")
_PATIENTS_SCALE = flags.DEFINE_float("patients_scale", 1.0,
                                     "Scales every site's patient count.")
_SITES = flags.DEFINE_list("sites", [], "Synthetic sites (default: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic data.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    config = synthetic.SyntheticConfig(
        image_size=_IMAGE_SIZE.value, num_slices=_NUM_SLICES.value,
        patients_scale=_PATIENTS_SCALE.value, seed=_SEED.value)
    print(export.write_nifti_cases(_OUTPUT_DIR.value, config,
                                   tuple(_SITES.value)))
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  app.run(main)

r"""Write a 4-site brain MRI cohort made from the ICBM 2009a template.

  pip install -e '.[templates]'   # nilearn's wheel ships the template
  python -m data_prep.brain_template --output_dir=runs/brain_cases
  python -m data_prep.prepare --input=runs/brain_cases/cases.csv \
      --output_dir=runs/brain_data --name=icbm_brain --image_size=64 \
      --target_spacing=3.5,3.5,5 --class_names=background,gray_matter,white_matter

360 patients (120/100/80/60 over four scanner profiles), 8 axial slices of
5 mm each, labels 0 background, 1 gray matter, 2 white matter. See
`fedjax_seg/data/brain_template.py` for what is real and what is simulated.
"""

from absl import app
from absl import flags
import tqdm

from fedjax_seg.data import brain_template

_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write (must "
                                  "not exist).", required=True)
_PATIENTS_SCALE = flags.DEFINE_float("patients_scale", 1.0,
                                     "Scales every site's patient count.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every patient's anatomy and "
                             "acquisition.")
_TEMPLATE_T1 = flags.DEFINE_string(
    "template_t1", None, "T1 NIfTI to use instead of nilearn's ICBM 2009a "
    "(with --template_gm and --template_wm on its grid).")
_TEMPLATE_GM = flags.DEFINE_string("template_gm", None,
                                   "Gray-matter probability NIfTI.")
_TEMPLATE_WM = flags.DEFINE_string("template_wm", None,
                                   "White-matter probability NIfTI.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  given = [_TEMPLATE_T1.value, _TEMPLATE_GM.value, _TEMPLATE_WM.value]
  if any(given) and not all(given):
    raise app.UsageError("--template_t1, --template_gm and --template_wm go "
                         "together.")
  try:
    config = brain_template.CohortConfig(patients_scale=_PATIENTS_SCALE.value,
                                         seed=_SEED.value)
  except ValueError as e:
    raise app.UsageError(f"--patients_scale: {e}") from e
  try:
    template = brain_template.load_template(*given) if any(given) else (
        brain_template.load_template())
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from e
  total = sum(len(brain_template.patient_ids(s, config))
              for s in brain_template.SITES)
  with tqdm.tqdm(total=total, desc="writing patients", unit="patient",
                 disable=None) as progress:
    path = brain_template.write_cohort(_OUTPUT_DIR.value, template,
                                       config=config, progress=progress)
  print(path)


if __name__ == "__main__":
  app.run(main)

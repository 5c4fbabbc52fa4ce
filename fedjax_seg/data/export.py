"""The built-in synthetic patients as NIfTI files and a cases CSV.

`write_nifti_cases` writes each patient of the chosen synthetic sites as an
image and a label volume (nibabel, `.nii.gz`) in physical units a scanner
would store (CT in Hounsfield units, MRI as a positive magnitude, X-ray as a
one-slice intensity image), plus `cases.csv` with the columns
`data_prep.prepare` reads (image, label, site, patient, modality). Preparing
that CSV runs the whole real-data path (reorientation, resampling,
normalisation by modality, crop/pad, TFDS) on data whose ground truth is
known, without downloading anything: for tests, benchmarks and for trying
the pipeline before real scans are at hand.
"""

import csv
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np

from fedjax_seg.data import synthetic


def write_nifti_cases(out_dir: str | os.PathLike,
                      config: synthetic.SyntheticConfig = (
                          synthetic.SyntheticConfig()),
                      sites: Sequence[str] = (),
                      spacing: tuple[float, float, float] = (1.0, 1.0, 2.5)
                      ) -> pathlib.Path:
  """Writes the patients of `sites` (names; empty = all) and returns the
  path of the cases CSV.

  Volumes are stored x, y, z = (row, column, slice) with a diagonal affine
  of `spacing` mm (RAS), so that axial slices are along axis 2 (prepare's
  default `--slice_axis`) and come back as the synthetic slices.
  """
  out = pathlib.Path(out_dir)
  names = [s.name for s in config.sites]
  unknown = [s for s in sites if s not in names]
  if unknown:
    raise ValueError(f"--sites: unknown synthetic sites {unknown}; choose "
                     f"from {names}.")
  chosen = [names.index(s) for s in sites] if sites else range(len(names))
  rows = []
  for k in chosen:
    spec = config.sites[k]
    for p in range(config.num_patients(k)):
      image, label = synthetic.patient_volume(config, k, p)  # [D, S, S]
      if spec.modality == "CT":
        lo, hi = synthetic.CT_WINDOW
        stored = image * (hi - lo) + lo  # Back to HU (inside the window).
      elif spec.modality == "MRI":
        stored = (image - image.min()) * 100.0  # A positive magnitude.
      else:
        stored = image * 1000.0
      affine = np.diag(list(spacing) + [1.0])
      patient = f"{spec.name}_p{p:03d}"
      paths = {}
      for kind, volume, dtype in (("image", stored, np.float32),
                                  ("label", label, np.uint8)):
        path = out / kind / f"{patient}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        # [D, rows, cols] -> x = row, y = column, z = slice (a prepared
        # slice is volume[:, :, z] as [rows, columns]).
        data = np.ascontiguousarray(np.transpose(volume, (1, 2, 0)), dtype)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.nii.gz")
        nib.save(nib.Nifti1Image(data, affine), str(tmp))
        os.replace(tmp, path)
        paths[kind] = f"{kind}/{path.name}"
      rows.append({"image": paths["image"], "label": paths["label"],
                   "site": spec.name, "patient": patient,
                   "modality": spec.modality})
  path = out / "cases.csv"
  tmp = path.with_name(f".cases.{os.getpid()}.csv.tmp")
  with open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)
  return path

"""Small NIfTI datasets written by the tests with nibabel (never downloaded)."""

import csv
import json
import pathlib

import nibabel as nib
import numpy as np

SHAPE = (24, 20, 6)  # x, y, z voxels.
SPACING = (1.0, 1.0, 2.5)


def volume_pair(seed: int, lesion: bool = True, shape=SHAPE):
  """A CT-like image (HU) and its labels (0 bg, 1 organ, 2 lesion)."""
  rng = np.random.default_rng(seed)
  x, y, z = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
  cx, cy = shape[0] / 2 + rng.uniform(-2, 2), shape[1] / 2 + rng.uniform(-2, 2)
  organ = ((x - cx) / 7) ** 2 + ((y - cy) / 5) ** 2 + ((z - 2.5) / 2.2) ** 2 <= 1
  label = organ.astype(np.uint8)
  if lesion:
    label[((x - cx) ** 2 + (y - cy) ** 2 <= 4) & organ] = 2
  image = np.where(organ, 60.0, -100.0) + rng.normal(0, 10, shape)
  image[label == 2] = 20.0
  return image.astype(np.float32), label


def affine(spacing=SPACING):
  return np.diag(list(spacing) + [1.0])


def save(path, data, aff=None):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine() if aff is None else aff), str(path))
  return path


def write_msd(root, num_cases=6, modality="CT"):
  """An MSD task folder: dataset.json, imagesTr/, labelsTr/."""
  root = pathlib.Path(root)
  training = []
  for i in range(num_cases):
    image, label = volume_pair(i, lesion=i % 2 == 0)
    save(root / "imagesTr" / f"case_{i:03d}.nii.gz", image)
    save(root / "labelsTr" / f"case_{i:03d}.nii.gz", label)
    training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz",
                     "label": f"./labelsTr/case_{i:03d}.nii.gz"})
  meta = {"name": "Test", "modality": {"0": modality},
          "labels": {"0": "background", "1": "organ", "2": "lesion"},
          "numTraining": num_cases, "training": training}
  (root / "dataset.json").write_text(json.dumps(meta))
  return root


def write_csv(root, sites=("hospital_a", "hospital_b"), patients_per_site=3,
              with_split=False):
  """A CSV of cases with columns image,label,site,patient[,split]."""
  root = pathlib.Path(root)
  rows = []
  for s, site in enumerate(sites):
    for p in range(patients_per_site):
      image, label = volume_pair(100 * s + p)
      name = f"{site}_p{p}"
      save(root / "img" / f"{name}.nii.gz", image)
      save(root / "lbl" / f"{name}.nii.gz", label)
      row = {"image": f"img/{name}.nii.gz", "label": f"lbl/{name}.nii.gz",
             "site": site, "patient": name, "modality": "CT"}
      if with_split:
        row["split"] = ["train", "val", "test"][p % 3]
      rows.append(row)
  path = root / "cases.csv"
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path

"""NIfTI volumes -> normalised 2D slices (nibabel, numpy, scipy; host side).

Two input layouts:
  * Medical Segmentation Decathlon (MSD): a folder with `dataset.json`,
    `imagesTr/` and `labelsTr/`.
  * A CSV with columns `image,label,site,patient` and optional `split`
    (train/val/test) and `modality`; relative paths are relative to the CSV.

Each case is checked, and any problem raises `DataError` naming the file:
unreadable NIfTI, image/label shape or affine mismatch, NaN/inf voxels, label
values outside the declared set, empty volumes.
"""

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Mapping, Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

NORMALIZATIONS = ("CT", "MRI", "generic")
_MODALITY_ALIASES = {"CT": "CT", "MRI": "MRI", "MR": "MRI", "T1": "MRI",
                     "T2": "MRI", "T1W": "MRI", "T2W": "MRI", "FLAIR": "MRI",
                     "T1GD": "MRI", "ADC": "MRI", "XRAY": "generic",
                     "X-RAY": "generic", "CR": "generic", "DX": "generic"}


class DataError(ValueError):
  """Bad input data; the message names the offending file."""


@dataclasses.dataclass(frozen=True)
class CaseRef:
  """One labelled case on disk."""

  image: str
  label: str
  patient: str
  site: str | None = None
  split: str | None = None
  modality: str | None = None


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How volumes become slices.

  Attributes:
    image_size: (H, W) of every slice after crop/pad, in pixels.
    target_spacing: voxel spacing in mm (x, y, z in RAS) to resample to, or
      None to keep the file's spacing.
    slice_axis: RAS axis the slices are taken along (2 = axial).
    normalization: "CT" (window), "MRI" (z-score over foreground), "generic"
      (percentile scaling), or None to derive it from each case's modality.
    ct_window: (low, high) HU window for CT.
    percentiles: (low, high) percentiles for "generic".
    background_slice_fraction: fraction of slices without any foreground
      label that are kept (chosen deterministically per case).
    label_map: optional {source label: target label} remapping, applied after
      the label check; unlisted labels keep their value.
    seed: seed of the background-slice choice.
  """

  image_size: tuple[int, int] = (128, 128)
  target_spacing: tuple[float, float, float] | None = None
  slice_axis: int = 2
  normalization: str | None = None
  ct_window: tuple[float, float] = (-160.0, 240.0)
  percentiles: tuple[float, float] = (0.5, 99.5)
  background_slice_fraction: float = 0.1
  label_map: Mapping[int, int] | None = None
  seed: int = 0

  def __post_init__(self):
    if len(self.image_size) != 2 or min(self.image_size) < 1:
      raise ValueError(f"image_size must be two positive ints, got "
                       f"{self.image_size}.")
    if self.target_spacing is not None and (
        len(self.target_spacing) != 3 or min(self.target_spacing) <= 0):
      raise ValueError(f"target_spacing must be three positive numbers, got "
                       f"{self.target_spacing}.")
    if self.slice_axis not in (0, 1, 2):
      raise ValueError(f"slice_axis must be 0, 1 or 2, got {self.slice_axis}.")
    if self.normalization not in (None,) + NORMALIZATIONS:
      raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got "
                       f"{self.normalization!r}.")
    if not self.ct_window[0] < self.ct_window[1]:
      raise ValueError(f"ct_window must be (low, high), got {self.ct_window}.")
    if not 0 <= self.background_slice_fraction <= 1:
      raise ValueError("background_slice_fraction must be in [0, 1], got "
                       f"{self.background_slice_fraction}.")


def normalization_for(modality: str | None) -> str:
  """Maps a modality name (MSD's or a CSV's) to a normalisation scheme."""
  if modality is None:
    return "generic"
  return _MODALITY_ALIASES.get(modality.strip().upper(), "generic")


def read_nifti(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray,
                                                 np.ndarray]:
  """Loads a NIfTI file reoriented to canonical RAS.

  Returns:
    (data float64 [X, Y, Z] or [X, Y, Z, C], affine [4, 4], zooms [3] in mm).

  Raises:
    DataError: naming `path`, if it is missing, not a NIfTI file, truncated,
      or not 3D/4D.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise DataError(f"{path}: file not found.")
  try:
    img = nib.as_closest_canonical(nib.load(path))
    data = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise DataError(f"{path}: not a readable NIfTI file ({type(e).__name__}: "
                    f"{e}).") from e
  if data.ndim not in (3, 4):
    raise DataError(f"{path}: expected a 3D (or 4D multi-channel) volume, got "
                    f"shape {data.shape}.")
  if data.size == 0:
    raise DataError(f"{path}: empty volume (shape {data.shape}).")
  return data, img.affine, np.asarray(img.header.get_zooms()[:3], np.float64)


def check_label(case: CaseRef, image_shape: Sequence[int],
                image_affine: np.ndarray, label: np.ndarray,
                label_affine: np.ndarray) -> None:
  """Raises DataError (naming the file) unless the label volume is on the
  image's grid (shape and affine) and holds integers."""
  if tuple(image_shape[:3]) != label.shape[:3] or label.ndim != 3:
    raise DataError(f"{case.label}: label shape {label.shape} does not match "
                    f"image {case.image} shape {tuple(image_shape[:3])}.")
  if not np.allclose(image_affine, label_affine, atol=1e-3, rtol=1e-4):
    raise DataError(f"{case.label}: affine differs from the image's "
                    f"({case.image}); they are not on the same grid.")
  if not np.isfinite(label).all() or np.any(label != np.round(label)):
    raise DataError(f"{case.label}: label values must be integers.")


def remap_labels(label: np.ndarray,
                 label_map: Mapping[int, int] | None) -> np.ndarray:
  """`label` with `label_map`'s {source: target} values replaced (each from
  the original values, so maps may swap labels)."""
  if not label_map:
    return label
  mapped = label.copy()
  for src, dst in label_map.items():
    mapped[label == src] = dst
  return mapped


def check_case(case: CaseRef, image: np.ndarray, image_affine: np.ndarray,
               label: np.ndarray, label_affine: np.ndarray,
               allowed_labels: Sequence[int] | None) -> None:
  """Raises DataError (naming the file) if image and label do not fit."""
  check_label(case, image.shape, image_affine, label, label_affine)
  if not np.isfinite(image).all():
    bad = int((~np.isfinite(image)).sum())
    raise DataError(f"{case.image}: {bad} voxels are NaN or infinite.")
  if not np.any(image):
    raise DataError(f"{case.image}: empty volume (all voxels are zero).")
  if allowed_labels is not None:
    values = set(np.unique(label).astype(int).tolist())
    unknown = sorted(values - set(int(v) for v in allowed_labels))
    if unknown:
      raise DataError(f"{case.label}: label values {unknown} are not declared "
                      f"(allowed: {sorted(allowed_labels)}).")


def _resample(volume: np.ndarray, zooms: np.ndarray,
              target: Sequence[float] | None, order: int) -> np.ndarray:
  if target is None:
    return volume
  factors = zooms / np.asarray(target, np.float64)
  if np.allclose(factors, 1.0):
    return volume
  if volume.ndim == 4:
    return np.stack([ndimage.zoom(volume[..., c], factors, order=order)
                     for c in range(volume.shape[-1])], axis=-1)
  return ndimage.zoom(volume, factors, order=order)


def normalize(volume: np.ndarray, scheme: str,
              config: PreprocessConfig) -> np.ndarray:
  """Normalises one channel [X, Y, Z] by modality scheme (float32 out)."""
  if scheme == "CT":
    lo, hi = config.ct_window
    out = (np.clip(volume, lo, hi) - lo) / (hi - lo)
  elif scheme == "MRI":
    foreground = volume > 0
    if foreground.sum() < 10:
      foreground = np.ones_like(volume, bool)
    values = volume[foreground]
    out = np.where(foreground, (volume - values.mean()) / (values.std() + 1e-8),
                   0.0)
  else:
    lo, hi = np.percentile(volume, config.percentiles)
    out = np.clip((volume - lo) / (hi - lo + 1e-8), 0.0, 1.0)
  return out.astype(np.float32)


def _crop_or_pad(volume: np.ndarray, size: tuple[int, int],
                 fill: float) -> np.ndarray:
  """Centre crop/pad axes 1 and 2 of [D, H, W, ...] to `size`."""
  for axis, target in ((1, size[0]), (2, size[1])):
    current = volume.shape[axis]
    if current > target:
      start = (current - target) // 2
      volume = np.take(volume, np.arange(start, start + target), axis=axis)
    elif current < target:
      before = (target - current) // 2
      pad = [(0, 0)] * volume.ndim
      pad[axis] = (before, target - current - before)
      volume = np.pad(volume, pad, constant_values=fill)
  return volume


def load_case(case: CaseRef, config: PreprocessConfig,
              allowed_labels: Sequence[int] | None = None,
              modality: str | None = None):
  """Reads, checks, resamples, normalises and crops one case.

  Returns:
    (image float32 [D, H, W, C], label uint8 [D, H, W]) with slices along
    axis 0 (the configured RAS `slice_axis`).
  """
  image, image_affine, zooms = read_nifti(case.image)
  label, label_affine, _ = read_nifti(case.label)
  check_case(case, image, image_affine, label, label_affine, allowed_labels)
  label = remap_labels(label, config.label_map)
  scheme = config.normalization or normalization_for(case.modality or modality)
  image, _ = preprocess_image(image, zooms, config, scheme)
  label = _resample(label, zooms, config.target_spacing, order=0)
  label = np.moveaxis(label, config.slice_axis, 0)
  label = _crop_or_pad(label, config.image_size, 0)
  return image, np.rint(label).astype(np.uint8)


def preprocess_image(image: np.ndarray, zooms: np.ndarray,
                     config: PreprocessConfig, scheme: str
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """A RAS volume [X, Y, Z] or [X, Y, Z, C] with voxel sizes `zooms` (mm)
  -> (slices float32 [D, H, W, C] along `config.slice_axis`: resampled,
  normalised by `scheme`, cropped or padded to `config.image_size`; the
  [D, H, W] shape before the crop/pad)."""
  image = _resample(image, zooms, config.target_spacing, order=1)
  if image.ndim == 3:
    image = image[..., None]
  image = np.stack([normalize(image[..., c], scheme, config)
                    for c in range(image.shape[-1])], axis=-1)
  image = np.moveaxis(image, config.slice_axis, 0)
  sliced_shape = tuple(image.shape[:3])
  image = _crop_or_pad(image, config.image_size, 0.0)
  return image.astype(np.float32), sliced_shape


def select_slices(label: np.ndarray, config: PreprocessConfig,
                  case_key: str) -> np.ndarray:
  """Indices of the slices kept: all with foreground, a fraction of the rest.

  The background choice is deterministic in (config.seed, case_key).
  """
  has_foreground = label.reshape(label.shape[0], -1).max(axis=1) > 0
  digest = hashlib.sha256(f"{config.seed}:{case_key}".encode()).digest()
  rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
  keep_background = rng.uniform(size=label.shape[0]) < (
      config.background_slice_fraction)
  return np.flatnonzero(has_foreground | keep_background)


def read_msd(root: str | os.PathLike) -> tuple[list[CaseRef], dict]:
  """Cases of an MSD task folder, and its parsed `dataset.json`.

  Raises:
    DataError: naming the file, if dataset.json is missing or malformed, or a
      listed image/label file does not exist.
  """
  root = pathlib.Path(root)
  meta_path = root / "dataset.json"
  try:
    meta = json.loads(meta_path.read_text())
  except FileNotFoundError as e:
    raise DataError(f"{meta_path}: not found (is {root} an MSD task "
                    "folder?).") from e
  except json.JSONDecodeError as e:
    raise DataError(f"{meta_path}: not valid JSON ({e}).") from e
  if not isinstance(meta.get("training"), list) or "labels" not in meta:
    raise DataError(f"{meta_path}: needs 'training' (a list) and 'labels'.")
  modalities = meta.get("modality", {})
  modality = modalities.get("0") if isinstance(modalities, dict) else None
  cases = []
  for entry in meta["training"]:
    try:
      image, label = root / entry["image"], root / entry["label"]
    except (KeyError, TypeError) as e:
      raise DataError(f"{meta_path}: training entry {entry!r} needs 'image' "
                      "and 'label'.") from e
    for path in (image, label):
      if not path.is_file():
        raise DataError(f"{path}: listed in {meta_path} but not found.")
    patient = image.name.split(".nii")[0]
    cases.append(CaseRef(str(image), str(label), patient, modality=modality))
  return cases, meta


def msd_labels(meta: Mapping) -> list[int]:
  """The declared label values of an MSD dataset.json."""
  labels = meta["labels"]
  if isinstance(labels, dict):
    keys = labels.keys()
    try:  # MSD: {"0": "background", ...}; newer nnU-Net: {"background": 0}.
      return sorted(int(k) for k in keys)
    except ValueError:
      return sorted(int(v) for v in labels.values())
  return list(range(len(labels)))


def read_csv(path: str | os.PathLike) -> list[CaseRef]:
  """Cases of a CSV with columns image,label,site,patient[,split][,modality].

  Raises:
    DataError: naming the CSV, for a missing column, an empty file, an unknown
      split, or a file that does not exist.
  """
  path = pathlib.Path(path)
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
      columns = set(rows[0].keys()) if rows else set()
  except FileNotFoundError as e:
    raise DataError(f"{path}: not found.") from e
  if not rows:
    raise DataError(f"{path}: no cases (empty CSV).")
  missing = {"image", "label", "site", "patient"} - columns
  if missing:
    raise DataError(f"{path}: missing column(s) {sorted(missing)}; need "
                    "image,label,site,patient[,split][,modality].")
  cases = []
  for line, row in enumerate(rows, start=2):
    split = (row.get("split") or "").strip() or None
    if split not in (None, "train", "val", "test"):
      raise DataError(f"{path}:{line}: split must be train, val or test, got "
                      f"{split!r}.")
    image = (path.parent / row["image"].strip())
    label = (path.parent / row["label"].strip())
    for file in (image, label):
      if not file.is_file():
        raise DataError(f"{path}:{line}: {file} not found.")
    if not row["patient"].strip() or not row["site"].strip():
      raise DataError(f"{path}:{line}: empty site or patient.")
    cases.append(CaseRef(str(image), str(label), row["patient"].strip(),
                         site=row["site"].strip(), split=split,
                         modality=(row.get("modality") or "").strip() or None))
  return cases

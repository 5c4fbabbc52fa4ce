"""Scans in and out of prediction: one volume's geometry, and the cases.

`load_image` reads a NIfTI scan (checked: 3D, or 4D with the model's
channels, finite), `preprocess` applies the prepared dataset's
preprocessing (reorientation, resampling, normalisation, slicing, crop/pad)
and `restore_geometry` maps class probabilities back onto the scan's own
voxel grid. `find_cases` reads a file, a folder, an MSD folder or a CSV of
image[,label][,modality]; `score` gives Dice, IoU and HD95 in mm on the
scan's grid. Errors name the file (`RunDirError`, alias `PredictError`).
"""

import dataclasses
import os
import pathlib
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from fedjax_seg import metrics
from fedjax_seg.data import nifti
from fedjax_seg.run import artifacts

PredictError = artifacts.RunDirError
NIFTI_SUFFIXES = (".nii.gz", ".nii")


# -- one volume ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Geometry:
  """What the forward preprocessing did to a volume, to undo it.

  Attributes:
    shape: the file's spatial shape [3].
    orientation: the file's axis orientation (nibabel ornt) relative to RAS.
    canonical_shape: spatial shape after reorientation to RAS.
    sliced_shape: [D, H, W] slices before crop/pad.
  """

  shape: tuple[int, ...]
  orientation: np.ndarray
  canonical_shape: tuple[int, ...]
  sliced_shape: tuple[int, ...]


def load_image(path: str | os.PathLike, in_channels: int
               ) -> tuple[nib.Nifti1Image, np.ndarray]:
  """The NIfTI image and its data [X, Y, Z, C] float64 (file orientation).

  Raises:
    PredictError: naming the file, if it is unreadable, not 3D/4D, a 4D
      image where the model wants one channel, a channel count other than
      the model's, or holds NaN/inf.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise PredictError(f"{path}: file not found.")
  try:
    img = nib.load(path)
    data = np.asarray(img.get_fdata(dtype=np.float64))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise PredictError(f"{path}: not a readable NIfTI file "
                       f"({type(e).__name__}: {e}).") from e
  if data.ndim == 4 and in_channels == 1 and data.shape[-1] != 1:
    raise PredictError(f"{path}: a 4D image (shape {data.shape}) where the "
                       "model wants a 3D volume (one channel).")
  if data.ndim not in (3, 4) or data.size == 0:
    raise PredictError(f"{path}: expected a 3D volume (or 4D with channels "
                       f"last), got shape {data.shape}.")
  data = data if data.ndim == 4 else data[..., None]
  if data.shape[-1] != in_channels:
    raise PredictError(f"{path}: {data.shape[-1]} channel(s), the model "
                       f"takes {in_channels}.")
  if not np.isfinite(data).all():
    raise PredictError(f"{path}: {int((~np.isfinite(data)).sum())} voxels "
                       "are NaN or infinite.")
  return img, data


def preprocess(img: nib.Nifti1Image, data: np.ndarray,
               prep: nifti.PreprocessConfig, modality: str
               ) -> tuple[np.ndarray, Geometry]:
  """`data_prep.prepare`'s preprocessing of one image, all slices kept.

  Args:
    img: the NIfTI image (for its affine and zooms).
    data: its data [X, Y, Z, C] in the file's orientation.
    prep: the run's preprocessing settings.
    modality: the case's modality (its normalisation scheme).

  Returns:
    (slices float32 [D, H, W, C] along `prep.slice_axis`, Geometry).
  """
  orientation = nib.orientations.io_orientation(img.affine)
  # As `nifti.read_nifti` reads a file: nibabel's closest canonical image,
  # whose voxel sizes come from the header for a file already in RAS and
  # from the reoriented affine otherwise (they differ when a tool wrote a
  # pixdim that disagrees with the sform).
  canonical_img = nib.as_closest_canonical(
      img.__class__(data, img.affine, img.header))
  canonical = np.asarray(canonical_img.dataobj, np.float64)
  canonical_zooms = np.asarray(canonical_img.header.get_zooms()[:3],
                               np.float64)
  if prep.target_spacing is not None:
    factors = canonical_zooms / np.asarray(prep.target_spacing, np.float64)
    if np.any(np.round(np.asarray(canonical.shape[:3]) * factors) < 1):
      raise PredictError(
          f"voxels of {tuple(canonical_zooms)} mm over a grid of "
          f"{canonical.shape[:3]} leave an axis with no voxel at the run's "
          f"target spacing {prep.target_spacing} mm.")
  image, sliced_shape = nifti.preprocess_image(
      canonical, canonical_zooms, prep,
      prep.normalization or nifti.normalization_for(modality))
  geometry = Geometry(
      shape=tuple(data.shape[:3]), orientation=orientation,
      canonical_shape=tuple(canonical.shape[:3]),
      sliced_shape=sliced_shape)
  return image, geometry


def _uncrop_or_pad(probs: np.ndarray, sliced_shape: Sequence[int]
                   ) -> np.ndarray:
  """Inverse of `nifti._crop_or_pad` on axes 1, 2 of [D, H, W, K]
  probabilities: padding cut off, cropped-away borders back as background
  (probability 1 of class 0; the model never saw them)."""
  for axis in (1, 2):
    current, original = probs.shape[axis], sliced_shape[axis]
    if original < current:  # Was padded: take the centre back.
      start = (current - original) // 2
      probs = np.take(probs, np.arange(start, start + original), axis=axis)
    elif original > current:  # Was cropped: restore the borders.
      before = (original - current) // 2
      pad_shape = list(probs.shape)
      pad_shape[axis] = before
      head = np.zeros(pad_shape, probs.dtype)
      head[..., 0] = 1.0
      pad_shape[axis] = original - current - before
      tail = np.zeros(pad_shape, probs.dtype)
      tail[..., 0] = 1.0
      probs = np.concatenate([head, probs, tail], axis=axis)
  return probs


def restore_geometry(probs: np.ndarray, geometry: Geometry,
                     prep: nifti.PreprocessConfig) -> np.ndarray:
  """Class probabilities [D, H, W, K] of the preprocessed slices ->
  [X, Y, Z, K] on the input file's voxel grid (crop/pad, slicing,
  resampling and reorientation undone; linear interpolation of the
  probabilities when resampling back)."""
  probs = _uncrop_or_pad(probs, geometry.sliced_shape)
  probs = np.moveaxis(probs, 0, prep.slice_axis)
  if tuple(probs.shape[:3]) != geometry.canonical_shape:
    # ndimage.zoom maps corner voxel centres onto each other (grid_mode
    # False), as the forward resampling did, so this is its inverse map.
    factors = [c / r for c, r in zip(geometry.canonical_shape,
                                     probs.shape[:3])]
    # mode="nearest": with the default constant mode the last output
    # voxel, a rounding error past the input's edge, would read zeros.
    probs = np.stack([ndimage.zoom(probs[..., k], factors, order=1,
                                   mode="nearest")
                      for k in range(probs.shape[-1])], axis=-1)
    if tuple(probs.shape[:3]) != geometry.canonical_shape:
      raise AssertionError(f"resampled back to {probs.shape[:3]}, expected "
                           f"{geometry.canonical_shape}.")
  back = nib.orientations.ornt_transform(
      nib.orientations.axcodes2ornt(("R", "A", "S")), geometry.orientation)
  return nib.orientations.apply_orientation(probs, back)


# -- cases ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
  """One scan to segment: its id (output file stem), image, optional label
  and modality."""

  case_id: str
  image: str
  label: str | None = None
  modality: str | None = None


def _stem(path: pathlib.Path) -> str:
  name = path.name
  for suffix in NIFTI_SUFFIXES:
    if name.endswith(suffix):
      return name[:-len(suffix)]
  return path.stem


def _is_nifti(path: pathlib.Path) -> bool:
  return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def find_cases(input_path: str | os.PathLike) -> list[Case]:
  """The cases of --input: one NIfTI file, a folder of them, an MSD task
  folder (imagesTr with labelsTr, and imagesTs), or a CSV with an image
  column (optional label, modality and case columns; paths relative to the
  CSV).

  Raises:
    PredictError: naming the path, for a missing input, a CSV without an
      image column, a listed file that does not exist, an empty input, or
      two cases with the same id.
  """
  path = pathlib.Path(input_path)
  if not path.exists():
    raise PredictError(f"--input={path}: not found.")
  if path.is_file() and path.suffix.lower() == ".csv":
    cases = _csv_cases(path)
  elif path.is_file():
    if not _is_nifti(path):
      raise PredictError(f"--input={path}: not a .nii/.nii.gz file, a "
                         "folder or a .csv.")
    cases = [Case(_stem(path), str(path))]
  elif (path / "dataset.json").is_file() or (path / "imagesTr").is_dir():
    cases = []
    for images, labels in (("imagesTr", "labelsTr"), ("imagesTs", None)):
      for image in sorted(p for p in (path / images).glob("*")
                          if _is_nifti(p)):
        if image.name.startswith("._"):
          continue  # macOS resource forks ship inside MSD archives.
        label = path / labels / image.name if labels else None
        cases.append(Case(_stem(image), str(image),
                          str(label) if label and label.is_file() else None))
  else:
    cases = [Case(_stem(p), str(p)) for p in sorted(path.iterdir())
             if _is_nifti(p)]
  if not cases:
    raise PredictError(f"--input={path}: no NIfTI scan there.")
  seen = {}
  for case in cases:
    if case.case_id in seen:
      raise PredictError(f"--input={path}: two scans would be written as "
                         f"{case.case_id!r} ({seen[case.case_id]} and "
                         f"{case.image}); give them distinct names (or a "
                         "CSV case column).")
    seen[case.case_id] = case.image
  return cases


def _csv_cases(path: pathlib.Path) -> list[Case]:
  import csv  # pylint: disable=g-import-not-at-top
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  if not rows:
    raise PredictError(f"--input={path}: no cases (empty CSV).")
  if "image" not in rows[0]:
    raise PredictError(f"--input={path}: needs an image column (optional: "
                       "label, modality, case).")
  cases = []
  for line, row in enumerate(rows, start=2):
    image = path.parent / (row["image"] or "").strip()
    if not _is_nifti(image):
      raise PredictError(f"{path}:{line}: {image} is not a NIfTI file.")
    label = (row.get("label") or "").strip()
    label = str(path.parent / label) if label else None
    if label is not None and not os.path.isfile(label):
      raise PredictError(f"{path}:{line}: {label} not found.")
    case_id = (row.get("case") or "").strip() or _stem(image)
    cases.append(Case(case_id, str(image), label,
                      (row.get("modality") or "").strip() or None))
  return cases


def read_label(case: Case, img: nib.Nifti1Image,
                prep: nifti.PreprocessConfig, num_classes: int) -> np.ndarray:
  """The case's label volume on the image's grid, remapped like the
  training labels (`label_map`); PredictError naming the file if it does
  not fit."""
  try:
    label_img = nib.load(case.label)
    label = np.asarray(label_img.get_fdata(dtype=np.float64))
  except Exception as e:  # nibabel raises many types for corrupt files.
    raise PredictError(f"{case.label}: not a readable NIfTI file "
                       f"({type(e).__name__}: {e}).") from e
  try:
    nifti.check_label(nifti.CaseRef(case.image, case.label, case.case_id),
                      img.shape, img.affine, label, label_img.affine)
  except nifti.DataError as e:
    raise PredictError(str(e)) from e
  label = nifti.remap_labels(label.astype(np.int64), prep.label_map)
  if label.min() < 0 or label.max() >= num_classes:
    raise PredictError(f"{case.label}: label values {sorted(np.unique(label))}"
                       f" outside the model's classes 0..{num_classes - 1}.")
  return label


def score(pred: np.ndarray, label: np.ndarray, zooms: Sequence[float],
          class_names: Sequence[str]) -> dict:
  """Dice, IoU and HD95 (mm) per class of one case on its voxel grid.

  A class absent from both prediction and label scores Dice/IoU 1.0 and
  HD95 0 (as in training's metrics); HD95 with exactly one of them empty is
  the volume's diagonal in mm.
  """
  out = {"dice": {}, "iou": {}, "hd95_mm": {}}
  for k, name in enumerate(class_names):
    p, t = pred == k, label == k
    inter, ps, ts = int(np.sum(p & t)), int(p.sum()), int(t.sum())
    out["dice"][name] = 1.0 if ps + ts == 0 else 2 * inter / (ps + ts)
    union = ps + ts - inter
    out["iou"][name] = 1.0 if union == 0 else inter / union
    if k:  # HD95 of the foreground classes.
      out["hd95_mm"][name] = metrics.hd95(p, t, zooms)
  fg = list(class_names[1:])
  out["dice_mean_foreground"] = float(np.mean([out["dice"][c] for c in fg]))
  return out


def output_image(data: np.ndarray, img: nib.Nifti1Image, dtype
                  ) -> nib.Nifti1Image:
  """`data` with the input's affine and header (its dtype and scaling
  replaced: a label map is stored as plain uint8)."""
  header = img.header.copy()
  header.set_data_dtype(dtype)
  out = nib.Nifti1Image(np.asarray(data, dtype), img.affine, header)
  out.header.set_slope_inter(1.0, 0.0)
  out.header["cal_min"], out.header["cal_max"] = 0, 0
  return out

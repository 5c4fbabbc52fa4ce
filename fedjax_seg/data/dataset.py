"""`SliceDataset`: 2D segmentation slices with site, patient and modality."""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SliceDataset:
  """A flat set of 2D slices, each tagged with its site and patient.

  All per-slice arrays share the leading axis N.

  Attributes:
    image: [N, H, W, C] (or [N, D, H, W, C] volumes) float32, normalised.
    label: [N, H, W] (or [N, D, H, W]) uint8, indices into `class_names`.
    site: [N] int32, index into `site_names`.
    patient: [N] int32, index into `patient_names` (unique across sites).
    modality: [N] int32, index into `modality_names`.
    slice_index: [N] int32, position of the slice in its patient's volume.
    site_names: the sites.
    site_modalities: modality name of each site.
    modality_names: modality vocabulary.
    class_names: label vocabulary (index 0 is background).
    patient_names: patient identifiers.
  """

  image: np.ndarray
  label: np.ndarray
  site: np.ndarray
  patient: np.ndarray
  modality: np.ndarray
  slice_index: np.ndarray
  site_names: tuple[str, ...]
  site_modalities: tuple[str, ...]
  modality_names: tuple[str, ...]
  class_names: tuple[str, ...]
  patient_names: tuple[str, ...]

  def __post_init__(self):
    n = self.image.shape[0]
    if self.image.ndim not in (4, 5):
      raise ValueError(f"image must be [N, H, W, C] (slices) or "
                       f"[N, D, H, W, C] (volumes), got {self.image.shape}.")
    if self.label.shape != self.image.shape[:-1]:
      raise ValueError(f"label shape {self.label.shape} does not match image "
                       f"shape {self.image.shape[:-1]}.")
    for name in ("site", "patient", "modality", "slice_index"):
      if getattr(self, name).shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got "
                         f"{getattr(self, name).shape}.")
    if len(self.site_modalities) != len(self.site_names):
      raise ValueError("site_modalities must name one modality per site.")
    if n and not np.isfinite(self.image).all():
      raise ValueError("image has NaN or infinite values.")
    if n and int(self.label.max()) >= len(self.class_names):
      raise ValueError(f"label value {int(self.label.max())} is not in "
                       f"class_names {self.class_names}.")

  @property
  def num_examples(self) -> int:
    return int(self.image.shape[0])

  @property
  def num_sites(self) -> int:
    return len(self.site_names)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def select(self, mask_or_indices) -> "SliceDataset":
    """The slices at a boolean mask or index array (vocabularies kept)."""
    take = lambda a: a[mask_or_indices]
    return dataclasses.replace(
        self, image=take(self.image), label=take(self.label),
        site=take(self.site), patient=take(self.patient),
        modality=take(self.modality), slice_index=take(self.slice_index))

  def site_stats(self) -> dict[str, dict]:
    """Per site: slices, patients, modality, foreground fraction per class."""
    stats = {}
    for s, name in enumerate(self.site_names):
      sel = self.site == s
      labels = self.label[sel]
      counts = np.bincount(labels.ravel(), minlength=self.num_classes)
      total = max(int(counts.sum()), 1)
      stats[name] = {
          "modality": self.site_modalities[s],
          "slices": int(sel.sum()),
          "patients": int(np.unique(self.patient[sel]).size),
          "foreground_fraction": float(1 - counts[0] / total),
          "class_fraction": {c: float(counts[i] / total)
                             for i, c in enumerate(self.class_names)},
      }
    return stats

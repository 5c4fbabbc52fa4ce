"""Per-site stacked, padded arrays for the simulator, and patient-level splits.

The simulator keeps every site's data as one array with a leading site axis,
`[S, M, ...]` with M the largest site's number of slices, and a validity mask:
ragged sites are padded, and padding is never sampled. For patient-level DP,
each site's slices are also indexed by patient, `[S, P, L]` (P patients of up
to L slices) with a mask.

Splits are BY PATIENT: a patient's slices are all in train, all in val or all
in test, deterministic in the seed, per site (so every site keeps its own
train/val/test).

For datasets too large for memory, `StreamingSites` keeps only indices and
gathers the sampled examples of each round from the array_record source.
"""

import dataclasses
import os
from typing import Sequence

import numpy as np

from fedjax_seg.data import dataset as dataset_lib
from fedjax_seg.data import tfds_io

SPLITS = ("train", "val", "test")


def assign_patient_splits(site: np.ndarray, patient: np.ndarray,
                          fractions: Sequence[float] = (0.7, 0.15, 0.15),
                          seed: int = 0) -> np.ndarray:
  """[N] split id (0 train, 1 val, 2 test) per slice, by patient, per site.

  Each site's patients are shuffled with a generator seeded by (seed, site)
  and cut by `fractions`; every site keeps at least one training patient.
  """
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(
      fractions.sum(), 1.0):
    raise ValueError(f"split fractions must be 3 non-negative numbers summing "
                     f"to 1, got {tuple(fractions)}.")
  split = np.zeros(site.shape, np.int8)
  for s in np.unique(site):
    patients = np.unique(patient[site == s])
    order = np.random.default_rng([seed, int(s)]).permutation(patients)
    n = len(order)
    n_val = int(np.floor(fractions[1] * n + 0.5))
    n_test = int(np.floor(fractions[2] * n + 0.5))
    while n_val + n_test > n - 1 and (n_val or n_test):
      if n_val >= n_test:
        n_val -= 1
      else:
        n_test -= 1
    val = set(order[n - n_val - n_test:n - n_test].tolist())
    test = set(order[n - n_test:].tolist())
    in_site = site == s
    split[in_site & np.isin(patient, list(val))] = 1
    split[in_site & np.isin(patient, list(test))] = 2
  return split


def split_by_patient(data: dataset_lib.SliceDataset,
                     fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> dict[str, dataset_lib.SliceDataset]:
  """{"train", "val", "test"}: SliceDatasets with disjoint patients."""
  split = assign_patient_splits(data.site, data.patient, fractions, seed)
  return {name: data.select(split == i) for i, name in enumerate(SPLITS)}


@dataclasses.dataclass(frozen=True)
class SiteArrays:
  """All sites' slices of one split, stacked and padded.

  Attributes:
    image: [S, M, H, W, C] (or [S, M, D, H, W, C]) float32, 0 where padded.
    label: [S, M, H, W] (or [S, M, D, H, W]) uint8.
    mask: [S, M] bool, True for real slices.
    patient: [S, M] int32 patient index (-1 where padded).
    slice_index: [S, M] int32.
    num_examples: [S] int32, N_k (real slices per site).
    groups: [S, P, L] int32, for each site's p-th patient the positions (in
      the M axis) of its slices; 0 where `group_mask` is False.
    group_mask: [S, P, L] bool.
    num_patients: [S] int32.
    site_names, site_modalities, modality_names, class_names: vocabularies.
  """

  image: np.ndarray
  label: np.ndarray
  mask: np.ndarray
  patient: np.ndarray
  slice_index: np.ndarray
  num_examples: np.ndarray
  groups: np.ndarray
  group_mask: np.ndarray
  num_patients: np.ndarray
  site_names: tuple[str, ...]
  site_modalities: tuple[str, ...]
  modality_names: tuple[str, ...]
  class_names: tuple[str, ...]

  @property
  def num_sites(self) -> int:
    return len(self.site_names)

  @property
  def site_modality_index(self) -> np.ndarray:
    """[S] int32 index into `modality_names` of each site."""
    return np.array([self.modality_names.index(m)
                     for m in self.site_modalities], np.int32)


def stack_sites(data: dataset_lib.SliceDataset, *,
                pad_examples_to: int | None = None,
                pad_slices_to: int | None = None,
                pad_patients_to: int | None = None) -> SiteArrays:
  """Stacks `data` by site into padded arrays (site order of `site_names`).

  Args:
    data: slices of one split.
    pad_examples_to: M, at least the largest site's slice count (default:
      exactly that). Fix it to keep shapes equal across splits or runs.
    pad_slices_to: L, at least the largest patient's slice count.
    pad_patients_to: P, at least the largest site's patient count.
  """
  num_sites = data.num_sites
  counts = np.bincount(data.site, minlength=num_sites)
  m = int(max(counts.max(initial=0), 1))
  if pad_examples_to is not None:
    if pad_examples_to < m:
      raise ValueError(f"pad_examples_to={pad_examples_to} is below the "
                       f"largest site's {m} slices.")
    m = pad_examples_to
  image = np.zeros((num_sites, m) + data.image.shape[1:], np.float32)
  label = np.zeros((num_sites, m) + data.label.shape[1:], np.uint8)
  mask = np.zeros((num_sites, m), bool)
  patient = np.full((num_sites, m), -1, np.int32)
  slice_index = np.zeros((num_sites, m), np.int32)
  per_site_groups = []
  for s in range(num_sites):
    # Sort a site's slices by (patient, slice) so groups are contiguous.
    idx = np.flatnonzero(data.site == s)
    idx = idx[np.lexsort((data.slice_index[idx], data.patient[idx]))]
    n = len(idx)
    image[s, :n] = data.image[idx]
    label[s, :n] = data.label[idx]
    mask[s, :n] = True
    patient[s, :n] = data.patient[idx]
    slice_index[s, :n] = data.slice_index[idx]
    per_site_groups.append([np.flatnonzero(patient[s, :n] == p)
                            for p in np.unique(patient[s, :n])])
  p_max = max(1, max(len(g) for g in per_site_groups))
  if pad_patients_to is not None:
    if pad_patients_to < p_max:
      raise ValueError(f"pad_patients_to={pad_patients_to} is below the "
                       f"largest site's {p_max} patients.")
    p_max = pad_patients_to
  l_max = max([1] + [len(x) for g in per_site_groups for x in g])
  if pad_slices_to is not None:
    if pad_slices_to < l_max:
      raise ValueError(f"pad_slices_to={pad_slices_to} is below the largest "
                       f"patient's {l_max} slices.")
    l_max = pad_slices_to
  groups = np.zeros((num_sites, p_max, l_max), np.int32)
  group_mask = np.zeros((num_sites, p_max, l_max), bool)
  for s, site_groups in enumerate(per_site_groups):
    for p, positions in enumerate(site_groups):
      groups[s, p, :len(positions)] = positions
      group_mask[s, p, :len(positions)] = True
  return SiteArrays(
      image=image, label=label, mask=mask, patient=patient,
      slice_index=slice_index, num_examples=counts.astype(np.int32),
      groups=groups, group_mask=group_mask,
      num_patients=np.array([len(g) for g in per_site_groups], np.int32),
      site_names=data.site_names, site_modalities=data.site_modalities,
      modality_names=data.modality_names, class_names=data.class_names)


def load_splits(name: str, data_dir: str | os.PathLike,
                fractions: Sequence[float] = (0.7, 0.15, 0.15),
                seed: int = 0) -> dict[str, dataset_lib.SliceDataset]:
  """A prepared dataset's train/val/test, in memory.

  Uses the dataset's own splits if it has any besides "train" (a CSV with a
  split column; missing ones are empty), else splits "train" by patient.
  """
  parts = tfds_io.load(name, data_dir)
  if set(parts) == {"train"}:
    return split_by_patient(parts["train"], fractions, seed)
  any_part = next(iter(parts.values()))
  empty = any_part.select(np.zeros(any_part.num_examples, bool))
  return {split: parts.get(split, empty) for split in SPLITS}


def federated_splits(data: dataset_lib.SliceDataset,
                     fractions: Sequence[float] = (0.7, 0.15, 0.15),
                     seed: int = 0) -> dict[str, SiteArrays]:
  """{"train", "val", "test"}: SiteArrays with disjoint patients per site."""
  return {name: stack_sites(part) for name, part in
          split_by_patient(data, fractions, seed).items()}


class StreamingSites:
  """Random access to one split of a prepared dataset, per site, by index.

  Holds only per-site lists of record ids (built from one pass over the
  records' metadata at start-up); `gather` reads just the requested records,
  so a round touches only the examples it sampled.

  Args:
    name, data_dir: a dataset made by `data_prep.prepare`.
    split: "train", "val" or "test" of the patient-level split, made from
      the dataset's own "train" records with `fractions` and `seed` (as
      `split_by_patient` would), or the dataset's own split of that name if it
      has one (a CSV with a split column).
  """

  def __init__(self, name: str, data_dir: str | os.PathLike,
               split: str = "train",
               fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
               chunk: int = 256):
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    stats = tfds_io.read_stats(name, data_dir)
    sources = tfds_io.data_source(name, data_dir)
    self.site_names = tuple(stats["site_names"])
    self.class_names = tuple(stats["class_names"])
    own_split = bool(set(sources) - {"train"})  # e.g. a CSV split column.
    if own_split and split not in sources:
      raise KeyError(f"dataset {name!r} has splits {sorted(sources)}, not "
                     f"{split!r}.")
    self._source = sources[split if own_split else "train"]
    sites, patients = [], []
    for start in range(0, len(self._source), chunk):
      ids = list(range(start, min(start + chunk, len(self._source))))
      for record in self._source.__getitems__(ids):
        sites.append(self.site_names.index(tfds_io.text(record["site"])))
        patients.append(tfds_io.text(record["patient"]))
    sites = np.asarray(sites, np.int32)
    patient_ids = np.unique(patients, return_inverse=True)[1].astype(np.int32)
    keep = np.ones(len(sites), bool)
    if not own_split:
      keep = assign_patient_splits(sites, patient_ids, fractions,
                                   seed) == SPLITS.index(split)
    self.record_ids = [np.flatnonzero(keep & (sites == s))
                       for s in range(len(self.site_names))]
    self.num_examples = np.array([len(r) for r in self.record_ids], np.int32)

  def gather(self, indices: np.ndarray, mask: np.ndarray):
    """Reads the examples at per-site positions.

    Args:
      indices: [S, B] int, positions into each site's examples (0..N_k-1).
      mask: [S, B] bool; False entries are not read (zeros returned).

    Returns:
      (image [S, B, H, W, C] float32, label [S, B, H, W] uint8).
    """
    indices, mask = np.asarray(indices), np.asarray(mask, bool)
    wanted = [(s, b, int(self.record_ids[s][indices[s, b]]))
              for s, b in zip(*np.nonzero(mask))]
    records = self._source.__getitems__([r for _, _, r in wanted])
    example = records[0] if records else self._source[0]
    image = np.zeros(indices.shape + example["image"].shape, np.float32)
    label = np.zeros(indices.shape + example["label"].shape, np.uint8)
    for (s, b, _), record in zip(wanted, records):
      image[s, b] = record["image"]
      label[s, b] = record["label"]
    return image, label

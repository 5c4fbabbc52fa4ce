"""Assigning patients to simulated sites when the data do not say.

* `hash_sites`: a stable hash of the patient id modulo the number of sites
  (IID in expectation, reproducible across machines and runs).
* `dirichlet_sites`: the usual non-IID split over label proportions: for each
  patient class c, site shares p_c ~ Dirichlet(alpha * 1); small alpha gives
  each site a skewed mix of classes.
"""

import hashlib
from typing import Sequence

import numpy as np


def hash_sites(patients: Sequence[str], num_sites: int) -> np.ndarray:
  """[P] int site index of each patient from sha256(patient id)."""
  if num_sites < 1:
    raise ValueError(f"num_sites must be >= 1, got {num_sites}.")
  return np.array([int.from_bytes(hashlib.sha256(p.encode()).digest()[:8],
                                  "little") % num_sites for p in patients],
                  np.int32)


def patient_class(label_values_present: Sequence[int]) -> int:
  """A patient's class for non-IID splits: its largest label present."""
  return int(max(label_values_present)) if len(label_values_present) else 0


def dirichlet_sites(classes: Sequence[int], num_sites: int, alpha: float,
                    seed: int, max_tries: int = 100) -> np.ndarray:
  """[P] int site index per patient, Dirichlet(alpha) over each class.

  Every site gets at least one patient (the draw is repeated up to
  `max_tries` times).

  Raises:
    ValueError: if no draw gives every site a patient (too few patients).
  """
  classes = np.asarray(classes)
  if num_sites < 1 or not alpha > 0:
    raise ValueError(f"need num_sites >= 1 and alpha > 0, got {num_sites}, "
                     f"{alpha}.")
  if len(classes) < num_sites:
    raise ValueError(f"{len(classes)} patients cannot fill {num_sites} sites.")
  rng = np.random.default_rng(seed)
  for _ in range(max_tries):
    sites = np.empty(len(classes), np.int32)
    for c in np.unique(classes):
      members = rng.permutation(np.flatnonzero(classes == c))
      shares = rng.dirichlet(np.full(num_sites, alpha))
      bounds = np.round(np.cumsum(shares) * len(members)).astype(int)
      sites[members] = np.searchsorted(bounds, np.arange(len(members)),
                                       side="right")
    if np.unique(sites).size == num_sites:
      return sites
  raise ValueError(f"no Dirichlet(alpha={alpha}) split gave all {num_sites} "
                   f"sites a patient in {max_tries} tries; raise alpha or "
                   "lower the number of sites.")

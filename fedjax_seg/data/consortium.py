"""Many synthetic sites: scanner profiles, heavy-tailed sizes, made on demand.

`Consortium(num_sites=N)` is a consortium of N hospital sites of the
built-in synthetic data (10 to 10,000 and more). Site k (0-based) is a pure
function of (seed, k):

* its scanner: one of the 8 acquisition profiles of
  `synthetic.DEFAULT_SITES` (CT scanners A/B and low dose, MRI T1 1.5T, T2
  3T and low field, digital and film X-ray), drawn uniformly;
* its size: a discrete Pareto number of patients,
  P_k = min(P_MAX, floor(X_MIN * U^(-1 / ALPHA))), U ~ Uniform(0, 1], with
  X_MIN = 8, ALPHA = 1.3 and P_MAX = 500 (then times `patients_scale`,
  at least 4, so that at the default split every site has a training, a
  validation and a test patient): median 13 patients, mean about 26, 10%
  of sites above 47, 1% above 280 and 0.5% at the cap. Most sites are
  small and a few are large, as in real consortia; a site with fewer
  training units than the batch samples all of them (q = 1);
* its patients: patient p is rendered from the seed (seed, CONSORTIUM_TAG,
  k, p) by `synthetic.render_patient`, and split into train/val/test by
  `sites.assign_patient_splits` with the site id k.

So site k is the same whatever N is, and the first N sites of a larger
consortium are this one. Nothing is rendered until asked: `counts(split)`
gives every site's patient and slice counts from the split alone (what the
privacy plan needs, public by the report's stated assumption), and
`site_arrays(site_ids, split)` renders just those sites and stacks them. A
training cohort is stacked at a fixed capacity (the largest possible site's
training split, from P_MAX, not from the N drawn sites), so every cohort has
the same shapes, the round compiles once, and host and device memory do not
grow with N. Rendered sites are kept in a small LRU cache (`cache_sites`).
"""

import collections
import dataclasses
import functools
import math

import numpy as np

from fedjax_seg.data import dataset as dataset_lib
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.data import synthetic

PROFILES = synthetic.DEFAULT_SITES
X_MIN, ALPHA, P_MAX = 8, 1.3, 500
MIN_PATIENTS = 4
# Separates the consortium's seeds from the 8-site dataset's (seed, site,
# patient) seeds.
CONSORTIUM_TAG = 1_500_015


@dataclasses.dataclass(frozen=True)
class Consortium:
  """N synthetic sites, each a pure function of (seed, site id).

  Attributes:
    num_sites: N >= 1.
    image_size, num_slices, patients_scale, seed: as `SyntheticConfig`.
    split_fractions: train/val/test fractions of each site's patients.
    split_seed: seed of the train/val/test split (default: `seed`).
    cache_sites: rendered sites kept in memory (least recently used out).
  """

  num_sites: int
  image_size: int = 32
  num_slices: int = 8
  patients_scale: float = 1.0
  seed: int = 0
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  split_seed: int | None = None
  cache_sites: int = 64

  def __post_init__(self):
    if self.num_sites < 1:
      raise ValueError(f"num_sites must be >= 1, got {self.num_sites}.")
    # Checks image_size, num_slices and patients_scale.
    synthetic.SyntheticConfig(image_size=self.image_size,
                              num_slices=self.num_slices,
                              patients_scale=self.patients_scale)
    object.__setattr__(self, "_cache", collections.OrderedDict())

  # -- the sites, without rendering -------------------------------------------

  def _draw(self, k: int) -> tuple[int, int]:
    rng = np.random.default_rng([self.seed, CONSORTIUM_TAG, k])
    profile = int(rng.integers(len(PROFILES)))
    u = 1.0 - rng.uniform()  # (0, 1]
    patients = min(P_MAX, math.floor(X_MIN * u ** (-1.0 / ALPHA)))
    return profile, patients

  def _scaled(self, patients: int) -> int:
    return max(MIN_PATIENTS, round(patients * self.patients_scale))

  def spec(self, k: int) -> synthetic.SiteSpec:
    """Site k's acquisition profile, name and number of patients."""
    if not 0 <= k < self.num_sites:
      raise IndexError(f"site {k} not in 0..{self.num_sites - 1}.")
    profile, patients = self._draw(k)
    base = PROFILES[profile]
    return dataclasses.replace(base, name=f"site{k:05d}_{base.name}",
                               num_patients=self._scaled(patients))

  @functools.cached_property
  def specs(self) -> tuple[synthetic.SiteSpec, ...]:
    return tuple(self.spec(k) for k in range(self.num_sites))

  @property
  def site_names(self) -> tuple[str, ...]:
    return tuple(s.name for s in self.specs)

  @property
  def site_modalities(self) -> tuple[str, ...]:
    return tuple(s.modality for s in self.specs)

  def slices_per_patient(self, k: int) -> int:
    return 1 if self.specs[k].modality == "XRAY" else self.num_slices

  def patient_splits(self, k: int) -> np.ndarray:
    """[P_k] split id (0 train, 1 val, 2 test) of site k's patients."""
    n = self.specs[k].num_patients
    seed = self.seed if self.split_seed is None else self.split_seed
    return sites_lib.assign_patient_splits(
        np.full(n, k), np.arange(n), self.split_fractions, seed)

  @functools.cached_property
  def _split_counts(self) -> np.ndarray:
    """[N, 3] patients per split."""
    return np.stack([np.bincount(self.patient_splits(k), minlength=3)
                     for k in range(self.num_sites)]).astype(np.int64)

  def counts(self, split: str) -> dict[str, np.ndarray]:
    """{"num_patients": [N], "num_examples": [N]} of one split, int64."""
    patients = self._split_counts[:, sites_lib.SPLITS.index(split)]
    per_patient = np.array([self.slices_per_patient(k)
                            for k in range(self.num_sites)])
    return {"num_patients": patients, "num_examples": patients * per_patient}

  def capacity(self) -> tuple[int, int, int]:
    """(M slices, P patients, L slices per patient) that hold any site's
    training split: from every possible site size up to P_MAX, so
    independent of N."""
    return self._capacity

  @functools.cached_property
  def _capacity(self) -> tuple[int, int, int]:
    fractions = self.split_fractions
    def train_patients(n):
      split = sites_lib.assign_patient_splits(np.zeros(n, int), np.arange(n),
                                              fractions, 0)
      return int(np.sum(split == 0))  # Depends on n only, not on the seed.
    # The split rounds each fraction, so the training count is not monotone
    # in n: take the largest over every possible size.
    train = max(train_patients(n) for n in range(
        MIN_PATIENTS, self._scaled(P_MAX) + 1))
    return train * self.num_slices, train, self.num_slices

  # -- rendering ---------------------------------------------------------------

  def _patients(self, k: int, wanted) -> list:
    """Site k's patients `wanted` as (image, label) volumes. Each patient has
    its own seed, so only those are rendered; a site's rendered patients
    are kept (least recently used sites out)."""
    rendered = self._cache.pop(k, None) or {}
    self._cache[k] = rendered  # Most recently used.
    spec = self.specs[k]
    for p in wanted:
      if p not in rendered:
        rendered[p] = synthetic.render_patient(
            spec, self.image_size, self.num_slices,
            np.random.default_rng([self.seed, CONSORTIUM_TAG, k, int(p)]))
    while len(self._cache) > self.cache_sites:
      self._cache.popitem(last=False)
    return [rendered[p] for p in wanted]

  def dataset(self, site_ids, split: str) -> dataset_lib.SliceDataset:
    """The `split` slices of `site_ids` (site axis in that order)."""
    site_ids = [int(k) for k in site_ids]
    want = sites_lib.SPLITS.index(split)
    patients = []
    for k in site_ids:
      wanted = np.flatnonzero(self.patient_splits(k) == want)
      patients.append([
          (f"{self.specs[k].name}/patient{p:03d}", image, label)
          for p, (image, label) in zip(wanted, self._patients(k, wanted))])
    return synthetic.slice_dataset([self.specs[k] for k in site_ids],
                                   patients,
                                   (self.image_size, self.image_size))

  def site_arrays(self, site_ids, split: str,
                  fixed_capacity: bool = False) -> sites_lib.SiteArrays:
    """`site_ids`' split stacked as `SiteArrays` (site axis in that order);
    with `fixed_capacity`, padded to `capacity()` (training cohorts)."""
    data = self.dataset(site_ids, split)
    if not fixed_capacity:
      return sites_lib.stack_sites(data)
    m, p, l = self.capacity()
    return sites_lib.stack_sites(data, pad_examples_to=m, pad_slices_to=l,
                                 pad_patients_to=p)

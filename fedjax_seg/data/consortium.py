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
from fedjax_seg.data import tfds_io

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
    return _stacked(self, site_ids, split, fixed_capacity)


def _stacked(sites, site_ids, split: str,
             fixed_capacity: bool) -> sites_lib.SiteArrays:
  """`sites.dataset(site_ids, split)` stacked, padded to `sites.capacity()`
  with `fixed_capacity` (a `Consortium` or a `PreparedConsortium`)."""
  data = sites.dataset(site_ids, split)
  if not fixed_capacity:
    return sites_lib.stack_sites(data)
  m, p, l = sites.capacity()
  return sites_lib.stack_sites(data, pad_examples_to=m, pad_slices_to=l,
                               pad_patients_to=p)


class PreparedConsortium:
  """The sites of a prepared dataset (`data_prep.prepare`), read from its
  array_record files a few sites at a time (`--stream_sites`).

  The `Consortium` interface for real data with many sites: counts come
  from one pass over the records' metadata at start-up (records are read
  in chunks and dropped, so host memory does not grow with the dataset),
  and `site_arrays` reads just the asked sites' records of one split. The
  split is the in-memory reader's (`sites.load_splits`): the dataset's own
  split column if it has one, else the patients of each site split with
  `split_fractions` and `seed`; within a site, slices are in the same
  (patient, slice) order, so a cohort's arrays are exactly those sites'
  rows of the all-sites arrays.

  Args:
    name, data_dir: the prepared dataset.
    split_fractions, seed: the patient split (as `sites.load_splits`).
    cache_sites: sites' records kept in memory (least recently used out).
    chunk: records read per call in the metadata pass.
  """

  def __init__(self, name: str, data_dir, split_fractions=(0.7, 0.15, 0.15),
               seed: int = 0, cache_sites: int = 64, chunk: int = 256):
    stats = tfds_io.read_stats(name, data_dir)
    self._sources = tfds_io.data_source(name, data_dir)
    self.site_names = tuple(stats["site_names"])
    self.site_modalities = tuple(stats["site_modalities"])
    self.modality_names = tuple(sorted(set(self.site_modalities)))
    self.class_names = tuple(stats["class_names"])
    self.num_sites = len(self.site_names)
    self.cache_sites = cache_sites
    self._cache = collections.OrderedDict()
    own_split = bool(set(self._sources) - {"train"})
    # (source split, record id, site, patient name, slice index) of every
    # record, from one streamed pass.
    meta = []
    for source_split in sorted(self._sources):
      source = self._sources[source_split]
      for start in range(0, len(source), chunk):
        ids = list(range(start, min(start + chunk, len(source))))
        for i, record in zip(ids, source.__getitems__(ids)):
          meta.append((source_split, i,
                       self.site_names.index(tfds_io.text(record["site"])),
                       tfds_io.text(record["patient"]),
                       int(record["slice_index"])))
    # Patient ids are ranks of the sorted names, as `tfds_io.load` numbers
    # them, so the patient split and the slice order are the same.
    self.patient_names = tuple(sorted({m[3] for m in meta}))
    rank = {p: i for i, p in enumerate(self.patient_names)}
    site = np.array([m[2] for m in meta], np.int32)
    patient = np.array([rank[m[3]] for m in meta], np.int32)
    if own_split:
      split = np.array([sites_lib.SPLITS.index(m[0]) if m[0] in
                        sites_lib.SPLITS else -1 for m in meta])
    else:
      split = sites_lib.assign_patient_splits(site, patient, split_fractions,
                                              seed)
    self._meta = meta
    self._site, self._patient, self._split = site, patient, split
    self._slices = np.array([m[4] for m in meta], np.int32)
    self._capacity = None

  def counts(self, split: str) -> dict[str, np.ndarray]:
    """{"num_patients": [N], "num_examples": [N]} of one split, int64."""
    want = self._split == sites_lib.SPLITS.index(split)
    examples = np.bincount(self._site[want], minlength=self.num_sites)
    # Each patient is at one site (prepare refuses otherwise).
    pairs = np.unique(np.stack([self._site[want], self._patient[want]]),
                      axis=1)
    patients = np.bincount(pairs[0], minlength=self.num_sites)
    return {"num_patients": patients.astype(np.int64),
            "num_examples": examples.astype(np.int64)}

  def capacity(self) -> tuple[int, int, int]:
    """(M slices, P patients, L slices per patient) that hold any site's
    training split."""
    if self._capacity is None:
      counts = self.counts("train")
      train = self._split == 0
      per_patient = (np.bincount(self._patient[train]) if train.any()
                     else np.ones(1))
      self._capacity = (max(1, int(counts["num_examples"].max())),
                        max(1, int(counts["num_patients"].max())),
                        max(1, int(np.max(per_patient))))
    return self._capacity

  def _records(self, k: int, split: str) -> list[int]:
    """Positions in the metadata of site k's records of `split`."""
    return np.flatnonzero((self._site == k) & (
        self._split == sites_lib.SPLITS.index(split))).tolist()

  def _read(self, k: int, split: str):
    """(image, label) arrays of site k's records of `split` (cached)."""
    key = (k, split)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    positions = self._records(k, split)
    by_source = collections.defaultdict(list)
    for pos in positions:
      by_source[self._meta[pos][0]].append(pos)
    images, labels = {}, {}
    for source_split, wanted in by_source.items():
      records = self._sources[source_split].__getitems__(
          [self._meta[pos][1] for pos in wanted])
      for pos, record in zip(wanted, records):
        images[pos], labels[pos] = record["image"], record["label"]
    out = (positions, [images[p] for p in positions],
           [labels[p] for p in positions])
    self._cache[key] = out
    while len(self._cache) > self.cache_sites:
      self._cache.popitem(last=False)
    return out

  def dataset(self, site_ids, split: str) -> dataset_lib.SliceDataset:
    """The `split` slices of `site_ids` (site axis in that order)."""
    site_ids = [int(k) for k in site_ids]
    parts = [self._read(k, split) for k in site_ids]
    positions = np.array([p for part in parts for p in part[0]], np.int64)
    sites = np.concatenate([np.full(len(part[0]), j, np.int32)
                            for j, part in enumerate(parts)] or [
                                np.zeros(0, np.int32)])
    images = [x for part in parts for x in part[1]]
    labels = [x for part in parts for x in part[2]]
    names = tuple(self.site_names[k] for k in site_ids)
    modalities = tuple(self.site_modalities[k] for k in site_ids)
    if images:
      image = np.stack(images).astype(np.float32)
      label = np.stack(labels).astype(np.uint8)
    else:  # No slice of this split at these sites: shapes from any record.
      first = self._sources[self._meta[0][0]][self._meta[0][1]]
      image = np.zeros((0,) + first["image"].shape, np.float32)
      label = np.zeros((0,) + first["label"].shape, np.uint8)
    return dataset_lib.SliceDataset(
        image=image, label=label, site=sites,
        patient=self._patient[positions].astype(np.int32),
        modality=np.array([self.modality_names.index(modalities[s])
                           for s in sites], np.int32),
        slice_index=self._slices[positions].astype(np.int32),
        site_names=names, site_modalities=modalities,
        modality_names=self.modality_names, class_names=self.class_names,
        patient_names=self.patient_names)

  def site_arrays(self, site_ids, split: str,
                  fixed_capacity: bool = False) -> sites_lib.SiteArrays:
    """`site_ids`' split stacked as `SiteArrays` (site axis in that order);
    with `fixed_capacity`, padded to `capacity()` (training cohorts)."""
    return _stacked(self, site_ids, split, fixed_capacity)

"""Tests for fedjax_seg.data.consortium: many sites, made on demand."""

import collections
import dataclasses

import numpy as np
import pytest

from fedjax_seg.data import consortium
from fedjax_seg.data import synthetic

SMALL = consortium.Consortium(num_sites=12, image_size=16, num_slices=2,
                              patients_scale=0.25)


def test_site_k_is_the_same_whatever_the_number_of_sites():
  large = dataclasses.replace(SMALL, num_sites=400)
  assert large.specs[:12] == SMALL.specs
  for k in (0, 7):
    a = SMALL.site_arrays([k], "train")
    b = large.site_arrays([k], "train")
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.label, b.label)
  other_seed = dataclasses.replace(SMALL, seed=1)
  assert other_seed.specs != SMALL.specs


def test_sizes_are_heavy_tailed_and_profiles_uniform():
  c = consortium.Consortium(num_sites=4000)
  patients = np.array([s.num_patients for s in c.specs])
  # Discrete Pareto(x_min=8, alpha=1.3), capped at 500: median 13, 10% above
  # 47 (survival (8/48)^1.3 = 0.097), 1% above 280.
  assert 11 <= np.median(patients) <= 15
  assert 0.08 <= np.mean(patients > 47) <= 0.12
  assert 0.004 <= np.mean(patients > 280) <= 0.02
  assert patients.min() == consortium.X_MIN
  assert patients.max() <= consortium.P_MAX
  profiles = collections.Counter(s.name.split("_", 1)[1] for s in c.specs)
  assert set(profiles) == {p.name for p in synthetic.DEFAULT_SITES}
  assert max(profiles.values()) / min(profiles.values()) < 1.3


def test_counts_without_rendering_match_the_rendered_sites():
  ids = [3, 0, 9]
  for split in ("train", "val", "test"):
    counts = SMALL.counts(split)
    arrays = SMALL.site_arrays(ids, split)
    np.testing.assert_array_equal(arrays.num_examples,
                                  counts["num_examples"][ids])
    np.testing.assert_array_equal(arrays.num_patients,
                                  counts["num_patients"][ids])
    assert arrays.site_names == tuple(SMALL.site_names[k] for k in ids)
  # Every patient is in exactly one split, and every site has each split.
  total = sum(SMALL.counts(s)["num_patients"] for s in ("train", "val",
                                                        "test"))
  np.testing.assert_array_equal(total, [s.num_patients for s in SMALL.specs])
  assert all((SMALL.counts(s)["num_patients"] >= 1).all()
             for s in ("train", "val", "test"))


def test_training_cohorts_have_one_fixed_capacity_for_every_site():
  m, p, l = SMALL.capacity()
  many = dataclasses.replace(SMALL, num_sites=3000)
  train = many.counts("train")
  assert train["num_examples"].max() <= m and train["num_patients"].max() <= p
  # The cap is reached by some site of a large consortium: the capacity is
  # not padding for nothing.
  assert train["num_patients"].max() >= p - 2
  cohort = SMALL.site_arrays([1, 5, 2], "train", fixed_capacity=True)
  assert cohort.image.shape == (3, m, 16, 16, 1)
  assert cohort.groups.shape == (3, p, l)
  assert not cohort.mask[:, cohort.num_examples.max():].any()


def test_rendered_sites_are_cached_up_to_a_bound():
  c = dataclasses.replace(SMALL, cache_sites=2)
  for k in (0, 1, 2, 1):
    c.site_arrays([k], "val")
  assert list(c._cache) == [2, 1]  # pylint: disable=protected-access


def test_bad_settings_are_refused():
  with pytest.raises(ValueError, match="num_sites"):
    consortium.Consortium(num_sites=0)
  with pytest.raises(ValueError, match="image_size"):
    consortium.Consortium(num_sites=3, image_size=8)
  with pytest.raises(IndexError, match="site 12"):
    SMALL.spec(12)

"""Tests for fedjax_seg.data.partition."""

import numpy as np
import pytest

from fedjax_seg.data import partition


def test_hash_sites_is_stable_and_roughly_uniform():
  patients = [f"patient{i}" for i in range(2000)]
  a = partition.hash_sites(patients, 4)
  np.testing.assert_array_equal(a, partition.hash_sites(patients, 4))
  counts = np.bincount(a, minlength=4)
  assert counts.min() > 400


def _mean_tv_from_global(sites, classes, num_sites):
  glob = np.bincount(classes, minlength=3) / len(classes)
  tvs = []
  for s in range(num_sites):
    local = np.bincount(classes[sites == s], minlength=3)
    tvs.append(0.5 * np.abs(local / local.sum() - glob).sum())
  return float(np.mean(tvs))


def test_dirichlet_split_has_the_requested_skew():
  classes = np.repeat([0, 1, 2], 200)
  skewed = partition.dirichlet_sites(classes, 5, alpha=0.1, seed=0)
  mild = partition.dirichlet_sites(classes, 5, alpha=100.0, seed=0)
  assert np.unique(skewed).size == 5 and np.unique(mild).size == 5
  assert _mean_tv_from_global(skewed, classes, 5) > 0.3
  assert _mean_tv_from_global(mild, classes, 5) < 0.08
  np.testing.assert_array_equal(
      skewed, partition.dirichlet_sites(classes, 5, alpha=0.1, seed=0))


def test_dirichlet_refuses_impossible_splits():
  with pytest.raises(ValueError, match="cannot fill"):
    partition.dirichlet_sites([0, 1], 3, alpha=1.0, seed=0)

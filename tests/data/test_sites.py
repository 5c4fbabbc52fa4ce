"""Tests for fedjax_seg.data.sites: padding, patient splits, streaming."""

import numpy as np
import pytest

from fedjax_seg.data import nifti
from fedjax_seg.data import prepare
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic
from tests.data import fixtures

DATA = synthetic.generate(synthetic.SyntheticConfig(
    image_size=16, num_slices=3, patients_scale=0.075))


def test_patient_level_splits_are_disjoint_and_deterministic():
  parts = sites.split_by_patient(DATA, seed=3)
  patients = {k: set(v.patient.tolist()) for k, v in parts.items()}
  assert not patients["train"] & patients["val"]
  assert not patients["train"] & patients["test"]
  assert not patients["val"] & patients["test"]
  assert sum(v.num_examples for v in parts.values()) == DATA.num_examples
  again = sites.split_by_patient(DATA, seed=3)
  np.testing.assert_array_equal(parts["val"].patient, again["val"].patient)
  other = sites.split_by_patient(DATA, seed=4)
  assert not np.array_equal(parts["val"].patient, other["val"].patient)
  for s in range(DATA.num_sites):  # Every site keeps a training patient.
    assert (parts["train"].site == s).any()
  with pytest.raises(ValueError, match="fractions"):
    sites.split_by_patient(DATA, fractions=(0.5, 0.5, 0.5))


def test_stacked_sites_pad_and_mask():
  arrays = sites.stack_sites(DATA, pad_examples_to=40)
  counts = np.bincount(DATA.site, minlength=DATA.num_sites)
  np.testing.assert_array_equal(arrays.num_examples, counts)
  np.testing.assert_array_equal(arrays.mask.sum(1), counts)
  assert arrays.image.shape == (DATA.num_sites, 40, 16, 16, 1)
  assert (arrays.image[~arrays.mask] == 0).all()
  assert (arrays.patient[~arrays.mask] == -1).all()
  for s in range(DATA.num_sites):
    real = arrays.image[s][arrays.mask[s]]
    np.testing.assert_array_equal(np.sort(real.ravel()),
                                  np.sort(DATA.image[DATA.site == s].ravel()))
  with pytest.raises(ValueError, match="pad_examples_to"):
    sites.stack_sites(DATA, pad_examples_to=2)


def test_patient_groups_index_one_patient_each():
  arrays = sites.stack_sites(DATA)
  for s in range(arrays.num_sites):
    assert arrays.group_mask[s].any(axis=1).sum() == arrays.num_patients[s]
    for p in range(arrays.num_patients[s]):
      positions = arrays.groups[s, p][arrays.group_mask[s, p]]
      assert len(set(arrays.patient[s, positions].tolist())) == 1
      assert arrays.mask[s, positions].all()
    covered = arrays.groups[s][arrays.group_mask[s]]
    assert sorted(covered.tolist()) == list(range(arrays.num_examples[s]))


def test_streaming_reader_gathers_the_same_examples(tmp_path):
  csv_path = fixtures.write_csv(tmp_path / "in", patients_per_site=4)
  config = nifti.PreprocessConfig(image_size=(32, 32))
  prepare.prepare_dataset(csv_path, tmp_path / "data", "hosp", config)
  memory = sites.stack_sites(
      sites.load_splits("hosp", tmp_path / "data", seed=1)["train"])
  stream = sites.StreamingSites("hosp", tmp_path / "data", "train", seed=1)
  np.testing.assert_array_equal(stream.num_examples, memory.num_examples)
  idx = np.array([[0, 2, 1], [1, 0, 0]])
  mask = np.array([[True, True, True], [True, True, False]])
  image, label = stream.gather(idx, mask)
  assert image.shape == (2, 3, 32, 32, 1) and (image[1, 2] == 0).all()
  for s in range(2):  # Same set of slices as the in-memory site, by content.
    memory_set = {memory.image[s, m].tobytes()
                  for m in range(memory.num_examples[s])}
    for b in range(3):
      if mask[s, b]:
        assert image[s, b].tobytes() in memory_set

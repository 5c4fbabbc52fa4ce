"""Tests for fedjax_seg.federated.sampling."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.privacy import plan as privacy_plan
from fedjax_seg import federated as fed
from fedjax_seg import privacy
from fedjax_seg.federated import sampling


def test_poisson_sample_rate_padding_and_shape():
  sample = jax.jit(fed.poisson_sample, static_argnums=(2, 4))
  counts, seen = [], np.zeros(50, int)
  for t in range(400):
    idx, mask = sample(jax.random.key(t), jnp.int32(40), 50, jnp.float32(0.1),
                       16)
    assert idx.shape == (16,) and mask.shape == (16,)
    chosen = np.asarray(idx)[np.asarray(mask)]
    assert len(set(chosen.tolist())) == len(chosen)  # No duplicates.
    assert (chosen < 40).all()  # Padding is never sampled.
    seen[chosen] += 1
    counts.append(len(chosen))
  assert np.mean(counts) == pytest.approx(4.0, rel=0.1)
  assert seen[40:].sum() == 0
  # Every real unit is sampled at about the rate q (400 draws: 40 +- 19).
  assert seen[:40].min() > 20 and seen[:40].max() < 65


def test_padding_capacity_does_not_change_the_draws():
  key = jax.random.key(3)
  a = fed.poisson_sample(key, jnp.int32(20), 20, jnp.float32(0.3), 12)
  b = fed.poisson_sample(key, jnp.int32(20), 64, jnp.float32(0.3), 12)
  np.testing.assert_array_equal(np.asarray(a[0])[np.asarray(a[1])],
                                np.asarray(b[0])[np.asarray(b[1])])


def test_max_batch_size_makes_truncation_negligible():
  b = privacy_plan.max_batch_size_for(1000, 0.016)
  assert privacy.truncation_probability(1000, 0.016, b) <= 1e-12
  assert 16 < b < 64
  assert privacy_plan.max_batch_size_for(5, 1.0) == 6


def test_participants_deterministic_with_counts_and_dropouts():
  root = jax.random.key(0)
  a = fed.sample_participants(root, 3, 10, num_per_round=4)
  np.testing.assert_array_equal(a, fed.sample_participants(
      root, 3, 10, num_per_round=4))
  assert a.sum() == 4
  rates = np.mean([fed.sample_participants(root, r, 10, sampling_rate=0.3)
                   for r in range(300)])
  assert rates == pytest.approx(0.3, abs=0.03)
  dropped = np.mean([fed.sample_participants(root, r, 10, sampling_rate=1.0,
                                              dropout_rate=0.2)
                     for r in range(300)])
  assert dropped == pytest.approx(0.8, abs=0.03)
  with pytest.raises(ValueError, match="exactly one"):
    fed.sample_participants(root, 0, 10)


def _pack_by_hand(idx, mask, groups, group_mask):
  positions, segments = [], []
  for slot, (i, m) in enumerate(zip(idx, mask)):
    if m:
      real = np.flatnonzero(group_mask[i])
      positions += groups[i, real].tolist()
      segments += [slot] * len(real)
  return positions, segments


@pytest.mark.parametrize("mask", [
    [True, True, True, False, False],  # Sampled first, as poisson_sample does.
    [False] * 5,  # Empty sample.
    [True] * 5,  # Full sample.
    [True, False, True, False, True],  # Any order packs the same way.
])
def test_pack_groups_lays_out_sampled_patients_slices_contiguously(mask):
  rng = np.random.default_rng(0)
  groups = rng.integers(0, 100, (7, 4)).astype(np.int32)
  group_mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1],
                         [0, 1, 0, 1], [1, 1, 1, 0], [0, 0, 0, 0],
                         [1, 0, 1, 0]], bool)  # Ragged; not only prefixes.
  idx = np.array([2, 0, 3, 6, 5], np.int32)
  mask = np.array(mask)
  positions, segments, slice_mask = jax.jit(sampling.pack_groups)(
      idx, mask, groups, group_mask)
  assert positions.shape == segments.shape == slice_mask.shape == (20,)
  want_pos, want_seg = _pack_by_hand(idx, mask, groups, group_mask)
  n = len(want_pos)
  np.testing.assert_array_equal(slice_mask, np.arange(20) < n)
  np.testing.assert_array_equal(positions[:n], want_pos)
  np.testing.assert_array_equal(segments[:n], want_seg)
  np.testing.assert_array_equal(positions[n:], 0)
  np.testing.assert_array_equal(segments[n:], 0)


def test_pack_groups_holds_the_largest_possible_batch():
  """Capacity B_max * L: every slice of B_max longest patients fits."""
  groups = np.arange(12, dtype=np.int32).reshape(3, 4)
  group_mask = np.ones((3, 4), bool)
  positions, segments, slice_mask = sampling.pack_groups(
      np.array([1, 0, 2], np.int32), np.ones(3, bool), groups, group_mask)
  assert bool(slice_mask.all())
  np.testing.assert_array_equal(positions, np.r_[4:8, 0:4, 8:12])
  np.testing.assert_array_equal(segments, np.repeat([0, 1, 2], 4))


@pytest.mark.parametrize("num_units,batch", [(10, 4), (8, 4), (3, 4), (1, 1)])
def test_shuffled_batch_reads_each_epoch_once_without_replacement(
    num_units, batch):
  key = jax.random.key(7)
  capacity = 12
  draw = jax.jit(lambda step: sampling.shuffled_batch(
      key, num_units, capacity, batch, step))
  steps = 3 * num_units  # Enough for several epochs.
  batches = [draw(s) for s in range(steps)]
  b = min(batch, num_units)
  for idx, mask in batches:
    chex.assert_shape((idx, mask), (batch,))
    np.testing.assert_array_equal(mask, np.arange(batch) < b)
    assert (np.asarray(idx)[np.asarray(mask)] < num_units).all()  # No padding.
    np.testing.assert_array_equal(np.asarray(idx)[~np.asarray(mask)], 0)
  stream = np.concatenate([np.asarray(i)[np.asarray(m)] for i, m in batches])
  epochs = stream[: (len(stream) // num_units) * num_units].reshape(
      -1, num_units)
  for epoch in epochs:  # Each epoch is a permutation of the site's units.
    np.testing.assert_array_equal(np.sort(epoch), np.arange(num_units))
  if num_units > 2:  # The order differs between epochs ...
    assert len({tuple(e) for e in epochs}) > 1
  if num_units >= 8:  # ... and is shuffled (identity: 1 in 8! per epoch).
    assert not (epochs == np.arange(num_units)).all(axis=1).any()


@pytest.mark.slow
def test_shuffled_batch_is_a_function_of_the_key_and_ignores_padding():
  same = [sampling.shuffled_batch(jax.random.key(3), 9, cap, 4, step)[0]
          for cap in (9, 30) for step in (1, 2)]
  np.testing.assert_array_equal(same[0], same[2])  # Padding changes nothing.
  np.testing.assert_array_equal(same[1], same[3])
  other = sampling.shuffled_batch(jax.random.key(4), 9, 9, 4, 1)[0]
  assert not np.array_equal(same[0], other)
  # vmap over sites with different sizes.
  idx, mask = jax.vmap(lambda n: sampling.shuffled_batch(
      jax.random.key(0), n, 12, 4, 0))(jnp.array([12, 2, 0]))
  np.testing.assert_array_equal(mask.sum(1), [4, 2, 0])

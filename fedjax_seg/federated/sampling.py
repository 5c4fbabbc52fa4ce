"""Batches as fixed-shape padded arrays (Poisson or shuffled), participation.

Privacy accounting assumes Poisson sampling: each unit (example or patient)
of site k is in a step's batch independently with probability q_k = B / N_k.
A jitted program needs a static batch shape, so the sample is realised as the
first `max_batch_size` sampled units plus padding, with a mask. If more than
`max_batch_size` units are sampled the batch is truncated (a random subset of
the sampled units is kept, since the candidates are in random order); the
ledger accounts for this (`record(..., dataset_size=N, max_batch_size=B_max)`)
and `privacy.plan.max_batch_size_for` picks B_max so that truncation is
negligible.

Where the local training is not record-level private (site-level DP, whose
guarantee comes from clipping the site's update and sampling sites; or no DP)
nothing requires Poisson batches, and `shuffled_batch` draws fixed-size
batches without replacement from a per-round epoch order instead: B slots,
no padding capacity to carry.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg.privacy import keys as keys_lib


def poisson_sample(key: jax.Array, num_units: jax.Array, capacity: int,
                   sampling_rate: jax.Array,
                   max_batch_size: int,
                   group: tuple | None = None) -> tuple[jax.Array, jax.Array]:
  """One Poisson sample of a site's units as a padded batch.

  Args:
    key: a fresh key (`Purpose.SAMPLE_BATCH`).
    num_units: [] int, N_k; units at positions >= N_k are padding and are never
      sampled.
    capacity: static size of the site's unit axis (>= N_k).
    sampling_rate: [] float, q_k.
    max_batch_size: static batch size B_max.
    group: (groups [capacity] int32, phase []): only units whose group is
      `phase` can be taken (cyclic Poisson sampling: each unit in one of b
      groups, `cyclic_groups`, one group per step in turn); None: all.

  Returns:
    (indices [B_max] int32 into the unit axis, mask [B_max] bool). Masked
    entries point at a valid position but must be treated as padding.
  """
  positions = jnp.arange(capacity)
  # Two uniforms per position from fold_in(key, position): the draws of real
  # units do not depend on how much padding follows them.
  draws = jax.vmap(lambda i: jax.random.uniform(
      jax.random.fold_in(key, i), (2,)))(positions)
  taken = (draws[:, 0] < sampling_rate) & (positions < num_units)
  if group is not None:
    groups, phase = group
    taken = taken & (groups == phase)
  # Sampled units first, in random order, so truncation keeps a uniformly
  # random subset of them.
  priority = jnp.where(taken, draws[:, 1], 2.0)
  order = jnp.argsort(priority)[:max_batch_size]
  if capacity < max_batch_size:
    pad = max_batch_size - capacity
    order = jnp.concatenate([order, jnp.zeros((pad,), order.dtype)])
    mask = jnp.concatenate([taken[order[:capacity]], jnp.zeros((pad,), bool)])
  else:
    mask = taken[order]
  return order.astype(jnp.int32), mask


def pack_groups(indices: jax.Array, mask: jax.Array, groups: jax.Array,
                group_mask: jax.Array) -> tuple[jax.Array, jax.Array,
                                                 jax.Array]:
  """A padded batch of groups (patients) as one packed buffer of slices.

  The sampled groups' real slices are laid out one group after another, in
  the batch order (sampled groups first, as `poisson_sample` orders them),
  each group's slices contiguous, padding after. The buffer has the static
  capacity B_max * L, which holds every possible batch: packing truncates
  nothing, so the sample (and its privacy accounting) is unchanged; only the
  order of the work changes.

  Args:
    indices: [B_max] int32 group positions (from `poisson_sample`).
    mask: [B_max] bool, sampled groups.
    groups: [P, L] int32 positions (in the example axis) of each group's
      slices.
    group_mask: [P, L] bool, real slices.

  Returns:
    (positions [B_max * L] int32 into the example axis, segment_ids
    [B_max * L] int32 in [0, B_max): the batch slot of each slice's group,
    slice_mask [B_max * L] bool: real slices of sampled groups). Where
    `slice_mask` is False, position and segment are 0 and must be treated as
    padding.
  """
  batch, length = indices.shape[0], groups.shape[-1]
  real = group_mask[indices] & mask[:, None]  # [B_max, L]
  # Each group's real slices first (a stable sort keeps their order).
  order = jnp.argsort(~real, axis=1, stable=True)
  positions = jnp.take_along_axis(groups[indices], order, axis=1)
  counts = jnp.sum(real, axis=1)
  ends = jnp.cumsum(counts)
  slot = jnp.arange(batch * length)
  # Slot t belongs to the first group whose slices end after t (groups with
  # no slice end where the previous one does and are skipped).
  segment = jnp.minimum(jnp.searchsorted(ends, slot, side="right"),
                        batch - 1)
  within = jnp.clip(slot - (ends - counts)[segment], 0, length - 1)
  slice_mask = slot < ends[-1]
  positions = jnp.where(slice_mask, positions[segment, within], 0)
  segment = jnp.where(slice_mask, segment, 0)
  return (positions.astype(jnp.int32), segment.astype(jnp.int32),
          slice_mask)


def _epoch_order(key: jax.Array, num_units: jax.Array, capacity: int,
                 epoch: jax.Array) -> jax.Array:
  """[capacity] int32: a uniform permutation of [0, N) first, padding after."""
  # One uniform per position from fold_in: the order of the real units does
  # not depend on how much padding follows them.
  epoch_key = jax.random.fold_in(key, epoch)
  positions = jnp.arange(capacity)
  draws = jax.vmap(lambda i: jax.random.uniform(
      jax.random.fold_in(epoch_key, i)))(positions)
  draws = jnp.where(positions < num_units, draws, 2.0)
  return jnp.argsort(draws).astype(jnp.int32)


def cyclic_groups(key: jax.Array, capacity: int,
                  cycle: jax.Array) -> jax.Array:
  """[capacity] int32: each unit's group, uniform in [0, b) and independent
  of every other unit's (jax_privacy's `PartitionType.INDEPENDENT`).

  Drawn once for the whole run from a secret key (`Purpose.CYCLIC_GROUPS`,
  the same every round): adding or removing a unit changes no other unit's
  group distribution, which add/remove-one DP needs; a partition by
  position (i mod b) would move every later unit. Draws come from
  fold_in(key, position), so a unit's group does not depend on padding.
  """
  return jax.vmap(lambda i: jax.random.randint(
      jax.random.fold_in(key, i), (), 0, cycle))(
          jnp.arange(capacity)).astype(jnp.int32)


def shuffled_batch(key: jax.Array, num_units: jax.Array, capacity: int,
                   batch_size: int,
                   step: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Local step `step`'s batch: the next min(B, N) units of an epoch order.

  Fixed-size sampling without replacement, for local training that is not
  record-level private (its accounting never assumes Poisson batches). The
  units of a round are read in a random order, epoch after epoch: epoch e is
  the permutation drawn from `fold_in(key, e)` (so the order is a pure
  function of the key: of seed, round and site), and step s takes positions
  [s * b, (s + 1) * b) of the concatenated epochs, b = min(B, N). Within an
  epoch no unit repeats; a batch that crosses into the next epoch may meet a
  unit again only after every unit has been seen once.

  Args:
    key: a fresh key per (round, site) (`Purpose.LOCAL_EPOCH_ORDER`), the same
      for every step of the round.
    num_units: [] int, N_k; positions >= N_k are padding.
    capacity: static size of the site's unit axis (>= N_k).
    batch_size: static B, the batch slots.
    step: [] int, the local step.

  Returns:
    (indices [B] int32 into the unit axis, mask [B] bool: the first
    min(B, N_k) slots are real). Masked entries point at position 0.
  """
  n = jnp.asarray(num_units, jnp.int32)
  b = jnp.minimum(batch_size, n)
  position = jnp.asarray(step, jnp.int32) * b + jnp.arange(batch_size)
  safe_n = jnp.maximum(n, 1)
  epoch = position // safe_n
  # A batch spans at most two epochs (b <= N): draw just those two orders.
  first = epoch[0]
  orders = jnp.stack([_epoch_order(key, n, capacity, first),
                      _epoch_order(key, n, capacity, first + 1)])
  indices = orders[epoch - first, position % safe_n]
  mask = jnp.arange(batch_size) < b
  return jnp.where(mask, indices, 0).astype(jnp.int32), mask


def sample_participants(root: jax.Array, round_index: int, num_sites: int, *,
                        sampling_rate: float | None = None,
                        num_per_round: int | None = None,
                        dropout_rate: float = 0.0) -> np.ndarray:
  """[S] bool: the sites that train this round (host side, deterministic).

  Either Poisson with `sampling_rate` (what site-level DP accounting
  assumes), or a uniform subset of `num_per_round` sites; then each sampled
  site independently fails to show up with `dropout_rate`. A site that does
  not train spends no privacy budget.
  """
  if (sampling_rate is None) == (num_per_round is None):
    raise ValueError("give exactly one of sampling_rate and num_per_round.")
  if not 0 <= dropout_rate < 1:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate}.")
  key = keys_lib.derive_key(root, round_index=round_index, site=0, step=0,
                            purpose=keys_lib.Purpose.SAMPLE_SITES)
  if sampling_rate is not None:
    if not 0 < sampling_rate <= 1:
      raise ValueError(f"site sampling_rate must be in (0, 1], got "
                       f"{sampling_rate}.")
    sampled = np.asarray(jax.random.uniform(key, (num_sites,))) < sampling_rate
  else:
    if not 1 <= num_per_round <= num_sites:
      raise ValueError(f"num_per_round must be in [1, {num_sites}], got "
                       f"{num_per_round}.")
    chosen = np.asarray(jax.random.permutation(key, num_sites))[:num_per_round]
    sampled = np.zeros(num_sites, bool)
    sampled[chosen] = True
  if dropout_rate > 0:
    drop_key = keys_lib.derive_key(root, round_index=round_index, site=0,
                                   step=0, purpose=keys_lib.Purpose.SITE_DROPOUT)
    sampled &= np.asarray(jax.random.uniform(drop_key, (num_sites,))) >= (
        dropout_rate)
  return sampled


def server_groups(root: jax.Array, num_sites: int, cycle: int) -> np.ndarray:
  """[S] int: each site's cyclic group under correlated server noise (host
  side), uniform in [0, b) and independent across sites, drawn once per run
  from the secret root (`Purpose.SERVER_CYCLIC_GROUPS`): round r trains the
  sites of group r mod b."""
  key = keys_lib.derive_key(root, round_index=0, site=0, step=0,
                            purpose=keys_lib.Purpose.SERVER_CYCLIC_GROUPS)
  return np.asarray(cyclic_groups(key, num_sites, jnp.int32(cycle)))

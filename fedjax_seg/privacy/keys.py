"""PRNG key derivation along (round, site, step, purpose).

Every random draw in a simulation comes from one root key. A key for one use is
derived by folding in, in this fixed order, the round index, the site index, the
local step index and a purpose code; nothing is ever split off and carried in
state, so two uses can only share a key if they share all four coordinates. The
purpose code separates, e.g., the Poisson sampling of a batch from the Gaussian
noise added to the same batch's gradient.

Formal guarantees:
  * `derive_key` is a pure, deterministic function of its inputs: a run resumed
    from a checkpoint draws exactly the same keys as one that never stopped.
  * Distinct coordinate tuples give distinct keys (up to collisions of the
    threefry hash, about 2**-64 per pair); `tests/privacy/test_keys.py` checks
    this exhaustively on a grid.
  * Not covered: JAX's PRNG (threefry / philox) is a counter-based
    pseudo-random generator, not a cryptographically secure RNG. An adversary
    who learns the root seed can reproduce and subtract all noise. Keep the
    root seed secret in any deployment; in a simulation it is a parameter.
"""

import enum

import jax


class Purpose(enum.IntEnum):
  """What a derived key is used for. The values are part of the key format."""

  SAMPLE_BATCH = 1  # Poisson sampling of examples / patients within a site.
  GRADIENT_NOISE = 2  # Gaussian noise on the sum of clipped gradients.
  CLIP_COUNT_NOISE = 3  # Noise on the unclipped count (adaptive clipping).
  SAMPLE_SITES = 4  # Which sites take part in a round.
  SITE_DROPOUT = 5  # Which sampled sites fail to report.
  SERVER_NOISE = 6  # Site-level DP noise added at the server.
  SERVER_CLIP_COUNT_NOISE = 7  # Adaptive clipping of site updates.
  MODEL_INIT = 8  # Model parameter initialisation.
  DROPOUT = 9  # Model dropout layers.
  DATA_SPLIT = 10  # Train/val/test partition of patients.
  EVALUATION = 11  # Anything random during evaluation.
  AUDIT_INCLUSION = 12  # Which audit canaries are included.
  LOCAL_EPOCH_ORDER = 13  # Shuffled local batches (no record-level DP).
  AUDIT_CANARY_SAMPLE = 14  # Poisson sampling of canaries in a step.
  AUDIT_DIRECTIONS = 15  # The canaries' gradient directions.
  ATTACK_RELEASE = 16  # Noise of an update released to the attack study.
  ATTACK_RESTARTS = 17  # The gradient-inversion attack's random starts.
  AUGMENT = 18  # Data augmentation of a step's sampled units.


def derive_key(
    root: jax.Array,
    *,
    round_index: int | jax.Array,
    site: int | jax.Array,
    step: int | jax.Array,
    purpose: Purpose | int,
) -> jax.Array:
  """Returns the key for one (round, site, step, purpose) use.

  Args:
    root: the experiment's root key (`jax.random.key(seed)`).
    round_index: federated round, >= 0. Python int or traced int32.
    site: site index, >= 0 (use 0 for server-side draws; the purpose keeps them
      apart from site draws).
    step: local step within the round, >= 0 (0 for once-per-round draws).
    purpose: a `Purpose` member.

  Returns:
    A new key. Jit- and vmap-compatible in every integer argument.

  Example:
    >>> import jax
    >>> root = jax.random.key(0)
    >>> k1 = derive_key(root, round_index=3, site=1, step=0,
    ...                 purpose=Purpose.GRADIENT_NOISE)
    >>> k2 = derive_key(root, round_index=3, site=1, step=0,
    ...                 purpose=Purpose.SAMPLE_BATCH)
    >>> bool((jax.random.key_data(k1) != jax.random.key_data(k2)).any())
    True
  """
  key = jax.random.fold_in(root, round_index)
  key = jax.random.fold_in(key, site)
  key = jax.random.fold_in(key, step)
  return jax.random.fold_in(key, int(purpose))

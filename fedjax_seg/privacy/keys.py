"""PRNG key derivation along (round, site, step, purpose), and noise roots.

Every random draw of a mechanism (noise, sampling, canaries) comes from one
root key, the run's noise root. A key for one use is
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
  * The noise root of a run is secret by default: `new_noise_secret` draws
    256 bits from the operating system's entropy (`secrets`) and
    `key_from_secret` turns them into a key. Anyone who knows the root can
    recompute every noise draw and subtract it from a released model, so a
    root derived from a known seed (`--noise_seed`) gives noise that is
    public to whoever has that seed.
  * Not covered: JAX's PRNG (threefry) is a counter-based pseudo-random
    generator, not a cryptographically secure RNG, and its key holds 64 bits
    (`key_from_secret` keeps 64 bits of SHA-256 of the secret): the noise is
    as secret as a 64-bit key, under the assumption that threefry's output
    does not reveal its key.
"""

import enum
import hashlib
import secrets

import jax
import numpy as np

NOISE_SECRET_BYTES = 32  # 256 bits from the operating system.


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
  CYCLIC_GROUPS = 19  # Each unit's group under correlated noise (once per run).
  SERVER_CYCLIC_GROUPS = 20  # Each site's group under correlated server noise.


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


def new_noise_secret() -> bytes:
  """A fresh noise secret: NOISE_SECRET_BYTES from the OS's entropy."""
  return secrets.token_bytes(NOISE_SECRET_BYTES)


def key_from_secret(secret: bytes) -> jax.Array:
  """The noise root of a secret (bytes, at least 16 of them).

  A threefry2x32 key whose two 32-bit words are the first 8 bytes of
  SHA-256(secret): a pure function of the secret, so a resumed run that
  reads its secret back draws the same keys.

  Example:
    >>> root = key_from_secret(bytes(range(32)))
    >>> bool((jax.random.key_data(root)
    ...       == jax.random.key_data(key_from_secret(bytes(range(32))))).all())
    True
  """
  if len(secret) < 16:
    raise ValueError(f"a noise secret needs at least 16 bytes, got "
                     f"{len(secret)}.")
  words = np.frombuffer(hashlib.sha256(secret).digest()[:8], "<u4")
  return jax.random.wrap_key_data(words.astype(np.uint32),
                                  impl="threefry2x32")

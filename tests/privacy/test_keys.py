"""Tests for fedjax_seg.privacy.keys."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg.privacy import keys


def _data(key):
  return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_every_key_is_distinct_across_round_site_step_purpose():
  root = jax.random.key(1234)
  grid = itertools.product(range(6), range(8), range(5), list(keys.Purpose))
  seen = {}
  for r, s, t, p in grid:
    k = _data(keys.derive_key(root, round_index=r, site=s, step=t, purpose=p))
    assert k not in seen, f"key reused by {(r, s, t, p)} and {seen[k]}"
    seen[k] = (r, s, t, p)
  assert len(seen) == 6 * 8 * 5 * len(keys.Purpose)


def test_keys_never_equal_the_root_or_a_plain_split():
  root = jax.random.key(0)
  derived = {_data(keys.derive_key(root, round_index=r, site=0, step=0,
                                   purpose=keys.Purpose.GRADIENT_NOISE))
             for r in range(4)}
  assert _data(root) not in derived
  assert not derived & {_data(k) for k in jax.random.split(root, 8)}


def test_deterministic_and_root_dependent():
  args = dict(round_index=3, site=2, step=1, purpose=keys.Purpose.SAMPLE_BATCH)
  a = keys.derive_key(jax.random.key(7), **args)
  b = keys.derive_key(jax.random.key(7), **args)
  c = keys.derive_key(jax.random.key(8), **args)
  assert _data(a) == _data(b)
  assert _data(a) != _data(c)


def test_jit_and_vmap_over_sites_match_python_loop():
  root = jax.random.key(5)

  @jax.jit
  def all_sites(round_index, step):
    return jax.vmap(lambda s: keys.derive_key(
        root, round_index=round_index, site=s, step=step,
        purpose=keys.Purpose.GRADIENT_NOISE))(jnp.arange(8))

  batched = all_sites(jnp.int32(2), jnp.int32(3))
  for s in range(8):
    looped = keys.derive_key(root, round_index=2, site=s, step=3,
                             purpose=keys.Purpose.GRADIENT_NOISE)
    assert _data(batched[s]) == _data(looped)


def test_noise_from_neighbouring_keys_is_uncorrelated():
  root = jax.random.key(0)
  draws = [jax.random.normal(keys.derive_key(
      root, round_index=0, site=0, step=t,
      purpose=keys.Purpose.GRADIENT_NOISE), (20000,)) for t in range(2)]
  corr = float(jnp.corrcoef(draws[0], draws[1])[0, 1])
  assert abs(corr) < 4 / np.sqrt(20000)

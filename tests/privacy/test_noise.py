"""Tests for fedjax_seg.privacy.noise: the gaussian_noise optax transform."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_seg.privacy import clipping
from fedjax_seg.privacy import noise
from fedjax_seg.privacy import schedules


def _apply(tx, updates, key, state=None, **extra):
  state = tx.init(updates) if state is None else state
  return tx.update(updates, state, None, noise_key=key, **extra)


def test_zero_noise_gives_mean_of_clipped_gradients():
  loss = lambda w, ex: jnp.sum(w * ex)
  batch = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
  grad_sum, _ = clipping.clipped_grad(loss, l2_clip_norm=1.0)(
      jnp.zeros(2), batch, jnp.array([False, False, True]))
  tx = noise.gaussian_noise(0.0, l2_clip_norm=1.0, expected_batch_size=2)
  out, state = _apply(tx, grad_sum, jax.random.key(0))
  np.testing.assert_allclose(out, (np.array([0.6, 0.8]) + [0.3, 0.4]) / 2,
                             rtol=1e-6)
  assert float(state.noise_multiplier) == 0.0 and int(state.count) == 1


def test_no_clip_no_noise_recovers_plain_mean_gradient():
  key = jax.random.key(0)
  w = jax.random.normal(key, (4,))
  x = jax.random.normal(jax.random.fold_in(key, 1), (8, 4))
  loss = lambda w, ex: jnp.log1p(jnp.exp(-ex @ w))
  grad_sum, _ = clipping.clipped_grad(loss, l2_clip_norm=jnp.inf)(w, x)
  tx = noise.gaussian_noise(0.0, l2_clip_norm=jnp.inf, expected_batch_size=8)
  out, _ = _apply(tx, grad_sum, key)
  plain = jax.grad(lambda w: jnp.mean(jax.vmap(loss, (None, 0))(w, x)))(w)
  np.testing.assert_allclose(out, plain, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma,clip,batch", [(1.3, 0.7, 1.0), (0.5, 2.0, 4.0)])
def test_noise_std_passes_ks_test(sigma, clip, batch):
  tx = noise.gaussian_noise(sigma, l2_clip_norm=clip,
                            expected_batch_size=batch)
  zeros = {"a": jnp.zeros((50, 100)), "b": jnp.zeros((95000,))}
  out, state = _apply(tx, zeros, jax.random.key(42))
  sample = np.concatenate([np.ravel(v) for v in jax.tree.leaves(out)])
  std = sigma * clip / batch
  assert stats.kstest(sample, "norm", args=(0.0, std)).pvalue > 1e-3
  # The test has the power to see a 5% error in the std.
  assert stats.kstest(sample, "norm", args=(0.0, 1.05 * std)).pvalue < 1e-3
  assert stats.kstest(sample, "norm", args=(0.0, 0.95 * std)).pvalue < 1e-3
  assert float(state.noise_multiplier) == pytest.approx(sigma)
  assert float(state.l2_clip_norm) == pytest.approx(clip)


def test_keys_give_independent_noise_and_same_key_reproduces():
  tx = noise.gaussian_noise(1.0, l2_clip_norm=1.0, expected_batch_size=1)
  zeros = {"a": jnp.zeros((10000,)), "b": jnp.zeros((10000,))}
  a, _ = _apply(tx, zeros, jax.random.key(1))
  b, _ = _apply(tx, zeros, jax.random.key(2))
  a2, _ = _apply(tx, zeros, jax.random.key(1))
  chex.assert_trees_all_equal(a, a2)
  bound = 4 / np.sqrt(10000)
  assert abs(np.corrcoef(a["a"], b["a"])[0, 1]) < bound
  # Leaves of the same shape get different noise from one key.
  assert abs(np.corrcoef(a["a"], a["b"])[0, 1]) < bound


def test_schedules_are_followed_and_recorded_in_state():
  sigma = schedules.linear_schedule(2.0, 1.0, transition_steps=4)
  clip = schedules.step_schedule(1.0, {2: 0.5})
  tx = noise.gaussian_noise(sigma, l2_clip_norm=clip, expected_batch_size=10)
  state = tx.init(jnp.zeros(3))
  seen = []
  for t in range(5):
    _, state = tx.update(jnp.zeros(3), state, noise_key=jax.random.key(t))
    seen.append((float(state.noise_multiplier), float(state.l2_clip_norm)))
  np.testing.assert_allclose(
      seen, [(2.0, 1.0), (1.75, 1.0), (1.5, 0.5), (1.25, 0.5), (1.0, 0.5)])


def test_dynamic_clip_norm_comes_from_extra_arg():
  tx = noise.gaussian_noise(1.0, l2_clip_norm=None, expected_batch_size=1)
  out, state = _apply(tx, jnp.zeros(20000), jax.random.key(0),
                      l2_clip_norm=3.0)
  assert float(state.l2_clip_norm) == 3.0
  assert float(jnp.std(out)) == pytest.approx(3.0, rel=0.03)
  with pytest.raises(TypeError, match="l2_clip_norm"):
    _apply(tx, jnp.zeros(3), jax.random.key(0))


def test_missing_key_and_bad_values_are_refused():
  tx = noise.gaussian_noise(1.0, l2_clip_norm=1.0, expected_batch_size=1)
  with pytest.raises(TypeError, match="noise_key"):
    tx.update(jnp.zeros(3), tx.init(jnp.zeros(3)))
  with pytest.raises(ValueError, match="noise_multiplier"):
    noise.gaussian_noise(-1.0, l2_clip_norm=1.0, expected_batch_size=1)
  with pytest.raises(ValueError, match="expected_batch_size"):
    noise.gaussian_noise(1.0, l2_clip_norm=1.0, expected_batch_size=0)


def test_chain_with_adam_under_jit_and_noise_state_lookup():
  tx = optax.chain(
      noise.gaussian_noise(0.8, l2_clip_norm=1.0, expected_batch_size=4),
      optax.adam(1e-2))
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    grads = jax.tree.map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params, noise_key=key)
    return optax.apply_updates(params, updates), state

  for t in range(3):
    params, state = step(params, state, jax.random.key(t))
  found = noise.noise_state(state)
  assert int(found.count) == 3 and float(found.noise_multiplier) == \
      pytest.approx(0.8)
  chex.assert_tree_all_finite(params)


def test_inject_hyperparams_changes_sigma_at_run_time():
  tx = optax.inject_hyperparams(noise.gaussian_noise)(
      noise_multiplier=1.0, l2_clip_norm=1.0, expected_batch_size=1.0)
  state = tx.init(jnp.zeros(10000))
  state.hyperparams["noise_multiplier"] = jnp.asarray(0.25)
  out, state = tx.update(jnp.zeros(10000), state, noise_key=jax.random.key(0))
  assert float(noise.noise_state(state).noise_multiplier) == 0.25
  assert float(jnp.std(out)) == pytest.approx(0.25, rel=0.05)


def test_vmap_over_sites_and_over_schedules():
  sites = 4
  tx = noise.gaussian_noise(1.0, l2_clip_norm=0.5, expected_batch_size=2)
  grads = jnp.arange(sites * 3, dtype=jnp.float32).reshape(sites, 3)
  states = jax.vmap(tx.init)(grads)
  keys = jax.random.split(jax.random.key(0), sites)
  out, new_states = jax.jit(jax.vmap(
      lambda g, s, k: tx.update(g, s, noise_key=k)))(grads, states, keys)
  for i in range(sites):
    ref, _ = tx.update(grads[i], tx.init(grads[i]), noise_key=keys[i])
    np.testing.assert_allclose(out[i], ref, rtol=1e-6)
  np.testing.assert_array_equal(new_states.count, 1)

  # A sweep: one compiled program over S decay rates of an exponential schedule.
  def run(decay_rate):
    sched = schedules.exponential_decay(2.0, transition_steps=1,
                                        decay_rate=decay_rate)
    tx = noise.gaussian_noise(sched, l2_clip_norm=1.0, expected_batch_size=1)
    state = tx.init(jnp.zeros(()))
    for t in range(3):
      _, state = tx.update(jnp.zeros(()), state, noise_key=jax.random.key(t))
    return state.noise_multiplier

  rates = jnp.array([1.0, 0.5, 0.9])
  np.testing.assert_allclose(jax.jit(jax.vmap(run))(rates),
                             2.0 * rates ** 2, rtol=1e-6)


def test_bf16_updates_keep_their_dtype():
  tx = noise.gaussian_noise(1.0, l2_clip_norm=1.0, expected_batch_size=8)
  out, _ = _apply(tx, {"w": jnp.zeros((4,), jnp.bfloat16)}, jax.random.key(0))
  assert out["w"].dtype == jnp.bfloat16

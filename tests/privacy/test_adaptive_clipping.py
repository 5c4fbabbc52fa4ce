"""Tests for fedjax_seg.privacy.adaptive_clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import adaptive_clipping
from fedjax_seg.privacy import clipping
from fedjax_seg.privacy import keys
from fedjax_seg.privacy import noise


def _clipper(mode, **kwargs):
  args = dict(initial_l2_clip_norm=1.0, target_quantile=0.5,
              count_noise_multiplier=1.0, expected_batch_size=64, mode=mode,
              learning_rate=0.2 if mode == "geometric" else 1.0)
  args.update(kwargs)
  return adaptive_clipping.AdaptiveClipping(**args)


def _run(ac, norms, steps, seed=0):
  state = ac.init()
  real = jnp.ones(norms.shape, bool)
  update = jax.jit(ac.update)
  for t in range(steps):
    state = update(state, norms, real, jax.random.key(seed * 1000 + t))
  return state


@pytest.mark.parametrize("mode", adaptive_clipping.MODES)
def test_clip_moves_up_when_most_are_clipped_and_down_when_few(mode):
  ac = _clipper(mode)
  up = _run(ac, jnp.full((64,), 50.0), 1)
  down = _run(ac, jnp.full((64,), 0.01), 1)
  assert float(up.l2_clip_norm) > 1.0
  assert float(down.l2_clip_norm) < 1.0
  assert float(up.unclipped_fraction) < 0.3
  assert float(down.unclipped_fraction) > 0.7


@pytest.mark.parametrize("mode", adaptive_clipping.MODES)
def test_tracks_the_target_quantile(mode):
  norms = jnp.linspace(0.1, 10.0, 256)
  for quantile in (0.3, 0.8):
    ac = _clipper(mode, target_quantile=quantile, expected_batch_size=256)
    state = _run(ac, norms, 150 if mode == "geometric" else 3)
    true = float(jnp.quantile(norms, quantile))
    assert float(state.l2_clip_norm) == pytest.approx(true, rel=0.2)


def test_accounted_sigma_matches_the_paper_formula():
  # Andrew et al. 2021, Sec. 3: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
  for z, sigma_b in [(1.0, 3.2), (0.8, 5.0), (2.0, 10.0)]:
    ac = _clipper("geometric", count_noise_multiplier=sigma_b)
    z_delta = (z ** -2 - (2 * sigma_b) ** -2) ** -0.5
    assert ac.gradient_noise_multiplier(z) == pytest.approx(z_delta, rel=1e-12)
    assert ac.accounted_noise_multiplier(z_delta) == pytest.approx(z, rel=1e-12)
  # The histogram release has sensitivity 1, not 1/2.
  ac = _clipper("percentile", count_noise_multiplier=4.0)
  assert ac.count_mechanism_noise_multiplier == 4.0
  assert ac.gradient_noise_multiplier(1.0) == pytest.approx(
      (1.0 - 4.0 ** -2) ** -0.5)
  with pytest.raises(ValueError, match="raise count_noise_multiplier"):
    _clipper("geometric", count_noise_multiplier=0.4).gradient_noise_multiplier(
        1.0)


def test_pair_costs_what_a_single_gaussian_of_the_accounted_sigma_costs():
  ac = _clipper("geometric", count_noise_multiplier=3.0)
  z_grad = ac.gradient_noise_multiplier(1.1)
  ledger = accounting.PrivacyLedger(["pair", "single"], delta=1e-5)
  ledger.record("pair", ac.accounted_noise_multiplier(z_grad), 0.01, 1000)
  ledger.record("single", 1.1, 0.01, 1000)
  assert ledger.epsilon("pair") == pytest.approx(ledger.epsilon("single"),
                                                 rel=1e-9)


def test_unnoised_percentile_is_refused():
  for value in (0.0, -1.0):
    with pytest.raises(ValueError, match="leaks"):
      _clipper("percentile", count_noise_multiplier=value)


@pytest.mark.parametrize("mode", adaptive_clipping.MODES)
def test_padding_is_ignored_and_keys_matter(mode):
  ac = _clipper(mode)
  norms = jnp.linspace(0.5, 3.0, 8)
  key = jax.random.key(3)
  ref = ac.update(ac.init(), norms, jnp.ones(8, bool), key)
  padded = ac.update(ac.init(), jnp.concatenate([norms, jnp.zeros(8)]),
                     jnp.arange(16) < 8, key)
  np.testing.assert_allclose(padded.l2_clip_norm, ref.l2_clip_norm, rtol=1e-6)
  other = ac.update(ac.init(), norms, jnp.ones(8, bool), jax.random.key(4))
  assert float(other.unclipped_fraction) != float(ref.unclipped_fraction)


def test_vmap_over_sites():
  ac = _clipper("geometric")
  states = jax.vmap(lambda _: ac.init())(jnp.arange(3))
  norms = jnp.stack([jnp.full((64,), v) for v in (0.01, 1.0, 100.0)])
  keys_ = jax.random.split(jax.random.key(0), 3)
  out = jax.vmap(ac.update)(states, norms, jnp.ones((3, 64), bool), keys_)
  assert float(out.l2_clip_norm[0]) < float(out.l2_clip_norm[2])


def test_dp_sgd_with_adaptive_clipping_end_to_end():
  """clipped_grad(C_t) -> gaussian_noise(C_t) -> adam; the ledger gets z."""
  w_true = jnp.array([1.0, -2.0, 0.5])
  x = jax.random.normal(jax.random.key(0), (64, 3))
  y = x @ w_true
  loss = lambda w, ex: (ex[0] @ w - ex[1]) ** 2
  ac = _clipper("geometric", count_noise_multiplier=3.2, initial_l2_clip_norm=0.1,
                expected_batch_size=64)
  z_target = 1.0
  z_grad = ac.gradient_noise_multiplier(z_target)
  grad_fn = clipping.clipped_grad(loss, l2_clip_norm=1.0)
  tx = optax.chain(noise.gaussian_noise(z_grad, l2_clip_norm=None,
                                        expected_batch_size=64),
                   optax.adam(0.05))
  root = jax.random.key(7)

  @jax.jit
  def step(w, opt_state, clip_state, t):
    grad_sum, stats = grad_fn(w, (x, y), l2_clip_norm=clip_state.l2_clip_norm)
    updates, opt_state = tx.update(
        grad_sum, opt_state, w, l2_clip_norm=clip_state.l2_clip_norm,
        noise_key=keys.derive_key(root, round_index=0, site=0, step=t,
                                  purpose=keys.Purpose.GRADIENT_NOISE))
    clip_state = ac.update(
        clip_state, stats.per_example_norms, stats.is_real,
        keys.derive_key(root, round_index=0, site=0, step=t,
                        purpose=keys.Purpose.CLIP_COUNT_NOISE))
    return optax.apply_updates(w, updates), opt_state, clip_state

  w, opt_state, clip_state = jnp.zeros(3), tx.init(jnp.zeros(3)), ac.init()
  ledger = accounting.PrivacyLedger(["site"], delta=1e-5)
  clips = []
  for t in range(60):
    clips.append(float(clip_state.l2_clip_norm))
    w, opt_state, clip_state = step(w, opt_state, clip_state, t)
    applied = noise.noise_state(opt_state)
    assert float(applied.l2_clip_norm) == pytest.approx(clips[-1])
    ledger.record("site", ac.accounted_noise_multiplier(
        float(applied.noise_multiplier)), 1.0, 1)
  # Started far below the norms: C grew, then followed them down as the
  # residuals shrank.
  assert max(clips) > 5 * clips[0] and clips[-1] < max(clips)
  assert float(jnp.linalg.norm(w - w_true)) < 1.0
  single = accounting.PrivacyLedger(["site"], delta=1e-5)
  single.record("site", z_target, 1.0, 60)
  assert ledger.epsilon("site") == pytest.approx(single.epsilon("site"),
                                                 rel=1e-5)


@pytest.mark.parametrize("mode", ["geometric", "percentile"])
def test_noise_overhead_constructor(mode):
  """The count release raises the gradient noise by exactly the overhead at
  the given sigma, and by less at any smaller sigma."""
  ac = adaptive_clipping.AdaptiveClipping.with_noise_overhead(
      noise_multiplier=2.0, overhead=0.1, mode=mode, initial_l2_clip_norm=1.0,
      target_quantile=0.5, expected_batch_size=8)
  assert ac.mode == mode
  assert ac.gradient_noise_overhead(2.0) == pytest.approx(0.1, rel=1e-9)
  assert ac.gradient_noise_overhead(1.0) < 0.1
  z_grad = ac.gradient_noise_multiplier(2.0)
  assert ac.accounted_noise_multiplier(z_grad) == pytest.approx(2.0, rel=1e-9)
  with pytest.raises(ValueError, match="overhead"):
    adaptive_clipping.AdaptiveClipping.with_noise_overhead(
        noise_multiplier=2.0, overhead=0.0, initial_l2_clip_norm=1.0,
        target_quantile=0.5, expected_batch_size=8)

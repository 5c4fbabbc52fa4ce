"""Differential privacy for JAX training: clipping, noise, schedules, accounting.

Importable on its own into any JAX code: it depends on jax, optax, chex,
dp_accounting, jax_privacy, numpy and scipy only, never on the rest of
fedjax_seg (models, data, federated).

A DP-SGD step with these pieces (see README, "Using the privacy transforms in
your own JAX code"):

  grad_fn = clipped_grad(per_example_loss, l2_clip_norm=C)
  tx = optax.chain(gaussian_noise(sigma, l2_clip_norm=C,
                                  expected_batch_size=q * N), optax.adam(lr))
  grad_sum, stats = grad_fn(params, batch, is_padding)
  updates, opt_state = tx.update(grad_sum, opt_state, params,
                                 noise_key=derive_key(root, ...))
  ledger.record(site, sigma, q, steps=1)
"""

from fedjax_seg.privacy.accounting import PrivacyLedger
from fedjax_seg.privacy.events import event_from_dict
from fedjax_seg.privacy.events import event_to_dict
from fedjax_seg.privacy.events import grouped_composition
from fedjax_seg.privacy.events import poisson_gaussian_event
from fedjax_seg.privacy.events import truncation_probability
from fedjax_seg.privacy.adaptive_clipping import AdaptiveClipping
from fedjax_seg.privacy.adaptive_clipping import AdaptiveClipState
from fedjax_seg.privacy.calibration import calibrate_noise_multiplier
from fedjax_seg.privacy.calibration import calibrate_site_noise_multipliers
from fedjax_seg.privacy.calibration import schedule_event
from fedjax_seg.privacy.chunked import chunked_clipped_grad
from fedjax_seg.privacy.chunked import ChunkedClippedGrad
from fedjax_seg.privacy.clipping import ClippedGrad
from fedjax_seg.privacy.clipping import clipped_grad
from fedjax_seg.privacy.clipping import ClipStats
from fedjax_seg.privacy.correlated import correlated_noise
from fedjax_seg.privacy.correlated import CorrelatedNoiseState
from fedjax_seg.privacy.correlated import Strategy
from fedjax_seg.privacy.chunked import packed_group_clipped_grad
from fedjax_seg.privacy.chunked import PackedGroupClippedGrad
from fedjax_seg.privacy import layer_gradients
from fedjax_seg.privacy.keys import derive_key
from fedjax_seg.privacy.keys import key_from_secret
from fedjax_seg.privacy.keys import new_noise_secret
from fedjax_seg.privacy.keys import Purpose
from fedjax_seg.privacy.noise import gaussian_noise
from fedjax_seg.privacy.noise import GaussianNoiseState
from fedjax_seg.privacy.noise import noise_state
from fedjax_seg.privacy.schedules import constant_schedule
from fedjax_seg.privacy.schedules import cosine_decay_schedule
from fedjax_seg.privacy.schedules import exponential_decay
from fedjax_seg.privacy.schedules import linear_schedule
from fedjax_seg.privacy.schedules import per_round
from fedjax_seg.privacy.schedules import scaled
from fedjax_seg.privacy.schedules import step_schedule
from fedjax_seg.privacy.schedules import warmup_schedule
from fedjax_seg.privacy.units import PrivacyUnit

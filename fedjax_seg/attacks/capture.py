"""The update a site would send for a known batch, as the server sees it.

Three settings of one local step on B slices (the attacker's targets):

* "nodp": the mean gradient of the B slices' losses (a non-private site).
* "example": DP-SGD with per-slice clipping (`privacy.clipped_grad`,
  unit "example"): each slice's gradient clipped to L2 norm C, summed,
  N(0, (sigma C)^2) added to every coordinate, divided by B
  (`privacy.gaussian_noise`).
* "patient": patient-level DP: the B slices are one patient's contribution,
  their gradient (of the mean of their losses) clipped to C as ONE unit
  (`privacy.clipped_grad`, unit "group"), then the same noise. A patient's
  other slices would only share the same norm bound, so this setting is the
  most favourable to the attacker for a given patient.

These are the releases the engine's local step makes (`federated.client`),
with the batch fixed instead of Poisson-sampled: the attacker is given the
best case, a step that sampled exactly its targets.
"""

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fedjax_seg import privacy
from fedjax_seg.attacks import gradient_inversion

PyTree = Any
SETTINGS = ("nodp", "example", "patient")


@functools.lru_cache(maxsize=16)
def _jitted_clipped_sum(loss_fn, unit: str):
  """`(params, batch, C, slice_mask) -> clipped sum`, compiled once per
  (loss, unit); C is an argument (the engine's clip norm override)."""
  clip = privacy.clipped_grad(loss_fn, l2_clip_norm=1.0, unit=unit)

  @jax.jit
  def run(params, batch, l2_clip_norm, slice_mask):
    kwargs = {} if slice_mask is None else {"slice_mask": slice_mask}
    return clip(params, batch, l2_clip_norm=l2_clip_norm, **kwargs)[0]

  return run


def capture_update(loss_fn: Callable[[PyTree, dict], jax.Array],
                   params: PyTree, images: jax.Array, labels: jax.Array,
                   setting: str, *, l2_clip_norm: float = 1.0,
                   noise_multiplier: float = 0.0,
                   noise_key: jax.Array | None = None) -> PyTree:
  """The released update (a gradient pytree like `params`) of one step.

  Args:
    loss_fn: per-slice training loss `(params, {"image", "label"}) -> []`.
    params: the model parameters of the step.
    images: [B, H, W, C] the batch.
    labels: [B, H, W] int masks.
    setting: one of `SETTINGS`.
    l2_clip_norm: C (DP settings).
    noise_multiplier: sigma (DP settings): noise std sigma * C on the sum.
    noise_key: key of the noise draw (DP settings; derive it with
      `privacy.derive_key`, never a training key).

  Returns:
    The update: the mean gradient ("nodp"), or (clipped sum + noise) / B.
  """
  if setting not in SETTINGS:
    raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}.")
  images = jnp.asarray(images, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  if setting == "nodp":
    return gradient_inversion.mean_gradient(loss_fn, params, images, labels)
  if noise_key is None:
    raise ValueError("a DP setting needs noise_key.")
  if not l2_clip_norm > 0 or not noise_multiplier >= 0:
    raise ValueError(f"need l2_clip_norm > 0 and noise_multiplier >= 0, got "
                     f"{l2_clip_norm}, {noise_multiplier}.")
  batch = images.shape[0]
  clip_norm = jnp.float32(l2_clip_norm)
  if setting == "example":
    clipped = _jitted_clipped_sum(loss_fn, "example")(
        params, {"image": images, "label": labels}, clip_norm, None)
  else:
    clipped = _jitted_clipped_sum(loss_fn, "group")(
        params, {"image": images[None], "label": labels[None]}, clip_norm,
        jnp.ones((1, batch), bool))
  noise = privacy.gaussian_noise(noise_multiplier, l2_clip_norm=l2_clip_norm,
                                 expected_batch_size=batch)
  released, _ = noise.update(clipped, noise.init(clipped),
                             noise_key=noise_key)
  return released

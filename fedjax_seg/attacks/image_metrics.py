"""MSE, PSNR and SSIM of reconstructions against true images.

SSIM and PSNR are dm_pix's (DeepMind's maintained JAX image library;
`dm_pix.ssim` is Wang et al. 2004 with an 11x11 Gaussian window of sigma
1.5, K1 = 0.01, K2 = 0.03). For a batch of B > 1 reconstructions, each is
matched to one true image (a one-to-one assignment maximising the summed
SSIM, `scipy.optimize.linear_sum_assignment`): the attacker does not know
which reconstruction is which image.
"""

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """[...] mean squared error over the last three axes [H, W, C]."""
  return jnp.mean((jnp.asarray(a, jnp.float32)
                   - jnp.asarray(b, jnp.float32)) ** 2, axis=(-3, -2, -1))


def psnr(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
  """[...] peak signal-to-noise ratio in dB (images [..., H, W, C])."""
  return dm_pix.psnr(jnp.asarray(a, jnp.float32) / max_val,
                     jnp.asarray(b, jnp.float32) / max_val)


def ssim(a: jax.Array, b: jax.Array, max_val: float = 1.0) -> jax.Array:
  """[...] structural similarity (images [..., H, W, C]; 1 = identical)."""
  return dm_pix.ssim(jnp.asarray(a, jnp.float32),
                     jnp.asarray(b, jnp.float32), max_val=max_val)


def matched_metrics(reconstructions: jax.Array, targets: jax.Array,
                    max_val: float = 1.0) -> dict[str, np.ndarray]:
  """Per true image: {"ssim", "psnr", "mse", "match"} ([B] each) of the
  reconstruction matched to it (images [B, H, W, C]); `match[b]` is the
  index of that reconstruction."""
  rec = jnp.asarray(reconstructions, jnp.float32)
  tgt = jnp.asarray(targets, jnp.float32)
  b = tgt.shape[0]
  # [targets, reconstructions] SSIM of every pair.
  pairs = ssim(jnp.repeat(tgt, rec.shape[0], axis=0),
               jnp.tile(rec, (b, 1, 1, 1)), max_val).reshape(b, -1)
  rows, cols = optimize.linear_sum_assignment(-np.asarray(pairs))
  match = np.zeros(b, np.int64)
  match[rows] = cols
  chosen = rec[match]
  return {"ssim": np.asarray(ssim(tgt, chosen, max_val), np.float64),
          "psnr": np.asarray(psnr(tgt, chosen, max_val), np.float64),
          "mse": np.asarray(mse(tgt, chosen), np.float64),
          "match": match}

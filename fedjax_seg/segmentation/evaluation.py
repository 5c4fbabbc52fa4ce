"""Segmentation metrics of a model on sites' held-out slices: one evaluation.

`evaluate` scores one split of every site in memory (Dice, IoU and optionally
HD95 per site and class, Dice per modality); `evaluate_in_blocks` does the
same over a sample of a consortium too large to hold, a block of sites at a
time. The run's validation and test passes, prediction's scoring and the
domain-shift experiment all go through these.
"""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import metrics
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.models import unet

# Sites per block when evaluating a consortium sample (render, evaluate,
# drop): bounds the host memory of a test pass over many sites.
EVAL_BLOCK = 64


# Pixels (voxels) per evaluation batch on CPU: XLA's CPU convolutions run
# fastest per slice when a batch's activations stay small. Measured per
# slice, tiny U-Net, 2 cores: 64x64 in batches of 8 took 6.0 ms against
# 10.5 ms in batches of 64; 128x128 in batches of 2 took 24 ms against
# 34 ms; 32x32 was the same from 16 to 64.
CPU_EVAL_PIXELS = 32768
EVAL_BATCH_MAX = 64


def evaluation_batch_size(spatial_shape) -> int:
  """Slices (or volumes) per evaluation batch for images of `spatial_shape`:
  about CPU_EVAL_PIXELS pixels on CPU, EVAL_BATCH_MAX on accelerators."""
  if jax.default_backend() != "cpu":
    return EVAL_BATCH_MAX
  pixels = int(np.prod(spatial_shape))
  return max(1, min(EVAL_BATCH_MAX, CPU_EVAL_PIXELS // pixels))


def evaluate(model: unet.SegmentationModel, params,
             data: sites_lib.SiteArrays, batch_size: int | None = None,
             with_hd95: bool = False) -> dict:
  """Dice / IoU (and optionally HD95) of a model on every site's slices.

  Args:
    model: the model.
    params: params, or a callable `site index -> params` (e.g. FedBN, where
      each site has its own normalisation parameters).
    data: one split of every site.
    batch_size: evaluation chunk (padded, so one compilation); None:
      `evaluation_batch_size` for the image shape.
    with_hd95: also compute HD95 per site and foreground class (host side).

  Returns:
    {"dice_per_site": [S, K], "iou_per_site": [S, K],
     "dice_per_modality": [num_modalities, K], "per_example_dice": [S, M, K],
     and "hd95_per_site": [S, K-1] if requested} as numpy arrays (NaN for a
    site or modality without slices).
  """
  params_of = params if callable(params) else (lambda _: params)
  if batch_size is None:
    batch_size = evaluation_batch_size(data.image.shape[2:-1])
  @jax.jit
  def apply(p, x, y):
    logits = model.apply(p, x)
    return metrics.per_example_scores(logits, y), jnp.argmax(logits, -1)

  num_sites, m = data.mask.shape
  k = len(data.class_names)
  dice = np.zeros((num_sites, m, k), np.float32)
  iou = np.zeros((num_sites, m, k), np.float32)
  hd95 = np.full((num_sites, k - 1), np.nan)
  for s in range(num_sites):
    n = int(data.num_examples[s])
    site_params = params_of(s)
    site_hd95 = []
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      # Pad the chunk to a fixed size: one compilation for all chunks.
      x = np.zeros((batch_size,) + data.image.shape[2:], np.float32)
      y = np.zeros((batch_size,) + data.label.shape[2:], np.int32)
      x[:stop - start] = data.image[s, start:stop]
      y[:stop - start] = data.label[s, start:stop]
      scores, pred = apply(site_params, x, y)
      dice[s, start:stop] = np.asarray(scores["dice"])[:stop - start]
      iou[s, start:stop] = np.asarray(scores["iou"])[:stop - start]
      if with_hd95:
        pred = np.asarray(pred)
        site_hd95 += [metrics.hd95_per_class(pred[i], y[i], k)
                      for i in range(stop - start)]
    if site_hd95:
      hd95[s] = np.mean(site_hd95, axis=0)
  mask = jnp.asarray(data.mask)
  extra = {"hd95_per_site": hd95} if with_hd95 else {}
  return {**extra,
      "dice_per_site": np.asarray(metrics.per_site(jnp.asarray(dice), mask)),
      "iou_per_site": np.asarray(metrics.per_site(jnp.asarray(iou), mask)),
      "dice_per_modality": np.asarray(metrics.per_modality(
          jnp.asarray(dice), mask, data.site_modality_index,
          len(data.modality_names))),
      "per_example_dice": dice,
  }


def evaluate_in_blocks(model, params_of, site_arrays, site_ids,
                       with_hd95: bool = False) -> dict:
  """`evaluate` over the sites `site_ids`, a block of EVAL_BLOCK sites at a
  time (`site_arrays(block ids)` makes a block's arrays, which are dropped
  after), with the same result keys; `params_of` maps a site id to params
  (or is the params). "dice_per_modality" is the mean over all the
  sample's slices of each modality, as one evaluation of every site gives.
  For consortia too large to hold: only a block is in memory."""
  site_ids = np.asarray(site_ids)
  if not callable(params_of):
    shared = params_of
    params_of = lambda _: shared
  parts = []
  for start in range(0, len(site_ids), EVAL_BLOCK):
    block = site_ids[start:start + EVAL_BLOCK]
    arrays = site_arrays(block)
    parts.append((arrays, evaluate(
        model, lambda k, block=block: params_of(int(block[k])), arrays,
        with_hd95=with_hd95)))
  result = {key: np.concatenate([r[key] for _, r in parts])
            for key in ("dice_per_site", "iou_per_site")
            + (("hd95_per_site",) if with_hd95 else ())}
  modalities = parts[0][0].modality_names
  k = result["dice_per_site"].shape[-1]
  sums = np.zeros((len(modalities), k))
  counts = np.zeros(len(modalities))
  for arrays, r in parts:
    for s, m in enumerate(arrays.site_modality_index):
      real = arrays.mask[s]
      sums[m] += r["per_example_dice"][s][real].sum(axis=0)
      counts[m] += real.sum()
  with np.errstate(invalid="ignore", divide="ignore"):
    result["dice_per_modality"] = np.where(counts[:, None] > 0,
                                           sums / counts[:, None], np.nan)
  return result

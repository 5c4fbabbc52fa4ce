"""Non-private centralised training and per-site evaluation.

The reference every federated / private result is compared with: all
training slices pooled in one place, plain Adam on the Dice + CE loss. Also
the evaluation used everywhere: the global model on every site's slices,
Dice / IoU per site and per modality (padding masked out).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg import metrics
from fedjax_seg.data import dataset as dataset_lib
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.models import losses
from fedjax_seg.models import unet


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Centralised training settings.

  Attributes:
    steps: optimizer steps.
    batch_size: slices per step (sampled uniformly with replacement).
    learning_rate: Adam learning rate.
    seed: seed of initialisation and batch sampling.
  """

  steps: int = 300
  batch_size: int = 32
  learning_rate: float = 3e-3
  seed: int = 0


def train(model: unet.SegmentationModel, data: dataset_lib.SliceDataset,
          config: TrainConfig, params=None):
  """Trains on all slices of `data`; returns (params, [loss per step])."""
  if data.num_examples == 0:
    raise ValueError("no training slices.")
  key = jax.random.key(config.seed)
  if params is None:
    params = model.init(key, (1,) + data.image.shape[1:])
  tx = optax.adam(config.learning_rate)
  opt_state = tx.init(params)
  images, labels = jnp.asarray(data.image), jnp.asarray(data.label)

  @jax.jit
  def step(params, opt_state, step_key):
    idx = jax.random.randint(step_key, (config.batch_size,), 0,
                             images.shape[0])

    def loss_fn(p):
      logits = model.apply(p, images[idx])
      return jnp.mean(losses.batch_dice_ce_loss(logits, labels[idx]))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  history = []
  for t in range(config.steps):
    params, opt_state, loss = step(params, opt_state,
                                   jax.random.fold_in(key, t))
    history.append(loss)
  return params, [float(v) for v in history]


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

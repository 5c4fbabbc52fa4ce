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


def evaluate(model: unet.SegmentationModel, params,
             data: sites_lib.SiteArrays, batch_size: int = 64) -> dict:
  """Dice / IoU of `params` on every site's real slices.

  Returns:
    {"dice_per_site": [S, K], "iou_per_site": [S, K],
     "dice_per_modality": [num_modalities, K], "per_example_dice": [S, M, K]}
    as numpy arrays (NaN for a site or modality without slices).
  """
  apply = jax.jit(lambda p, x, y: metrics.per_example_scores(
      model.apply(p, x), y))
  num_sites, m = data.mask.shape
  k = len(data.class_names)
  dice = np.zeros((num_sites, m, k), np.float32)
  iou = np.zeros((num_sites, m, k), np.float32)
  for s in range(num_sites):
    n = int(data.num_examples[s])
    for start in range(0, n, batch_size):
      stop = min(start + batch_size, n)
      # Pad the chunk to a fixed size: one compilation for all chunks.
      x = np.zeros((batch_size,) + data.image.shape[2:], np.float32)
      y = np.zeros((batch_size,) + data.label.shape[2:], np.int32)
      x[:stop - start] = data.image[s, start:stop]
      y[:stop - start] = data.label[s, start:stop]
      scores = apply(params, x, y)
      dice[s, start:stop] = np.asarray(scores["dice"])[:stop - start]
      iou[s, start:stop] = np.asarray(scores["iou"])[:stop - start]
  mask = jnp.asarray(data.mask)
  return {
      "dice_per_site": np.asarray(metrics.per_site(jnp.asarray(dice), mask)),
      "iou_per_site": np.asarray(metrics.per_site(jnp.asarray(iou), mask)),
      "dice_per_modality": np.asarray(metrics.per_modality(
          jnp.asarray(dice), mask, data.site_modality_index,
          len(data.modality_names))),
      "per_example_dice": dice,
  }

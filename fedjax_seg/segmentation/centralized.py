"""Non-private centralised training.

The reference every federated / private result is compared with: all
training slices pooled in one place, plain Adam on the Dice + CE loss
(`segmentation.evaluation` scores it).
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_seg.data import dataset as dataset_lib
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

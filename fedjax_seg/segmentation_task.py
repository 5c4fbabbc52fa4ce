"""Glue between segmentation (data, models) and the image-agnostic federated
engine: the per-example loss and the conversion of site arrays."""

import jax.numpy as jnp

from fedjax_seg.data import sites as sites_lib
from fedjax_seg.federated import client as client_lib
from fedjax_seg.models import losses
from fedjax_seg.models import unet
from fedjax_seg.privacy import layer_gradients


def logits_loss(class_weights=None):
  """`(logits [H, W, K], example) -> scalar` Dice + CE loss of ONE slice."""

  def loss(logits, example):
    label = example["label"]
    if not jnp.issubdtype(label.dtype, jnp.floating):
      label = label.astype(jnp.int32)
    return losses.dice_ce_loss(logits, label, class_weights=class_weights)

  return loss


def example_loss(model: unet.SegmentationModel, class_weights=None):
  """`(params, example) -> scalar` Dice + CE loss of ONE slice.

  `example` is {"image": [H, W, C], "label": [H, W]} (no batch axis; a
  float label [H, W, K] is read as class probabilities); the model is
  applied to a batch of one, which is exact for our per-example U-Nets.
  The returned function carries `per_example_value_and_grad`: the same
  per-example losses and gradients from the layers' inputs and output
  gradients (`privacy.layer_gradients`), for `--per_example_grads=layers`,
  and `ghost_clipped_grad`, for `--per_example_grads=ghost`.
  """
  from_logits = logits_loss(class_weights)

  def loss_fn(params, example):
    return from_logits(model.apply(params, example["image"][None])[0],
                       example)

  apply_with_tape = lambda params, x, tape: model.apply(params, x, tape=tape)
  loss_fn.per_example_value_and_grad = (
      layer_gradients.per_example_value_and_grad(apply_with_tape,
                                                 from_logits))
  # `(trainable_mask) -> clipped sum of a batch` by ghost norms where
  # cheaper, for --per_example_grads=ghost.
  loss_fn.ghost_clipped_grad = lambda trainable_mask=None: (
      layer_gradients.ghost_clipped_grad(apply_with_tape, from_logits,
                                         trainable_mask=trainable_mask))
  return loss_fn


def site_data(arrays: sites_lib.SiteArrays) -> client_lib.SiteData:
  """`SiteArrays` (one split) as the federated engine's `SiteData`."""
  return client_lib.SiteData(
      examples={"image": arrays.image, "label": arrays.label},
      num_examples=arrays.num_examples,
      groups=arrays.groups,
      group_mask=arrays.group_mask,
      num_groups=arrays.num_patients)

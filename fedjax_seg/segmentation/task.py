"""Segmentation as a task for the image-agnostic federated engine.

`task(model, ...)` is the `federated.Task` of a U-Net: the Dice + CE loss of
one slice, per-example gradients from the layers' inputs and output
gradients (`privacy.layer_gradients`, for --per_example_grads=layers and
ghost), and augmentation (multiplicity K: a unit's loss is the mean over K
augmented copies, with fresh keys per unit and step as the batch
transform). `site_data` converts a split's site arrays to the engine's
`SiteData`.
"""

import jax.numpy as jnp

from fedjax_seg.data import augment as augment_lib
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.federated import client as client_lib
from fedjax_seg.federated import task as task_lib
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
  """
  from_logits = logits_loss(class_weights)

  def loss_fn(params, example):
    return from_logits(model.apply(params, example["image"][None])[0],
                       example)

  return loss_fn


def task(model: unet.SegmentationModel, *, augmult: int = 0,
         augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig(),
         augment_per_site=None, class_weights=None) -> task_lib.Task:
  """The engine's task for `model` on slices (or volumes).

  Args:
    model: the U-Net.
    augmult: augmentation multiplicity K (De et al. 2022): each unit's loss
      is the mean over K augmented copies of its slices
      (`augment.multiplicity_loss`), so its gradient is averaged over the
      copies before it is clipped; 0 = no augmentation. Free in privacy:
      still one clipped contribution per unit.
    augment: the augmentations drawn for each copy.
    augment_per_site: optional [sites][len(AUGMENTATIONS)] bools: which of
      `augment`'s transforms each site's examples get (e.g. by modality;
      `augment.ops_table`); None: all of them everywhere.
    class_weights: optional per-class CE weights.

  Returns:
    A `federated.Task`. Its per-example gradient paths (layers, ghost) come
    from the plain loss, so they are offered only without augmentation
    multiplicity (which averages a unit's copies inside its loss).
  """
  if augmult < 0:
    raise ValueError(f"augmult must be >= 0, got {augmult}.")
  from_logits = logits_loss(class_weights)
  loss = example_loss(model, class_weights)
  if augmult:
    table = None if augment_per_site is None else jnp.asarray(
        augment_per_site)

    def fresh_keys(examples, key, site_index):
      enabled = None if table is None else table[site_index]
      return augment_lib.with_augment_keys(examples, key, enabled)

    return task_lib.Task(
        loss=augment_lib.multiplicity_loss(loss, augmult, augment),
        batch_transform=fresh_keys)
  apply_with_tape = lambda params, x, tape: model.apply(params, x, tape=tape)
  return task_lib.Task(
      loss=loss,
      per_example_value_and_grad=layer_gradients.per_example_value_and_grad(
          apply_with_tape, from_logits),
      # `(trainable_mask) -> clipped sum of a batch` by ghost norms where
      # cheaper, for --per_example_grads=ghost.
      ghost_clipped_grad=lambda trainable_mask=None: (
          layer_gradients.ghost_clipped_grad(apply_with_tape, from_logits,
                                             trainable_mask=trainable_mask)))


def site_data(arrays: sites_lib.SiteArrays) -> client_lib.SiteData:
  """`SiteArrays` (one split) as the federated engine's `SiteData`."""
  return client_lib.SiteData(
      examples={"image": arrays.image, "label": arrays.label},
      num_examples=arrays.num_examples,
      groups=arrays.groups,
      group_mask=arrays.group_mask,
      num_groups=arrays.num_patients)

"""Gradient inversion ("Inverting Gradients", Geiping et al. 2020).

Given the model parameters and an update exactly as the server sees it (a
site's gradient at batch size B, noised or not, or its local update delta,
read as the negative gradient direction of a one-step approximation), find
images whose gradient points the same way:

  minimise over x:  1 - cos(grad_params L(x, y), g_observed)  +  tv * TV(x)

with the cosine over all parameters concatenated, L the training loss (the
mean over the B dummy images of the per-example loss), y the segmentation
masks (known to the attacker by default, the strongest attacker; with
`optimize_mask` they are soft class maps optimised too) and TV the mean
absolute difference of neighbouring pixels. As in the reference recipe
(the `breaching` library's invertinggradients configuration): Adam on the
sign of the image gradient (`optax.scale_by_sign` then `optax.adam`), the
step divided by 10 at 3/8, 5/8 and 7/8 of the iterations, images projected
onto the data range after every step, several random-normal restarts
(vmapped) of which the one with the lowest objective is kept. Everything
runs in one jitted program.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
import optax

PyTree = Any


@dataclasses.dataclass(frozen=True)
class InversionConfig:
  """Attack settings.

  Attributes:
    iterations: optimisation steps per restart.
    learning_rate: Adam step on the signed image gradient (data units).
    tv_weight: weight of the total-variation prior.
    restarts: independent random starts (vmapped); the best is kept.
    optimize_mask: optimise the masks too (soft class maps), instead of
      giving the attacker the true masks.
    data_range: (low, high) box the images are projected onto.
  """

  iterations: int = 2000
  learning_rate: float = 0.1
  tv_weight: float = 0.2
  restarts: int = 4
  optimize_mask: bool = False
  data_range: tuple[float, float] = (0.0, 1.0)

  def __post_init__(self):
    if self.iterations < 1 or self.restarts < 1:
      raise ValueError("iterations and restarts must be >= 1.")
    if not self.learning_rate > 0 or self.tv_weight < 0:
      raise ValueError("learning_rate must be > 0 and tv_weight >= 0.")
    if not self.data_range[0] < self.data_range[1]:
      raise ValueError(f"data_range must be (low, high) with low < high, got "
                       f"{self.data_range}.")


class InversionResult(NamedTuple):
  """The best restart's reconstruction.

  Attributes:
    images: [B, H, W, C] reconstructed images.
    masks: [B, H, W] int masks (the given ones, or the argmax of the
      optimised soft masks).
    objective: [] its final objective (1 - cosine + tv * TV).
    cosine: [] cosine similarity of its gradient to the observed one.
    restart_objectives: [restarts] final objective of every restart.
  """

  images: jax.Array
  masks: jax.Array
  objective: jax.Array
  cosine: jax.Array
  restart_objectives: jax.Array


def total_variation(images: jax.Array) -> jax.Array:
  """Mean absolute difference of vertically and horizontally adjacent
  pixels of images [B, H, W, C]."""
  dy = jnp.mean(jnp.abs(images[:, 1:] - images[:, :-1]))
  dx = jnp.mean(jnp.abs(images[:, :, 1:] - images[:, :, :-1]))
  return dx + dy


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b) + 1e-12)


@functools.partial(jax.jit, static_argnums=0)
def mean_gradient(loss_fn: Callable[[PyTree, dict], jax.Array],
                  params: PyTree, images: jax.Array,
                  labels: jax.Array) -> PyTree:
  """Gradient (like params) of the mean per-example loss over a batch (what
  a non-private site reports at batch size B, one local step)."""
  def batch_loss(p):
    return jnp.mean(jax.vmap(lambda x, y: loss_fn(p, {
        "image": x, "label": y}))(images, labels))
  return jax.grad(batch_loss)(params)


@functools.partial(jax.jit, static_argnums=0)
def gradient_of(loss_fn: Callable[[PyTree, dict], jax.Array], params: PyTree,
                images: jax.Array, labels: jax.Array) -> jax.Array:
  """`mean_gradient`, flattened."""
  return flatten_util.ravel_pytree(
      mean_gradient(loss_fn, params, images, labels))[0]


def invert_gradients(loss_fn: Callable[[PyTree, dict], jax.Array],
                     params: PyTree, observed: PyTree, masks: jax.Array,
                     image_shape: tuple[int, int, int], key: jax.Array,
                     config: InversionConfig = InversionConfig(), *,
                     num_classes: int | None = None,
                     observed_is_delta: bool = False) -> InversionResult:
  """Reconstructs the B images behind an observed update.

  Args:
    loss_fn: the per-example training loss `(params, {"image": [H, W, C],
      "label": [H, W] int or [H, W, K] float}) -> scalar`.
    params: the model parameters the update was computed at.
    observed: the update as the server sees it (a params pytree): a
      gradient, or with `observed_is_delta` a local update (params after -
      before), whose negative is the attacked direction.
    masks: [B, H, W] int true masks (used unless `optimize_mask`; their
      count gives B).
    image_shape: (H, W, C) of one image.
    key: the attack's PRNG key (restart initialisations).
    config: attack settings.
    num_classes: K (needed with `optimize_mask`).
    observed_is_delta: read `observed` as a local update delta.

  Returns:
    An `InversionResult`.
  """
  target = flatten_util.ravel_pytree(observed)[0].astype(jnp.float32)
  if observed_is_delta:
    target = -target
  if config.optimize_mask and num_classes is None:
    raise ValueError("optimize_mask needs num_classes.")
  run = _compiled_attack(loss_fn, config, tuple(image_shape),
                         int(masks.shape[0]), num_classes)
  return run(params, target, jnp.asarray(masks), key)


@functools.lru_cache(maxsize=16)
def _compiled_attack(loss_fn, config: InversionConfig, image_shape: tuple,
                     batch: int, num_classes: int | None):
  """The jitted attack `(params, target, masks, key) -> InversionResult`,
  one per setting (attacking several updates compiles once)."""
  low, high = config.data_range

  def objective(variables, params, target, masks):
    images, mask_logits = variables
    labels = (jax.nn.softmax(mask_logits, axis=-1) if config.optimize_mask
              else masks)
    grad = gradient_of(loss_fn, params, images, labels)
    cosine = _cosine(grad, target)
    return 1.0 - cosine + config.tv_weight * total_variation(images), cosine

  n = config.iterations
  schedule = optax.piecewise_constant_schedule(
      config.learning_rate, {int(n * 3 / 8): 0.1, int(n * 5 / 8): 0.1,
                             int(n * 7 / 8): 0.1})
  optimizer = optax.chain(optax.scale_by_sign(), optax.adam(schedule))
  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def one_restart(restart_key, params, target, masks):
    image_key, mask_key = jax.random.split(restart_key)
    images = jnp.clip(jax.random.normal(image_key, (batch,) + image_shape)
                      * (high - low) / 4 + (low + high) / 2, low, high)
    mask_shape = (batch,) + image_shape[:2] + (num_classes or 1,)
    mask_logits = (jax.random.normal(mask_key, mask_shape)
                   if config.optimize_mask else jnp.zeros(mask_shape))
    variables = (images, mask_logits)
    state = optimizer.init(variables)

    def step(carry, _):
      variables, state = carry
      _, grads = grad_fn(variables, params, target, masks)
      updates, state = optimizer.update(grads, state, variables)
      images, mask_logits = optax.apply_updates(variables, updates)
      return ((jnp.clip(images, low, high), mask_logits), state), None

    (variables, _), _ = jax.lax.scan(step, (variables, state), None,
                                     length=n)
    value, cosine = objective(variables, params, target, masks)
    return variables, value, cosine

  @jax.jit
  def run(params, target, masks, key):
    keys = jax.random.split(key, config.restarts)
    (images, mask_logits), values, cosines = jax.vmap(
        one_restart, in_axes=(0, None, None, None))(keys, params, target,
                                                    masks)
    best = jnp.argmin(values)
    best_masks = (jnp.argmax(mask_logits[best], axis=-1)
                  if config.optimize_mask else masks)
    return InversionResult(images[best], best_masks, values[best],
                           cosines[best], values)

  return run

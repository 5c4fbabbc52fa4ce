"""One site's local training: DP-SGD steps under `lax.scan` (or unrolled).

`make_client_update` returns a pure function

  client_update(global_params, site_state, site_data, site_config,
                round_index, site_index, root_key)
      -> ClientOutput(delta, site_state, metrics)

for ONE site; the round backends vmap / map / shard / loop it over sites.
Each local step: Poisson-sample a fixed-shape padded batch -> per-example
(or per-patient) clipped gradient sum -> `gaussian_noise` (sigma and C read
back from its state for the accountant) -> FedProx term -> local optimizer.
Every key is `derive_key(root, round, site, step, purpose)`.

This module knows nothing about images: the loss is any per-example loss
`loss_fn(params, example) -> scalar`, `example` being one entry of the
site's `examples` pytree.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedjax_seg import privacy
from fedjax_seg.federated import sampling
from fedjax_seg.privacy import keys as keys_lib

PyTree = chex.ArrayTree
UNITS = ("example", "patient")
LOCAL_OPTIMIZERS = ("sgd", "momentum", "adam")
LOCAL_LOOPS = ("auto", "scan", "unroll")


def resolve_local_loop(local_loop: str) -> str:
  if local_loop == "auto":
    return "unroll" if jax.default_backend() == "cpu" else "scan"
  return local_loop


class SiteData(NamedTuple):
  """One split of every site's data, stacked over sites (leading axis S).

  Attributes:
    examples: pytree, each leaf [S, M, ...] (padded beyond N_k).
    num_examples: [S] int32, N_k.
    groups: [S, P, L] int32 positions (in M) of each patient's slices.
    group_mask: [S, P, L] bool.
    num_groups: [S] int32, patients per site.
  """

  examples: PyTree
  num_examples: jax.Array
  groups: jax.Array
  group_mask: jax.Array
  num_groups: jax.Array


@dataclasses.dataclass(frozen=True)
class LocalDPConfig:
  """Record-level DP-SGD inside every site (privacy settings).

  Attributes:
    enabled: False trains without clipping or noise (a non-private baseline;
      gradients are then averaged over the realised batch).
    unit: "example" (one slice) or "patient" (all of a patient's slices,
      clipped as one group).
    l2_clip_norm: C (initial C with adaptive clipping).
    adaptive_clipping: optional `privacy.AdaptiveClipping`, per site.
  """

  enabled: bool = True
  unit: str = "example"
  l2_clip_norm: float = 1.0
  adaptive_clipping: privacy.AdaptiveClipping | None = None

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}.")
    if not self.l2_clip_norm > 0:
      raise ValueError(f"l2_clip_norm must be > 0, got {self.l2_clip_norm}.")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Local training (learning settings; `microbatch_size` is performance only).

  Attributes:
    local_steps: DP-SGD steps per round.
    expected_batch_size: B, the public expected number of units per step.
    max_batch_size: static B_max of the padded batch (see
      `sampling.max_batch_size_for`).
    learning_rate: local learning rate.
    optimizer: "sgd", "momentum" or "adam" (state reset every round).
    prox_mu: FedProx proximal weight (0 = FedAvg).
    microbatch_size: per-example gradients in chunks of this many units
      (performance only).
    local_loop: how local steps are iterated (performance only): "scan"
      (`lax.scan`, one compiled step), "unroll" (a static Python loop, compile
      time grows with local_steps), or "auto": "unroll" on CPU, where XLA runs
      gradient convolutions inside a loop body about 15x slower (measured:
      0.86 s vs 0.053 s per step of the tiny U-Net, jax 0.10.2), else "scan".
  """

  local_steps: int = 1
  expected_batch_size: int = 8
  max_batch_size: int = 16
  learning_rate: float = 0.1
  optimizer: str = "sgd"
  prox_mu: float = 0.0
  microbatch_size: int | None = None
  local_loop: str = "auto"

  def __post_init__(self):
    if self.local_loop not in LOCAL_LOOPS:
      raise ValueError(f"local_loop must be one of {LOCAL_LOOPS}, got "
                       f"{self.local_loop!r}.")
    if self.local_steps < 1:
      raise ValueError(f"local_steps must be >= 1, got {self.local_steps}.")
    if not 0 < self.expected_batch_size <= self.max_batch_size:
      raise ValueError("need 0 < expected_batch_size <= max_batch_size, got "
                       f"{self.expected_batch_size}, {self.max_batch_size}.")
    if self.optimizer not in LOCAL_OPTIMIZERS:
      raise ValueError(f"optimizer must be one of {LOCAL_OPTIMIZERS}, got "
                       f"{self.optimizer!r}.")
    if self.prox_mu < 0:
      raise ValueError(f"prox_mu must be >= 0, got {self.prox_mu}.")


class SiteConfig(NamedTuple):
  """Per-site, per-round values (arrays, so changing them never recompiles).

  Attributes:
    sampling_rate: [] q_k.
    noise_multiplier: [] sigma of the gradient noise this round.
  """

  sampling_rate: jax.Array
  noise_multiplier: jax.Array


class SiteState(NamedTuple):
  """What a site keeps between rounds.

  Attributes:
    local_params: site-local parameters (FedBN normalisation), or () if none.
    clip: adaptive clipping state, or () without adaptive clipping.
  """

  local_params: Any
  clip: Any


class ClientMetrics(NamedTuple):
  """Per-site results of a round. The loss and counts are computed from
  private data without noise: diagnostics for the simulation, not releases.

  Attributes:
    loss_sum: [] summed per-unit loss over all local steps.
    num_real: [] units sampled over all local steps.
    num_clipped: [] units clipped over all local steps.
    noise_multiplier: [] gradient sigma applied (read from the transform state).
    l2_clip_norm: [] C applied at the last local step.
    sampling_rate: [] q used for the Poisson sampling.
    steps: [] local steps run.
  """

  loss_sum: jax.Array
  num_real: jax.Array
  num_clipped: jax.Array
  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array
  sampling_rate: jax.Array
  steps: jax.Array


class ClientOutput(NamedTuple):
  delta: PyTree
  site_state: SiteState
  metrics: ClientMetrics


def _local_optimizer(config: ClientConfig) -> optax.GradientTransformation:
  if config.optimizer == "sgd":
    return optax.sgd(config.learning_rate)
  if config.optimizer == "momentum":
    return optax.sgd(config.learning_rate, momentum=0.9)
  return optax.adam(config.learning_rate)


def merge_local(global_params: PyTree, local_params, norm_mask) -> PyTree:
  """Global params with the site-local (FedBN) leaves substituted."""
  if norm_mask is None:
    return global_params
  return jax.tree.map(lambda m, g, l: l if m else g, norm_mask, global_params,
                      local_params)


def init_site_state(params: PyTree, dp: LocalDPConfig,
                    norm_mask=None) -> SiteState:
  """A site's state before its first round."""
  clip = dp.adaptive_clipping.init() if (
      dp.enabled and dp.adaptive_clipping is not None) else ()
  local = params if norm_mask is not None else ()
  return SiteState(local_params=local, clip=clip)


def make_client_update(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                       client: ClientConfig, dp: LocalDPConfig,
                       norm_mask=None) -> Callable[..., ClientOutput]:
  """Builds the per-site update function (see module docstring).

  Args:
    loss_fn: per-example loss `(params, example) -> scalar`.
    client: local training settings.
    dp: record-level DP settings.
    norm_mask: optional pytree of bools like params (FedBN): True leaves stay
      at the site and are not aggregated.
  """
  grad_fn = privacy.clipped_grad(
      loss_fn, l2_clip_norm=dp.l2_clip_norm,
      unit="group" if dp.unit == "patient" else "example",
      microbatch_size=client.microbatch_size)
  local_opt = _local_optimizer(client)
  adaptive = dp.adaptive_clipping if dp.enabled else None

  def client_update(global_params, site_state: SiteState, data: SiteData,
                    site_config: SiteConfig, round_index, site_index,
                    root_key) -> ClientOutput:
    start = merge_local(global_params, site_state.local_params, norm_mask)
    noise_tx = privacy.gaussian_noise(
        site_config.noise_multiplier, l2_clip_norm=None,
        expected_batch_size=float(client.expected_batch_size))

    def key_for(step, purpose):
      return keys_lib.derive_key(root_key, round_index=round_index,
                                 site=site_index, step=step, purpose=purpose)

    def sample(step):
      skey = key_for(step, keys_lib.Purpose.SAMPLE_BATCH)
      if dp.unit == "patient":
        idx, mask = sampling.poisson_sample(
            skey, data.num_groups, data.groups.shape[0],
            site_config.sampling_rate, client.max_batch_size)
        positions = data.groups[idx]
        slice_mask = data.group_mask[idx] & mask[:, None]
        batch = jax.tree.map(lambda a: a[positions], data.examples)
        return batch, mask, slice_mask
      idx, mask = sampling.poisson_sample(
          skey, data.num_examples, jax.tree.leaves(data.examples)[0].shape[0],
          site_config.sampling_rate, client.max_batch_size)
      return jax.tree.map(lambda a: a[idx], data.examples), mask, None

    def step_fn(carry, step):
      params, opt_state, noise_state, clip_state, metrics = carry
      batch, mask, slice_mask = sample(step)
      if dp.enabled:
        clip = clip_state.l2_clip_norm if adaptive else jnp.float32(
            dp.l2_clip_norm)
        grad_sum, stats = grad_fn(params, batch, ~mask,
                                  slice_mask=slice_mask, l2_clip_norm=clip)
        grad, noise_state = noise_tx.update(
            grad_sum, noise_state, params,
            noise_key=key_for(step, keys_lib.Purpose.GRADIENT_NOISE),
            l2_clip_norm=clip)
        if adaptive:
          clip_state = adaptive.update(
              clip_state, stats.per_example_norms, stats.is_real,
              key_for(step, keys_lib.Purpose.CLIP_COUNT_NOISE))
      else:
        grad_sum, stats = grad_fn(params, batch, ~mask,
                                  slice_mask=slice_mask, l2_clip_norm=jnp.inf)
        count = jnp.maximum(stats.num_real, 1).astype(jnp.float32)
        grad = jax.tree.map(lambda g: g / count, grad_sum)
      if client.prox_mu > 0:  # Data-independent: post-processing under DP.
        grad = jax.tree.map(lambda g, p, s: g + client.prox_mu * (p - s),
                            grad, params, start)
      updates, opt_state = local_opt.update(grad, opt_state, params)
      params = optax.apply_updates(params, updates)
      metrics = ClientMetrics(
          loss_sum=metrics.loss_sum + jnp.sum(stats.per_example_loss),
          num_real=metrics.num_real + stats.num_real,
          num_clipped=metrics.num_clipped + stats.num_clipped,
          noise_multiplier=noise_state.noise_multiplier,
          l2_clip_norm=(noise_state.l2_clip_norm if dp.enabled
                        else jnp.float32(jnp.inf)),
          sampling_rate=jnp.asarray(site_config.sampling_rate, jnp.float32),
          steps=metrics.steps + 1)
      return (params, opt_state, noise_state, clip_state, metrics), None

    zero = jnp.zeros([], jnp.float32)
    metrics0 = ClientMetrics(zero, jnp.zeros([], jnp.int32),
                             jnp.zeros([], jnp.int32), zero, zero, zero,
                             jnp.zeros([], jnp.int32))
    carry = (start, local_opt.init(start), noise_tx.init(start),
             site_state.clip, metrics0)
    if resolve_local_loop(client.local_loop) == "scan":
      carry, _ = jax.lax.scan(step_fn, carry, jnp.arange(client.local_steps))
    else:
      for step in range(client.local_steps):
        carry, _ = step_fn(carry, jnp.int32(step))
    params, _, _, clip_state, metrics = carry
    delta = jax.tree.map(lambda p, s: p - s, params, start)
    local = site_state.local_params
    if norm_mask is not None:  # FedBN: these leaves stay at the site.
      delta = jax.tree.map(lambda m, d: jnp.zeros_like(d) if m else d,
                           norm_mask, delta)
      local = jax.tree.map(lambda m, p, l: p if m else l, norm_mask, params,
                           local)
    return ClientOutput(delta, SiteState(local, clip_state), metrics)

  return client_update

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

Without record-level DP (site-level DP, whose guarantee comes from clipping
the site's update at the server; or no DP) a step does no per-example work:
a fixed-size batch drawn without replacement (`sampling.shuffled_batch`) and
one batched gradient of the masked mean loss (`nonprivate_gradient`).

The work of a step follows the realised sample, not the padded capacity
(`ClientConfig.chunk_size`): the batch is processed in chunks and the loop
stops after the last chunk holding a sampled unit (sampled units come first).
Patients are packed into one slice buffer, so a step costs about the realised
number of slices, not B_max times the longest patient. This changes no
privacy figure: the same Poisson draws from the same keys, the same B_max,
sigma and q, and the same clipped sums up to float summation order.

The pieces, in the spirit of fedjax's client init / step / final:
`client_init`, `sample_batch` (the realised sample in the layout its
gradient needs), `make_private_gradient` / `nonprivate_gradient`,
`local_step` and `final_output`; `make_client_update` composes them.

This module knows nothing about images: what it trains is a `task.Task`
passed in (the loss of one example, `example` being one entry of the site's
`examples` pytree, with optional faster per-example gradients and a
transform of each step's batch), or a bare per-example loss.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedjax_seg import privacy
from fedjax_seg import xla_cpu
from fedjax_seg.federated import gradients
from fedjax_seg.federated import sampling
from fedjax_seg.federated import task as task_lib
from fedjax_seg.privacy import auditing
from fedjax_seg.privacy import correlated
from fedjax_seg.privacy import keys as keys_lib
from fedjax_seg.privacy import units as units_lib

PyTree = chex.ArrayTree
# Record-level units (one vocabulary: `privacy.PrivacyUnit`).
UNITS = units_lib.RECORD_UNITS
LOCAL_OPTIMIZERS = ("sgd", "momentum", "adam")
LOCAL_LOOPS = ("auto", "scan", "unroll")
BATCH_SAMPLINGS = ("auto", "poisson", "shuffle")
PER_EXAMPLE_GRADS = ("vmap", "layers", "ghost")


def resolve_local_loop(local_loop: str, canonical_convs: bool = False) -> str:
  """The concrete local loop for "auto".

  On CPU, XLA runs convolutions inside a loop body slowly unless they were
  rewritten by `xla_cpu.canonicalize_convs` (BENCHMARKS.md): "auto" then
  unrolls the local steps, except when every convolution of a step is
  canonicalised (the chunked DP-SGD path and the non-private path), where `lax.scan` is as fast and
  compiles once per run instead of once per step.
  """
  if local_loop == "auto":
    return ("unroll" if jax.default_backend() == "cpu" and not canonical_convs
            else "scan")
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
    audit: optional `auditing.AuditConfig`: gradient canaries in the
      clipped sums of one site, and that site's released gradients summed
      in its state (`privacy.auditing`).
    noise_stream: optional `correlated.StreamShape`: the noise of a site's
      steps is correlated over all its steps (`correlated_noise` with the
      site's C in `SiteConfig.noise_params`, state in `SiteState.noise`),
      and each step samples only the units of group (stream step mod
      `SiteConfig.cycle`). None: independent noise.
  """

  enabled: bool = True
  unit: str = "example"
  l2_clip_norm: float = 1.0
  adaptive_clipping: privacy.AdaptiveClipping | None = None
  audit: auditing.AuditConfig | None = None
  noise_stream: correlated.StreamShape | None = None

  def __post_init__(self):
    if self.unit not in UNITS:
      raise ValueError(f"unit must be one of {UNITS}, got {self.unit!r}.")
    if not self.l2_clip_norm > 0:
      raise ValueError(f"l2_clip_norm must be > 0, got {self.l2_clip_norm}.")
    if self.noise_stream is not None and (
        self.adaptive_clipping is not None or self.audit is not None):
      raise ValueError("correlated noise needs a fixed clip norm and no "
                       "audit (its analyses assume one noise scale and "
                       "cyclic sampling of the units only).")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
  """Local training (learning settings; `microbatch_size` is performance only).

  Attributes:
    local_steps: DP-SGD steps per round.
    expected_batch_size: B, the public expected number of units per step.
    max_batch_size: static B_max of the padded batch (see
      `privacy.plan.max_batch_size_for`).
    learning_rate: local learning rate.
    optimizer: "sgd", "momentum" or "adam" (state reset every round).
    prox_mu: FedProx proximal weight (0 = FedAvg).
    microbatch_size: per-example gradients in chunks of this many units
      (performance only).
    local_loop: how local steps are iterated (performance only): "scan"
      (`lax.scan`, one compiled step), "unroll" (a static Python loop, compile
      time grows with local_steps), or "auto": "scan", except on CPU when a
      step has convolutions that are not canonicalised (the full-capacity DP
      path, chunk_size=None), which XLA runs about 15x slower inside a loop
      body (0.86 s vs 0.053 s per step of the tiny U-Net, jax 0.10.2).
    chunk_size: work follows the realised sample (performance only): units
      (slices, also for unit="patient", whose sampled patients' slices are
      packed into one buffer) are processed in chunks of this many, and only
      the chunks up to the last sampled one are computed. None: the previous
      full-capacity path (every one of the B_max slots, and for patients
      B_max x the longest patient's slices), kept for comparison; there
      `microbatch_size` applies. Default 4, the fastest measured on CPU
      (BENCHMARKS.md, "Work that follows the realised sample").
    canonicalize_convs: rewrite the convolutions of the chunked gradients into
      the form XLA's CPU backend runs fast inside a loop
      (`xla_cpu.canonicalize_convs`; performance only). None: only when the
      default backend is CPU.
    batch_sampling: how a local step's batch is drawn. "poisson": each unit
      independently with rate q (padded to max_batch_size), what record-level
      DP accounting assumes; "shuffle": exactly min(B, N_k) units without
      replacement from a per-round epoch order (`sampling.shuffled_batch`),
      refused with record-level DP; "auto": "poisson" with record-level DP,
      else "shuffle".
    per_example_grads: how a DP step forms per-unit gradients (performance
      only, the same values): "vmap" (`jax.vmap(jax.grad)`) or "layers"
      (one batched backward pass and each layer's per-example gradient from
      its input and output gradient, `privacy.layer_gradients`; needs a
      task with `per_example_value_and_grad` and chunk_size set) or "ghost"
      (the same pass, each example's norm from ghost norms where cheaper and
      the clipped sum by book-keeping, no per-example kernel gradient of
      those layers; `privacy.layer_gradients.ghost_clipped_grad`; example
      unit only, needs a task with `ghost_clipped_grad` and chunk_size
      set).
  """

  local_steps: int = 1
  expected_batch_size: int = 8
  max_batch_size: int = 16
  learning_rate: float = 0.1
  optimizer: str = "sgd"
  prox_mu: float = 0.0
  microbatch_size: int | None = None
  local_loop: str = "auto"
  chunk_size: int | None = 4
  canonicalize_convs: bool | None = None
  batch_sampling: str = "auto"
  per_example_grads: str = "vmap"

  def __post_init__(self):
    if self.per_example_grads not in PER_EXAMPLE_GRADS:
      raise ValueError(f"per_example_grads must be one of "
                       f"{PER_EXAMPLE_GRADS}, got {self.per_example_grads!r}.")
    if self.per_example_grads != "vmap" and self.chunk_size is None:
      raise task_lib.SettingError(
          "per_example_grads", f"per_example_grads={self.per_example_grads!r}"
          " needs chunk_size set (not none).")
    if self.batch_sampling not in BATCH_SAMPLINGS:
      raise ValueError(f"batch_sampling must be one of {BATCH_SAMPLINGS}, "
                       f"got {self.batch_sampling!r}.")
    if self.chunk_size is not None and not (
        isinstance(self.chunk_size, int) and self.chunk_size >= 1):
      raise ValueError(f"chunk_size must be None or an int >= 1, got "
                       f"{self.chunk_size!r}.")
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
    l2_clip_norm: [] record-level clip norm C, or None for
      `LocalDPConfig.l2_clip_norm` (ignored with adaptive clipping, whose
      state holds C).
    learning_rate: [] local learning rate, or None for
      `ClientConfig.learning_rate`.
    cycle: [] int32 b_k, with correlated noise: each unit is in one of b_k
      groups (`sampling.cyclic_groups`, uniform and independent, fixed for
      the run) and stream step t samples group t mod b_k only; None: every
      unit every step.
    noise_params: with correlated noise, the site's C padded to the
      stream's shape (`correlated.StreamShape.params`); else None.
    expected_batch_size: [] the public expected number of units per step
      the noised sum is divided by, or None for
      `ClientConfig.expected_batch_size` (BLT: a whole group, N_k / b_k).
    As arrays, C and the learning rate can differ between the members of a
    sweep that share one compiled program.
  """

  sampling_rate: jax.Array
  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array | None = None
  learning_rate: jax.Array | None = None
  cycle: jax.Array | None = None
  noise_params: jax.Array | None = None
  expected_batch_size: jax.Array | None = None


class SiteState(NamedTuple):
  """What a site keeps between rounds.

  Attributes:
    local_params: site-local parameters (FedBN normalisation), or () if none.
    clip: adaptive clipping state, or () without adaptive clipping.
    audit: `auditing.AuditState` with an audit (zeros except at the audited
      site), else ().
    noise: with correlated noise, the site's `CorrelatedNoiseState` (the
      stream's step and C^{-1}'s state, carried over all its rounds), else
      ().
  """

  local_params: Any
  clip: Any
  audit: Any = ()
  noise: Any = ()


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


def _local_optimizer(config: ClientConfig,
                     learning_rate=None) -> optax.GradientTransformation:
  """The local optimizer; `learning_rate` (maybe traced) overrides the
  config's."""
  lr = config.learning_rate if learning_rate is None else learning_rate
  if config.optimizer == "sgd":
    return optax.sgd(lr)
  if config.optimizer == "momentum":
    return optax.sgd(lr, momentum=0.9)
  return optax.adam(lr)


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
  audit = auditing.init_state(params) if (
      dp.enabled and dp.audit is not None) else ()
  noise = _noise_transform(dp, 0.0, 1).init(params) if (
      dp.enabled and dp.noise_stream is not None) else ()
  return SiteState(local_params=local, clip=clip, audit=audit, noise=noise)


def _noise_transform(dp: LocalDPConfig, noise_multiplier, expected_batch_size):
  """The record-level noise: `gaussian_noise`, or `correlated_noise` of
  `dp.noise_stream` (the site's C passed at every update)."""
  return correlated.noise_transform(
      dp.noise_stream, noise_multiplier, l2_clip_norm=None,
      expected_batch_size=expected_batch_size)


# The pieces of a step (its batch and gradient) are in `gradients`.

class LocalState(NamedTuple):
  """What a site carries from one local step to the next."""

  params: PyTree
  opt_state: Any
  noise_state: Any  # GaussianNoiseState or CorrelatedNoiseState.
  clip_state: Any
  metrics: ClientMetrics
  audit_state: Any = ()


def client_init(start: PyTree, site_state: SiteState,
                local_opt: optax.GradientTransformation,
                noise_tx: optax.GradientTransformationExtraArgs) -> LocalState:
  """The local state before the first step (optimizer state reset)."""
  zero = jnp.zeros([], jnp.float32)
  izero = jnp.zeros([], jnp.int32)
  metrics = ClientMetrics(zero, izero, izero, zero, zero, zero, izero)
  # Correlated noise continues the site's stream; independent noise starts
  # afresh (it has no state but its counters).
  noise_state = (site_state.noise if isinstance(
      site_state.noise, correlated.CorrelatedNoiseState)
                 else noise_tx.init(start))
  return LocalState(start, local_opt.init(start), noise_state,
                    site_state.clip, metrics, site_state.audit)


def local_step(state: LocalState, batch: gradients.Batch, *, start: PyTree,
               sampling_rate: jax.Array,
               key_for: Callable[[jax.Array, keys_lib.Purpose], jax.Array],
               step: jax.Array, loss_fn: Callable[[PyTree, PyTree], jax.Array],
               private_gradient: Callable[..., Any] | None,
               client: ClientConfig, dp: LocalDPConfig,
               local_opt: optax.GradientTransformation,
               noise_tx: optax.GradientTransformationExtraArgs,
               l2_clip_norm: jax.Array | None = None,
               audit_canaries: tuple | None = None,
               trainable_mask=None, noise_params=None) -> LocalState:
  """One local step on `batch`: gradient -> noise -> FedProx -> optimizer.

  `private_gradient` (from `make_private_gradient`) is used when DP is on;
  without DP the step uses `nonprivate_gradient`. `key_for(step, purpose)`
  derives the step's keys. `l2_clip_norm` (maybe traced) overrides
  `dp.l2_clip_norm` without adaptive clipping. With `dp.audit`,
  `audit_canaries` is (directions key, [m] included at this site, [] this
  is the audited site): the sampled canaries join the clipped sum before
  the noise, and the released gradient is added to the audit state.
  `noise_params`: the site's C with correlated noise.
  """
  params, opt_state, noise_state, clip_state, metrics, audit_state = state
  adaptive = dp.adaptive_clipping if dp.enabled else None
  if dp.enabled:
    fixed = dp.l2_clip_norm if l2_clip_norm is None else l2_clip_norm
    clip = clip_state.l2_clip_norm if adaptive else jnp.asarray(
        fixed, jnp.float32)
    grad_sum, stats = private_gradient(params, batch, clip)
    if dp.audit is not None:
      directions_key, included, audited = audit_canaries
      grad_sum, audit_state = auditing.add_canaries(
          grad_sum, audit_state, key=directions_key, config=dp.audit,
          included=included,
          sample_key=key_for(step, keys_lib.Purpose.AUDIT_CANARY_SAMPLE),
          sampling_rate=sampling_rate, clip_norm=clip)
    grad, noise_state = noise_tx.update(
        grad_sum, noise_state, params,
        noise_key=key_for(step, keys_lib.Purpose.GRADIENT_NOISE),
        l2_clip_norm=clip, stream_params=noise_params)
    if dp.audit is not None:
      audit_state = auditing.observe(audit_state, grad, audited)
    if adaptive:
      clip_state = adaptive.update(
          clip_state, stats.per_example_norms, stats.is_real,
          key_for(step, keys_lib.Purpose.CLIP_COUNT_NOISE))
    loss_sum = jnp.sum(stats.per_example_loss)
    num_real, num_clipped = stats.num_real, stats.num_clipped
  else:
    grad, stats = gradients.nonprivate_gradient(loss_fn, params, batch, client)
    loss_sum, num_real = stats.loss_sum, stats.num_real
    num_clipped = jnp.zeros([], jnp.int32)
  if trainable_mask is not None:  # Frozen leaves: no noise, no update.
    grad = gradients.zero_frozen(grad, trainable_mask)
  if client.prox_mu > 0:  # Data-independent: post-processing under DP.
    grad = jax.tree.map(lambda g, p, s: g + client.prox_mu * (p - s), grad,
                        params, start)
  updates, opt_state = local_opt.update(grad, opt_state, params)
  params = optax.apply_updates(params, updates)
  metrics = ClientMetrics(
      loss_sum=metrics.loss_sum + loss_sum,
      num_real=metrics.num_real + num_real,
      num_clipped=metrics.num_clipped + num_clipped,
      noise_multiplier=noise_state.noise_multiplier,
      l2_clip_norm=(noise_state.l2_clip_norm if dp.enabled
                    else jnp.float32(jnp.inf)),
      sampling_rate=jnp.asarray(sampling_rate, jnp.float32),
      steps=metrics.steps + 1)
  return LocalState(params, opt_state, noise_state, clip_state, metrics,
                    audit_state)


def final_output(state: LocalState, start: PyTree, site_state: SiteState,
                 norm_mask=None) -> ClientOutput:
  """The site's delta (params - start), new site state and metrics.

  With a FedBN `norm_mask`, the masked leaves' delta is 0 (they are not
  aggregated) and their trained values stay in the site state.
  """
  delta = jax.tree.map(lambda p, s: p - s, state.params, start)
  local = site_state.local_params
  if norm_mask is not None:  # FedBN: these leaves stay at the site.
    delta = jax.tree.map(lambda m, d: jnp.zeros_like(d) if m else d,
                         norm_mask, delta)
    local = jax.tree.map(lambda m, p, l: p if m else l, norm_mask,
                         state.params, local)
  noise = (state.noise_state if isinstance(
      site_state.noise, correlated.CorrelatedNoiseState) else ())
  return ClientOutput(delta, SiteState(local, state.clip_state,
                                      state.audit_state, noise), state.metrics)


def _frozen_outside(loss_fn, trainable_mask):
  """`loss_fn` with the leaves outside `trainable_mask` held constant."""
  def loss(params, example):
    held = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p),
                        trainable_mask, params)
    return loss_fn(held, example)
  return loss


def make_client_update(task: task_lib.Task | Callable,
                       client: ClientConfig, dp: LocalDPConfig,
                       norm_mask=None,
                       trainable_mask=None) -> Callable[..., ClientOutput]:
  """Builds the per-site update function (see module docstring).

  Args:
    task: a `Task` (the loss of one example and optional faster gradients
      and batch transform), or a bare per-example loss `(params, example)
      -> scalar`.
    client: local training settings.
    dp: record-level DP settings.
    norm_mask: optional pytree of bools like params (FedBN): True leaves stay
      at the site and are not aggregated.
    trainable_mask: optional pytree of bools like params: only True leaves
      train. The others are held constant inside the loss (stop_gradient),
      so each unit's gradient, its norm and its clipping involve only the
      trained leaves, and their (noised) gradient is zeroed before the
      optimizer (post-processing): they never move.
  """
  task = task_lib.Task.of(task)
  shuffle = gradients.resolve_batch_sampling(client, dp) == "shuffle"
  layered = (gradients.layer_value_and_grad(task, trainable_mask)
             if dp.enabled and client.per_example_grads == "layers" else None)
  ghost = (gradients.ghost_clipped_grad(task, trainable_mask)
           if dp.enabled and client.per_example_grads == "ghost" else None)
  loss_fn = task.loss
  if trainable_mask is not None:
    loss_fn = _frozen_outside(loss_fn, trainable_mask)
  private_gradient = (gradients.make_private_gradient(loss_fn, client, dp,
                                                     layered, ghost)
                      if dp.enabled else None)

  def client_update(global_params, site_state: SiteState, data: SiteData,
                    site_config: SiteConfig, round_index, site_index,
                    root_key) -> ClientOutput:
    local_opt = _local_optimizer(client, site_config.learning_rate)
    start = merge_local(global_params, site_state.local_params, norm_mask)
    noise_tx = _noise_transform(
        dp, site_config.noise_multiplier,
        float(client.expected_batch_size)
        if site_config.expected_batch_size is None
        else site_config.expected_batch_size)

    def key_for(step, purpose):
      return keys_lib.derive_key(root_key, round_index=round_index,
                                 site=site_index, step=step, purpose=purpose)

    unit_groups = None
    if site_config.cycle is not None:
      # One partition for the whole run: the same key every round.
      capacity = (data.groups.shape[0] if dp.unit == "patient" else
                  jax.tree.leaves(data.examples)[0].shape[0])
      unit_groups = sampling.cyclic_groups(
          keys_lib.derive_key(root_key, round_index=0, site=site_index,
                              step=0, purpose=keys_lib.Purpose.CYCLIC_GROUPS),
          capacity, site_config.cycle)
    # Shuffled batches read one epoch order per round (step 0's key);
    # Poisson batches draw a fresh key per step.
    epoch_key = key_for(0, keys_lib.Purpose.LOCAL_EPOCH_ORDER)
    audit_canaries = None
    if dp.enabled and dp.audit is not None:
      audited = site_index == dp.audit.site
      audit_canaries = (auditing.directions_key(root_key, dp.audit),
                        auditing.inclusion(root_key, dp.audit) & audited,
                        audited)

    def step_fn(state, step):
      key = epoch_key if shuffle else key_for(step,
                                              keys_lib.Purpose.SAMPLE_BATCH)
      # Cyclic groups follow the site's stream step, over all its rounds.
      group = None if site_config.cycle is None else (
          unit_groups, state.noise_state.count % site_config.cycle)
      batch = gradients.sample_batch(data, site_config.sampling_rate, key,
                                     client, dp, step, group=group)
      if task.batch_transform is not None:  # E.g. fresh augmentation keys.
        batch = batch._replace(examples=task.batch_transform(
            batch.examples, key_for(step, keys_lib.Purpose.AUGMENT),
            site_index))
      state = local_step(
          state, batch, start=start, sampling_rate=site_config.sampling_rate,
          key_for=key_for, step=step, loss_fn=loss_fn,
          private_gradient=private_gradient, client=client, dp=dp,
          local_opt=local_opt, noise_tx=noise_tx,
          l2_clip_norm=site_config.l2_clip_norm,
          audit_canaries=audit_canaries, trainable_mask=trainable_mask,
          noise_params=site_config.noise_params)
      return state, None

    state = client_init(start, site_state, local_opt, noise_tx)
    # Every convolution of a step is canonicalised on the chunked DP path
    # and on the non-private path.
    canonical = xla_cpu.resolve_canonicalize(
        client.canonicalize_convs) and (not dp.enabled
                                        or client.chunk_size is not None)
    if resolve_local_loop(client.local_loop, canonical) == "scan":
      state, _ = jax.lax.scan(step_fn, state, jnp.arange(client.local_steps))
    else:
      for step in range(client.local_steps):
        state, _ = step_fn(state, jnp.int32(step))
    return final_output(state, start, site_state, norm_mask)

  return client_update

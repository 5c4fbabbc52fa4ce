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
from fedjax_seg.data import augment as augment_lib
from fedjax_seg.federated import sampling
from fedjax_seg.privacy import auditing
from fedjax_seg.privacy import clipping as clipping_lib
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
  rewritten by `privacy.canonicalize_convs` (BENCHMARKS.md): "auto" then
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
  """

  enabled: bool = True
  unit: str = "example"
  l2_clip_norm: float = 1.0
  adaptive_clipping: privacy.AdaptiveClipping | None = None
  audit: auditing.AuditConfig | None = None

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
      (`privacy.canonicalize_convs`; performance only). None: only when the
      default backend is CPU.
    batch_sampling: how a local step's batch is drawn. "poisson": each unit
      independently with rate q (padded to max_batch_size), what record-level
      DP accounting assumes; "shuffle": exactly min(B, N_k) units without
      replacement from a per-round epoch order (`sampling.shuffled_batch`),
      refused with record-level DP; "auto": "poisson" with record-level DP,
      else "shuffle".
    augmult: augmentation multiplicity K (De et al. 2022): each unit's loss
      is the mean over K augmented copies of its slices
      (`data.augment.multiplicity_loss`), so its gradient is averaged over
      the copies before it is clipped; 0 = no augmentation. Free in
      privacy: still one clipped contribution per unit.
    augment: the augmentations drawn for each copy.
    augment_per_site: optional [sites][len(AUGMENTATIONS)] bools: which of
      `augment`'s transforms each site's examples get (e.g. by modality;
      `augment.ops_table`); None: all of them everywhere.
    per_example_grads: how a DP step forms per-unit gradients (performance
      only, the same values): "vmap" (`jax.vmap(jax.grad)`) or "layers"
      (one batched backward pass and each layer's per-example gradient from
      its input and output gradient, `privacy.layer_gradients`; needs a
      loss with `per_example_value_and_grad`, chunk_size set, no augmult)
      or "ghost" (the same pass, each example's norm from ghost norms where
      cheaper and the clipped sum by book-keeping, no per-example kernel
      gradient of those layers; `privacy.layer_gradients.
      ghost_clipped_grad`; example unit only, needs a loss with
      `ghost_clipped_grad`, chunk_size set, no augmult).
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
  augmult: int = 0
  augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
  augment_per_site: tuple[tuple[bool, ...], ...] | None = None
  per_example_grads: str = "vmap"

  def __post_init__(self):
    if self.per_example_grads not in PER_EXAMPLE_GRADS:
      raise ValueError(f"per_example_grads must be one of "
                       f"{PER_EXAMPLE_GRADS}, got {self.per_example_grads!r}.")
    if self.per_example_grads != "vmap" and (self.chunk_size is None
                                             or self.augmult):
      raise ValueError(f"per_example_grads={self.per_example_grads!r} "
                       "needs chunk_size set and no augmult.")
    if self.augmult < 0:
      raise ValueError(f"augmult must be >= 0, got {self.augmult}.")
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
    As arrays, C and the learning rate can differ between the members of a
    sweep that share one compiled program.
  """

  sampling_rate: jax.Array
  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array | None = None
  learning_rate: jax.Array | None = None


class SiteState(NamedTuple):
  """What a site keeps between rounds.

  Attributes:
    local_params: site-local parameters (FedBN normalisation), or () if none.
    clip: adaptive clipping state, or () without adaptive clipping.
    audit: `auditing.AuditState` with an audit (zeros except at the audited
      site), else ().
  """

  local_params: Any
  clip: Any
  audit: Any = ()


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
  return SiteState(local_params=local, clip=clip, audit=audit)


# -- The pieces of a client update ------------------------------------------


class Batch(NamedTuple):
  """One local step's realised sample, in the layout its gradient needs.

  Attributes:
    examples: the sampled units' data, each leaf [B_max, ...]
      (unit="example"), [B_max, L, ...] (unit="patient", chunk_size=None) or
      [B_max * L, ...] (unit="patient", the sampled patients' slices packed,
      see `sampling.pack_groups`).
    mask: [B_max] bool, the sampled units (the batch slots; sampled first).
    slice_mask: None (unit="example"), else the real slices of sampled
      patients: [B_max, L] or, packed, [B_max * L] bool.
    segment_ids: None, or (packed) [B_max * L] int32: each slice's batch slot.
  """

  examples: PyTree
  mask: jax.Array
  slice_mask: jax.Array | None = None
  segment_ids: jax.Array | None = None


def resolve_batch_sampling(client: ClientConfig, dp: LocalDPConfig) -> str:
  """`client.batch_sampling` for this DP setting ("poisson" or "shuffle")."""
  if client.batch_sampling == "auto":
    return "poisson" if dp.enabled else "shuffle"
  if client.batch_sampling == "shuffle" and dp.enabled:
    raise ValueError("batch_sampling='shuffle' with record-level DP: its "
                     "accounting assumes Poisson-sampled batches.")
  return client.batch_sampling


def sample_batch(data: SiteData, sampling_rate: jax.Array, key: jax.Array,
                 client: ClientConfig, dp: LocalDPConfig,
                 step: jax.Array | int = 0) -> Batch:
  """A local step's batch of the site's units as a `Batch`.

  Poisson (`resolve_batch_sampling`): each unit with rate q, B_max slots,
  `key` a fresh `Purpose.SAMPLE_BATCH` key of this step. The draws depend
  only on `key`, N_k, q and B_max, never on the layout: packing the patients'
  slices (chunk_size set) reorders work, it does not change which patients
  are sampled, nor truncate any of their slices.

  Shuffle: the `step`-th B units of the round's epoch order
  (`sampling.shuffled_batch`), `key` the round's `Purpose.LOCAL_EPOCH_ORDER`
  key (the same for every step); B slots, patients' slices packed.
  """
  gather = lambda positions: jax.tree.map(lambda a: a[positions],
                                          data.examples)
  shuffle = resolve_batch_sampling(client, dp) == "shuffle"
  if dp.unit == "patient":
    if shuffle:
      idx, mask = sampling.shuffled_batch(
          key, data.num_groups, data.groups.shape[0],
          client.expected_batch_size, step)
    else:
      idx, mask = sampling.poisson_sample(
          key, data.num_groups, data.groups.shape[0], sampling_rate,
          client.max_batch_size)
    if client.chunk_size is None:
      slice_mask = data.group_mask[idx] & mask[:, None]
      return Batch(gather(data.groups[idx]), mask, slice_mask)
    positions, segment_ids, slice_mask = sampling.pack_groups(
        idx, mask, data.groups, data.group_mask)
    return Batch(gather(positions), mask, slice_mask, segment_ids)
  capacity = jax.tree.leaves(data.examples)[0].shape[0]
  if shuffle:
    idx, mask = sampling.shuffled_batch(key, data.num_examples, capacity,
                                        client.expected_batch_size, step)
  else:
    idx, mask = sampling.poisson_sample(key, data.num_examples, capacity,
                                        sampling_rate, client.max_batch_size)
  return Batch(gather(idx), mask)


def make_private_gradient(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], client: ClientConfig,
    dp: LocalDPConfig, per_example_value_and_grad=None,
    ghost_clipped_grad=None,
) -> Callable[[PyTree, Batch, jax.Array],
              tuple[PyTree, privacy.ClipStats]]:
  """`(params, batch, l2_clip_norm) -> (clipped_grad_sum, ClipStats)`.

  Per-unit (example or patient) clipped gradient sum over a `Batch` from
  `sample_batch` with the same `client` and `dp`: `privacy.clipped_grad` over
  the full capacity (chunk_size=None), else `privacy.chunked_clipped_grad`
  (examples) or `privacy.packed_group_clipped_grad` (patients), which give the
  same sum and ClipStats (per unit, [B_max]) computing only the chunks that
  hold sampled units. With `per_example_value_and_grad` (the layers path,
  `client.per_example_grads="layers"`) the per-slice gradients come from it,
  and an example is a group of one slice: the same sum and ClipStats. With
  `ghost_clipped_grad` (`client.per_example_grads="ghost"`, example unit
  only) each chunk's clipped sum comes from it.
  """
  unit = "group" if dp.unit == "patient" else "example"
  if ghost_clipped_grad is not None:
    if unit == "group" or client.chunk_size is None:
      raise ValueError("per_example_grads='ghost' clips single slices "
                       "(unit 'example') in chunks (chunk_size set); a "
                       "patient's norm needs cross-slice terms: use 'vmap' "
                       "or 'layers'.")
    ghost = privacy.chunked_clipped_grad(
        loss_fn, l2_clip_norm=dp.l2_clip_norm, chunk_size=client.chunk_size,
        canonicalize=client.canonicalize_convs,
        chunk_clipped_grad=ghost_clipped_grad)
    return lambda params, batch, clip: ghost(params, batch.examples,
                                             ~batch.mask, l2_clip_norm=clip)
  if client.chunk_size is None:
    full = privacy.clipped_grad(loss_fn, l2_clip_norm=dp.l2_clip_norm,
                                unit=unit,
                                microbatch_size=client.microbatch_size)
    return lambda params, batch, clip: full(
        params, batch.examples, ~batch.mask, slice_mask=batch.slice_mask,
        l2_clip_norm=clip)
  if unit == "group" or per_example_value_and_grad is not None:
    packed = privacy.packed_group_clipped_grad(
        loss_fn, l2_clip_norm=dp.l2_clip_norm,
        num_groups=client.max_batch_size, chunk_size=client.chunk_size,
        canonicalize=client.canonicalize_convs,
        per_example_value_and_grad=per_example_value_and_grad)
    if unit == "group":
      return lambda params, batch, clip: packed(
          params, batch.examples, batch.segment_ids, batch.slice_mask,
          l2_clip_norm=clip)
    # One slice per unit: slot i is group i, real when sampled.
    return lambda params, batch, clip: packed(
        params, batch.examples,
        jnp.arange(client.max_batch_size, dtype=jnp.int32), batch.mask,
        l2_clip_norm=clip)
  chunked = privacy.chunked_clipped_grad(
      loss_fn, l2_clip_norm=dp.l2_clip_norm, chunk_size=client.chunk_size,
      canonicalize=client.canonicalize_convs)
  return lambda params, batch, clip: chunked(params, batch.examples,
                                             ~batch.mask, l2_clip_norm=clip)


def zero_frozen(tree: PyTree, trainable_mask) -> PyTree:
  """`tree` with the leaves outside `trainable_mask` replaced by zeros."""
  return jax.tree.map(lambda m, g: g if m else jnp.zeros_like(g),
                      trainable_mask, tree)


def _layer_value_and_grad(loss_fn, trainable_mask):
  """The loss's per-layer per-example `(losses, grads)`, with the frozen
  leaves' gradients 0 (as `_frozen_outside` gives them)."""
  fn = getattr(loss_fn, "per_example_value_and_grad", None)
  if fn is None:
    raise ValueError("per_example_grads='layers' needs a loss with a "
                     "`per_example_value_and_grad` (segmentation_task."
                     "example_loss has one).")
  if trainable_mask is None:
    return fn

  def frozen(params, batch):
    losses, grads = fn(params, batch)
    return losses, zero_frozen(grads, trainable_mask)

  return frozen


class UnitLossStats(NamedTuple):
  """What a non-private step saw (computed from private data, not released).

  Attributes:
    loss_sum: [] summed per-unit loss (a patient's loss: its slices' mean).
    num_real: [] int32, units in the realised batch.
  """

  loss_sum: jax.Array
  num_real: jax.Array


def _slices_and_weights(batch: Batch, max_batch_size: int):
  """(slices [T, ...], real [T], unit weight [T], units in the batch [])."""
  if batch.slice_mask is None:  # One slice per unit.
    weight = jnp.where(batch.mask, 1.0, 0.0)
    return (batch.examples, batch.mask, weight,
            jnp.sum(batch.mask).astype(jnp.int32))
  if batch.segment_ids is None:  # [B_max, L]: flatten the slots' slices.
    per_slot = jnp.sum(batch.slice_mask, axis=1)
    slices = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]),
                          batch.examples)
    real = batch.slice_mask.reshape(-1)
    count = jnp.repeat(per_slot, batch.slice_mask.shape[1])
  else:  # Packed.
    per_slot = jax.ops.segment_sum(batch.slice_mask.astype(jnp.int32),
                                   batch.segment_ids, max_batch_size)
    slices, real = batch.examples, batch.slice_mask
    count = per_slot[batch.segment_ids]
  # A patient's loss is the mean over its real slices (as in DP training).
  weight = jnp.where(real, 1.0 / jnp.maximum(count, 1), 0.0)
  return slices, real, weight, jnp.sum(per_slot > 0).astype(jnp.int32)


def nonprivate_gradient(
    loss_fn: Callable[[PyTree, PyTree], jax.Array], params: PyTree,
    batch: Batch, client: ClientConfig) -> tuple[PyTree, UnitLossStats]:
  """Gradient of the mean unit loss over the realised batch (no DP).

  One masked batched gradient (no per-example work): the gradient of
  sum_s where(real_s, w_s * loss_s, 0) / n over the batch's slices, w_s = 1
  for examples and 1 / (the patient's real slices) for patients, n the units
  in the batch (at least 1). Padding slots are zeroed with a select before the
  loss, so garbage there reaches neither the loss nor the gradient. With
  chunk_size set, a batch with more slots than the expected batch (a Poisson
  batch, packed patients' slices) is computed in chunks up to the last real
  one; a shuffled batch of examples (B slots) is one gradient. Unlike the DP path, a real unit with a
  non-finite gradient is not isolated: it makes the step's gradient
  non-finite.

  Returns:
    (gradient like params, `UnitLossStats`).
  """
  slices, real, weight, num_units = _slices_and_weights(
      batch, batch.mask.shape[0])

  def weighted_loss(params, chunk, chunk_real, chunk_weight):
    def zero_padding(x):
      keep = chunk_real.reshape((-1,) + (1,) * (x.ndim - 1))
      return jnp.where(keep, x, jnp.zeros_like(x))

    losses = jax.vmap(loss_fn, in_axes=(None, 0))(
        params, jax.tree.map(zero_padding, chunk))
    per_slice = jnp.where(chunk_real, losses * chunk_weight, 0.0)
    return jnp.sum(per_slice), jnp.sum(jnp.nan_to_num(per_slice))

  grad_fn = jax.grad(weighted_loss, has_aux=True)
  if clipping_lib.resolve_canonicalize(client.canonicalize_convs):
    # So that the step runs at full speed inside `lax.scan` on CPU too.
    grad_fn = privacy.canonicalize_convs(grad_fn)
  c = client.chunk_size
  # Chunks pay only where a padded tail can be skipped: more slots than the
  # expected batch (a Poisson batch, packed patients' slices).
  if c is None or real.shape[0] <= client.expected_batch_size:
    grad, loss_sum = grad_fn(params, slices, real, weight)
  else:
    capacity = -(-real.shape[0] // c) * c
    slices = clipping_lib.pad_leading(slices, capacity)
    real, weight = clipping_lib.pad_leading((real, weight), capacity)

    def body(i, carry):
      part = grad_fn(params, *jax.tree.map(
          lambda x: jax.lax.dynamic_slice_in_dim(x, i * c, c),
          (slices, real, weight)))
      return jax.tree.map(jnp.add, carry, part)

    zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros([], jnp.float32))
    grad, loss_sum = clipping_lib.chunked_loop(
        body, zeros, clipping_lib.chunks_to_run(real, c))
  count = jnp.maximum(num_units, 1).astype(jnp.float32)
  grad = jax.tree.map(lambda g: g / count.astype(g.dtype), grad)
  return grad, UnitLossStats(loss_sum, num_units)


class LocalState(NamedTuple):
  """What a site carries from one local step to the next."""

  params: PyTree
  opt_state: Any
  noise_state: privacy.GaussianNoiseState
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
  return LocalState(start, local_opt.init(start), noise_tx.init(start),
                    site_state.clip, metrics, site_state.audit)


def local_step(state: LocalState, batch: Batch, *, start: PyTree,
               sampling_rate: jax.Array,
               key_for: Callable[[jax.Array, keys_lib.Purpose], jax.Array],
               step: jax.Array, loss_fn: Callable[[PyTree, PyTree], jax.Array],
               private_gradient: Callable[..., Any] | None,
               client: ClientConfig, dp: LocalDPConfig,
               local_opt: optax.GradientTransformation,
               noise_tx: optax.GradientTransformationExtraArgs,
               l2_clip_norm: jax.Array | None = None,
               audit_canaries: tuple | None = None,
               trainable_mask=None) -> LocalState:
  """One local step on `batch`: gradient -> noise -> FedProx -> optimizer.

  `private_gradient` (from `make_private_gradient`) is used when DP is on;
  without DP the step uses `nonprivate_gradient`. `key_for(step, purpose)`
  derives the step's keys. `l2_clip_norm` (maybe traced) overrides
  `dp.l2_clip_norm` without adaptive clipping. With `dp.audit`,
  `audit_canaries` is (directions key, [m] included at this site, [] this
  is the audited site): the sampled canaries join the clipped sum before
  the noise, and the released gradient is added to the audit state.
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
        l2_clip_norm=clip)
    if dp.audit is not None:
      audit_state = auditing.observe(audit_state, grad, audited)
    if adaptive:
      clip_state = adaptive.update(
          clip_state, stats.per_example_norms, stats.is_real,
          key_for(step, keys_lib.Purpose.CLIP_COUNT_NOISE))
    loss_sum = jnp.sum(stats.per_example_loss)
    num_real, num_clipped = stats.num_real, stats.num_clipped
  else:
    grad, stats = nonprivate_gradient(loss_fn, params, batch, client)
    loss_sum, num_real = stats.loss_sum, stats.num_real
    num_clipped = jnp.zeros([], jnp.int32)
  if trainable_mask is not None:  # Frozen leaves: no noise, no update.
    grad = zero_frozen(grad, trainable_mask)
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
  return ClientOutput(delta, SiteState(local, state.clip_state,
                                      state.audit_state), state.metrics)


def _frozen_outside(loss_fn, trainable_mask):
  """`loss_fn` with the leaves outside `trainable_mask` held constant."""
  def loss(params, example):
    held = jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p),
                        trainable_mask, params)
    return loss_fn(held, example)
  return loss


def make_client_update(loss_fn: Callable[[PyTree, PyTree], jax.Array],
                       client: ClientConfig, dp: LocalDPConfig,
                       norm_mask=None,
                       trainable_mask=None) -> Callable[..., ClientOutput]:
  """Builds the per-site update function (see module docstring).

  Args:
    loss_fn: per-example loss `(params, example) -> scalar`.
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
  shuffle = resolve_batch_sampling(client, dp) == "shuffle"
  layered = (_layer_value_and_grad(loss_fn, trainable_mask)
             if dp.enabled and client.per_example_grads == "layers" else None)
  ghost = None
  if dp.enabled and client.per_example_grads == "ghost":
    make_ghost = getattr(loss_fn, "ghost_clipped_grad", None)
    if make_ghost is None:
      raise ValueError("per_example_grads='ghost' needs a loss with a "
                       "`ghost_clipped_grad` (segmentation_task.example_loss "
                       "has one).")
    ghost = make_ghost(trainable_mask)
  if trainable_mask is not None:
    loss_fn = _frozen_outside(loss_fn, trainable_mask)
  if client.augmult:
    loss_fn = augment_lib.multiplicity_loss(loss_fn, client.augmult,
                                            client.augment)
  private_gradient = (make_private_gradient(loss_fn, client, dp, layered,
                                            ghost)
                      if dp.enabled else None)

  def client_update(global_params, site_state: SiteState, data: SiteData,
                    site_config: SiteConfig, round_index, site_index,
                    root_key) -> ClientOutput:
    local_opt = _local_optimizer(client, site_config.learning_rate)
    start = merge_local(global_params, site_state.local_params, norm_mask)
    noise_tx = privacy.gaussian_noise(
        site_config.noise_multiplier, l2_clip_norm=None,
        expected_batch_size=float(client.expected_batch_size))

    def key_for(step, purpose):
      return keys_lib.derive_key(root_key, round_index=round_index,
                                 site=site_index, step=step, purpose=purpose)

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
      batch = sample_batch(data, site_config.sampling_rate, key, client, dp,
                           step)
      if client.augmult:  # Fresh augmentation randomness per unit and step.
        enabled = (None if client.augment_per_site is None else
                   jnp.asarray(client.augment_per_site)[site_index])
        batch = batch._replace(examples=augment_lib.with_augment_keys(
            batch.examples, key_for(step, keys_lib.Purpose.AUGMENT),
            enabled))
      state = local_step(
          state, batch, start=start, sampling_rate=site_config.sampling_rate,
          key_for=key_for, step=step, loss_fn=loss_fn,
          private_gradient=private_gradient, client=client, dp=dp,
          local_opt=local_opt, noise_tx=noise_tx,
          l2_clip_norm=site_config.l2_clip_norm,
          audit_canaries=audit_canaries, trainable_mask=trainable_mask)
      return state, None

    state = client_init(start, site_state, local_opt, noise_tx)
    # Every convolution of a step is canonicalised on the chunked DP path
    # and on the non-private path.
    canonical = clipping_lib.resolve_canonicalize(
        client.canonicalize_convs) and (not dp.enabled
                                        or client.chunk_size is not None)
    if resolve_local_loop(client.local_loop, canonical) == "scan":
      state, _ = jax.lax.scan(step_fn, state, jnp.arange(client.local_steps))
    else:
      for step in range(client.local_steps):
        state, _ = step_fn(state, jnp.int32(step))
    return final_output(state, start, site_state, norm_mask)

  return client_update

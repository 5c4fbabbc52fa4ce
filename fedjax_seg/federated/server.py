"""Server side: aggregation, server optimizers, site-level DP (DP-FedAvg).

The server sees one delta per participating site. Without site-level DP it
takes their weighted mean (by N_k, or uniform) and hands `-mean_delta` to an
optax server optimizer as a pseudo-gradient: SGD with learning rate 1 is
FedAvg, with momentum FedAvgM, Adam FedAdam, Yogi FedYogi (Reddi et al. 2021,
"Adaptive federated optimization").

With site-level DP (Andrew et al. 2021; McMahan et al. 2018): each site's
delta is clipped to L2 norm S, the clipped deltas are summed, Gaussian noise
N(0, (z S)^2) is added, and the sum is divided by the public expected number
of sites q*K (never the realised count). Sites are Poisson-sampled with rate
q; the ledger records `PoissonSampledDpEvent(q, Gaussian(z))` per round for
every site (unit "site"). Optionally S adapts with a noised count
(`privacy.AdaptiveClipping` over sites).

With a noise strategy C (`privacy.correlated`, --noise_mechanism with
--unit=site) the server's noise is correlated over rounds instead: round r
adds (C^{-1} z)_r, z_r ~ N(0, (z S)^2) fresh from round r's key, through
`privacy.correlated_noise`, whose stream state is `ServerState.noise`
(checkpointed with the server state). Which sites train, and how the
rounds are accounted, is `privacy.correlated_plan.plan_server_mechanism`.
"""

import dataclasses
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import optax

from fedjax_seg import privacy
from fedjax_seg.privacy import correlated as correlated_lib
from fedjax_seg.privacy import keys as keys_lib

PyTree = chex.ArrayTree
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi")
WEIGHTINGS = ("num_examples", "uniform")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """Server optimizer and weighting.

  Attributes:
    optimizer: "fedavg", "fedavgm", "fedadam" or "fedyogi".
    learning_rate: server learning rate (1.0 for FedAvg).
    momentum: FedAvgM momentum.
    b1, b2, eps: FedAdam/FedYogi moments and adaptivity (tau).
    weighting: "num_examples" (N_k) or "uniform". Site-level DP always
      weighs uniformly (a weight would depend on private data sizes).
  """

  optimizer: str = "fedavg"
  learning_rate: float = 1.0
  momentum: float = 0.9
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-3
  weighting: str = "num_examples"

  def __post_init__(self):
    if self.optimizer not in SERVER_OPTIMIZERS:
      raise ValueError(f"server optimizer must be one of {SERVER_OPTIMIZERS},"
                       f" got {self.optimizer!r}.")
    if self.weighting not in WEIGHTINGS:
      raise ValueError(f"weighting must be one of {WEIGHTINGS}, got "
                       f"{self.weighting!r}.")
    if not self.learning_rate > 0:
      raise ValueError(f"server learning_rate must be > 0, got "
                       f"{self.learning_rate}.")

  def optimizer_transform(self, learning_rate=None
                          ) -> optax.GradientTransformation:
    """The server optimizer; `learning_rate` (maybe traced) overrides."""
    lr = self.learning_rate if learning_rate is None else learning_rate
    if self.optimizer == "fedavg":
      return optax.sgd(lr)
    if self.optimizer == "fedavgm":
      return optax.sgd(lr, momentum=self.momentum)
    if self.optimizer == "fedadam":
      return optax.adam(lr, b1=self.b1, b2=self.b2, eps=self.eps)
    return optax.yogi(lr, b1=self.b1, b2=self.b2, eps=self.eps)


@dataclasses.dataclass(frozen=True)
class SiteLevelDPConfig:
  """DP-FedAvg: clip each site's delta, noise the sum at the server.

  Attributes:
    l2_clip_norm: S (initial S with adaptive clipping).
    noise_multiplier: z (of the delta noise; with adaptive clipping, use
      `adaptive_clipping.gradient_noise_multiplier(target)` and account
      `accounted_noise_multiplier(z)`).
    expected_sites: q*K, the public expected number of sampled sites (with
      correlated noise, of the round's group).
    adaptive_clipping: optional `privacy.AdaptiveClipping` over sites.
    noise_strategy: C of correlated noise over rounds
      (`privacy.correlated.Strategy`), or None for independent noise.
  """

  l2_clip_norm: float
  noise_multiplier: float
  expected_sites: float
  adaptive_clipping: privacy.AdaptiveClipping | None = None
  noise_strategy: Any = None

  def noise_transform(self) -> optax.GradientTransformationExtraArgs:
    """The Gaussian mechanism over sites: independent, or correlated."""
    return correlated_lib.noise_transform(
        self.noise_strategy, self.noise_multiplier, l2_clip_norm=None,
        expected_batch_size=self.expected_sites)

  def __post_init__(self):
    if not self.l2_clip_norm > 0 or self.noise_multiplier < 0:
      raise ValueError("site-level DP needs l2_clip_norm > 0 and "
                       "noise_multiplier >= 0.")
    if not self.expected_sites > 0:
      raise ValueError(f"expected_sites must be > 0, got "
                       f"{self.expected_sites}.")


class ServerState(NamedTuple):
  params: PyTree
  opt_state: Any
  clip: Any  # AdaptiveClipState for site-level adaptive clipping, else ().
  # CorrelatedNoiseState of correlated site-level noise, else ().
  noise: Any = ()


class ServerMetrics(NamedTuple):
  """Site-level DP values applied this round (zeros without site-level DP)."""

  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array
  num_clipped: jax.Array
  num_participants: jax.Array


def _absent_to_zero(delta: jax.Array, keep: jax.Array) -> jax.Array:
  """delta [S, ...] with the rows of sites where `keep` [S] is False zeroed."""
  keep = keep.reshape(keep.shape + (1,) * (delta.ndim - 1))
  return jnp.where(keep, delta, jnp.zeros_like(delta))


def init_server_state(params: PyTree, config: ServerConfig,
                      site_dp: SiteLevelDPConfig | None) -> ServerState:
  clip = site_dp.adaptive_clipping.init() if (
      site_dp is not None and site_dp.adaptive_clipping is not None) else ()
  noise = (site_dp.noise_transform().init(params) if (
      site_dp is not None and site_dp.noise_strategy is not None) else ())
  return ServerState(params, config.optimizer_transform().init(params), clip,
                     noise)


def server_update(state: ServerState, deltas: PyTree, participating: jax.Array,
                  num_examples: jax.Array, config: ServerConfig,
                  site_dp: SiteLevelDPConfig | None, round_index,
                  root_key, learning_rate=None
                  ) -> tuple[ServerState, ServerMetrics]:
  """Aggregates the sites' deltas ([S, ...] leaves) into new server params.

  Non-participating sites (participating[k] False) contribute nothing, however
  their delta looks. `learning_rate` ([] array, maybe traced) overrides
  `config.learning_rate`.
  """
  part = participating.astype(jnp.float32)
  zero = jnp.zeros([], jnp.float32)
  noise_state = state.noise
  if site_dp is None:
    weights = part * (num_examples.astype(jnp.float32)
                      if config.weighting == "num_examples" else 1.0)
    total = jnp.maximum(jnp.sum(weights), 1e-12)
    # Select, not multiply: weight 0 times a NaN/inf delta of an absent site
    # would still be NaN.
    mean_delta = jax.tree.map(
        lambda d: jnp.tensordot(weights, _absent_to_zero(d, participating),
                                axes=1) / total, deltas)
    # With no participant the update is zero (and the state does not move).
    any_site = jnp.sum(part) > 0
    metrics = ServerMetrics(zero, zero, jnp.zeros([], jnp.int32),
                            jnp.sum(participating).astype(jnp.int32))
    clip_state = state.clip
  else:
    adaptive = site_dp.adaptive_clipping
    clip = state.clip.l2_clip_norm if adaptive else jnp.float32(
        site_dp.l2_clip_norm)
    norms = jax.vmap(optax.global_norm)(deltas)
    # Sites with a non-finite delta contribute zero (and count as clipped).
    finite = jnp.isfinite(norms)
    scale = jnp.where(finite, jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-12)),
                      0.0) * part
    # A non-finite or absent site's delta is replaced by zeros (a select),
    # so nothing of it reaches the sum.
    usable = participating & finite
    clipped_sum = jax.tree.map(
        lambda d: jnp.tensordot(scale, _absent_to_zero(d, usable), axes=1),
        deltas)
    # The same Gaussian mechanism as record-level DP, over sites; correlated
    # noise carries its stream across rounds (one release per round).
    mechanism = site_dp.noise_transform()
    correlated = site_dp.noise_strategy is not None
    mean_delta, noise_state = mechanism.update(
        clipped_sum,
        state.noise if correlated else mechanism.init(clipped_sum),
        l2_clip_norm=clip,
        noise_key=keys_lib.derive_key(
            root_key, round_index=round_index, site=0, step=0,
            purpose=keys_lib.Purpose.SERVER_NOISE))
    if not correlated:
      noise_state = ()
    any_site = jnp.array(True)  # Noise is released even with no participant.
    clip_state = state.clip
    if adaptive:
      clip_state = adaptive.update(
          state.clip, jnp.where(finite, norms, jnp.inf), participating,
          keys_lib.derive_key(root_key, round_index=round_index, site=0,
                              step=0,
                              purpose=keys_lib.Purpose.SERVER_CLIP_COUNT_NOISE))
    metrics = ServerMetrics(
        jnp.float32(site_dp.noise_multiplier), clip.astype(jnp.float32),
        jnp.sum(participating & ((norms > clip) | ~finite)).astype(jnp.int32),
        jnp.sum(participating).astype(jnp.int32))
  tx = config.optimizer_transform(learning_rate)
  pseudo_grad = jax.tree.map(lambda d: -d, mean_delta)
  updates, opt_state = tx.update(pseudo_grad, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: jnp.where(any_site, p + u, p),
                        state.params, updates)
  opt_state = jax.tree.map(lambda new, old: jnp.where(any_site, new, old),
                           opt_state, state.opt_state)
  return ServerState(params, opt_state, clip_state, noise_state), metrics

"""Adaptive clipping: the clip norm follows a quantile of the per-unit norms.

Two modes, both driven only by a NOISED statistic of the private norms, whose
privacy cost is folded into the noise multiplier the accountant records:

* "geometric" (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially
  private learning with adaptive clipping", NeurIPS): each step, count the
  sampled units whose norm is <= C, add Gaussian noise, and move C
  geometrically toward the target quantile gamma:
      b = (sum_i (1[|g_i| <= C] - 1/2) + N(0, sigma_b^2)) / B + 1/2
      C <- C * exp(-eta * (b - gamma))
  Centring the indicators makes the sum's sensitivity 1/2, so the count is a
  Gaussian mechanism with noise multiplier 2 * sigma_b.
* "percentile" (the ADP-FL recipe: set C to the p-th percentile of the
  per-unit norms), privatised: a histogram of the norms over a fixed,
  log-spaced grid of candidate thresholds gets Gaussian noise (std sigma_b per
  bin; one unit moves one bin by 1, so sensitivity 1 and noise multiplier
  sigma_b), and C moves to the first candidate whose noisy cumulative fraction
  reaches p (geometric smoothing with `learning_rate`, 1 = jump).

An un-noised percentile (or count) of private norms leaks: C would be an exact
order statistic of the sampled units' gradient norms, which can reveal one
unit's gradient norm (e.g. the maximum, or any norm when the batch is small),
and it is not accounted anywhere. This module refuses `count_noise_multiplier
<= 0`.

Accounting (Andrew et al., Section 3): the gradient (noise multiplier z_grad)
and the count (z_count) are two Gaussian mechanisms on the same sampled batch;
their composition is exactly one Gaussian mechanism with
    z = (z_grad^-2 + z_count^-2)^-1/2,
which is what the ledger records. To spend the budget of a target z, the
gradient noise is raised to z_grad = (z^-2 - z_count^-2)^-1/2
(`gradient_noise_multiplier`).
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

MODES = ("geometric", "percentile")
# L2 sensitivity of the count release to one unit: a centred indicator moves
# the geometric count by 1/2; one unit moves one histogram bin by 1.
_COUNT_SENSITIVITY = {"geometric": 0.5, "percentile": 1.0}


class AdaptiveClipState(NamedTuple):
  """State of `AdaptiveClipping`.

  Attributes:
    l2_clip_norm: [] float32, C to use at the next step.
    unclipped_fraction: [] float32, the last noised estimate of the fraction
      of units with norm <= C (a DP release; safe to log).
    count: [] int32, number of updates so far.
  """

  l2_clip_norm: jax.Array
  unclipped_fraction: jax.Array
  count: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveClipping:
  """Quantile-tracking clip norm with a noised, accounted signal.

  Attributes:
    initial_l2_clip_norm: C at step 0, > 0.
    target_quantile: gamma (geometric) or p (percentile) in (0, 1): the
      fraction of units that should be left unclipped.
    count_noise_multiplier: sigma_b > 0, std of the noise on the count (on
      each histogram bin in percentile mode), in units. Andrew et al. suggest
      about expected_batch_size / 20.
    expected_batch_size: the public expected number of units per step (q*N).
    learning_rate: eta (geometric; 0.2 in the paper) or the smoothing weight
      (percentile; 1 = move to the estimated percentile at once).
    mode: "geometric" or "percentile".
    min_l2_clip_norm, max_l2_clip_norm: public bounds on C (and the range of
      the percentile grid).
    num_bins: number of log-spaced candidate thresholds (percentile mode);
      the default grid steps by 11.5% per bin. More bins resolve C more
      finely but the noisy cumulative count sums the noise of more bins.

  Formal guarantees:
    * The only data-dependent input to C_{t+1} is a Gaussian-noised count
      (or histogram) of the sampled units; C_{t+1} is post-processing of it.
    * Together with the gradient step of noise multiplier z_grad, each step is
      one Poisson-sampled Gaussian mechanism with multiplier
      `accounted_noise_multiplier(z_grad)`; record that value in the ledger.
    * Unit: one example or group (whatever unit the norms are computed for);
      add/remove-one neighbours.
    * Not covered: JAX's non-cryptographic PRNG; floating-point attacks.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> ac = AdaptiveClipping(initial_l2_clip_norm=1.0, target_quantile=0.5,
    ...                       count_noise_multiplier=3.2,
    ...                       expected_batch_size=64)
    >>> state = ac.init()
    >>> norms = jnp.full((64,), 10.0)  # everything clipped: C must grow
    >>> state = ac.update(state, norms, jnp.ones(64, bool), jax.random.key(0))
    >>> bool(state.l2_clip_norm > 1.0)
    True
    >>> z_grad = ac.gradient_noise_multiplier(1.0)
    >>> round(ac.accounted_noise_multiplier(z_grad), 6)
    1.0
  """

  initial_l2_clip_norm: float
  target_quantile: float
  count_noise_multiplier: float
  expected_batch_size: float
  learning_rate: float = 0.2
  mode: str = "geometric"
  min_l2_clip_norm: float = 1e-3
  max_l2_clip_norm: float = 1e3
  num_bins: int = 128

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}.")
    if not self.count_noise_multiplier > 0:
      raise ValueError(
          "count_noise_multiplier must be > 0: an un-noised quantile or count "
          "of private per-example norms leaks them (an order statistic can "
          "equal one example's norm) and is not accounted. Use a fixed clip "
          "norm, or a noised estimate.")
    if not 0 < self.target_quantile < 1:
      raise ValueError(
          f"target_quantile must be in (0, 1), got {self.target_quantile}.")
    if not self.expected_batch_size > 0:
      raise ValueError(
          f"expected_batch_size must be > 0, got {self.expected_batch_size}.")
    if not 0 < self.min_l2_clip_norm < self.max_l2_clip_norm:
      raise ValueError("need 0 < min_l2_clip_norm < max_l2_clip_norm.")
    if not (self.min_l2_clip_norm <= self.initial_l2_clip_norm
            <= self.max_l2_clip_norm):
      raise ValueError(
          f"initial_l2_clip_norm={self.initial_l2_clip_norm} is outside "
          f"[{self.min_l2_clip_norm}, {self.max_l2_clip_norm}].")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
    if self.num_bins < 2:
      raise ValueError(f"num_bins must be >= 2, got {self.num_bins}.")

  @classmethod
  def with_noise_overhead(
      cls,
      *,
      noise_multiplier: float,
      overhead: float = 0.1,
      mode: str = "geometric",
      **kwargs,
  ) -> "AdaptiveClipping":
    """The count noise that costs a gradient-noise `overhead` at sigma z.

    To spend the budget of an accounted noise multiplier z on the pair
    (gradient, count), the gradient noise is raised to z_grad
    (`gradient_noise_multiplier`). This picks the smallest count noise with
    z_grad <= (1 + overhead) * z, i.e. a count mechanism multiplier
    z_count = z / sqrt(1 - (1 + overhead)^-2); for any smaller accounted
    sigma (another site, a later round of a decaying schedule) the overhead
    is smaller still. So pass the LARGEST z the run will account.

    Args:
      noise_multiplier: the largest accounted z of the run (> 0).
      overhead: allowed relative increase of the gradient noise (> 0); 0.1
        raises it by 10%.
      mode: "geometric" or "percentile".
      **kwargs: the other `AdaptiveClipping` fields (`initial_l2_clip_norm`,
        `target_quantile`, `expected_batch_size`, ...).
    """
    if not noise_multiplier > 0:
      raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}.")
    if not overhead > 0:
      raise ValueError(f"overhead must be > 0, got {overhead}.")
    sensitivity = _COUNT_SENSITIVITY[mode] if mode in MODES else 1.0
    count_mechanism = noise_multiplier / (1 - (1 + overhead) ** -2) ** 0.5
    return cls(count_noise_multiplier=sensitivity * count_mechanism,
               mode=mode, **kwargs)

  def gradient_noise_overhead(self, noise_multiplier: float) -> float:
    """z_grad / z - 1 at accounted z: how much more gradient noise the count
    release costs."""
    return self.gradient_noise_multiplier(noise_multiplier) / noise_multiplier - 1

  # -- accounting -------------------------------------------------------------

  @property
  def count_mechanism_noise_multiplier(self) -> float:
    """Noise multiplier of the count release: 2*sigma_b or sigma_b (see module)."""
    return self.count_noise_multiplier / _COUNT_SENSITIVITY[self.mode]

  def accounted_noise_multiplier(self, gradient_noise_multiplier: float) -> float:
    """z of the (gradient, count) pair: (z_grad^-2 + z_count^-2)^-1/2."""
    if gradient_noise_multiplier <= 0:
      return 0.0
    return (gradient_noise_multiplier ** -2
            + self.count_mechanism_noise_multiplier ** -2) ** -0.5

  def gradient_noise_multiplier(self, target_noise_multiplier: float) -> float:
    """z_grad such that the pair costs exactly `target_noise_multiplier`.

    Raises:
      ValueError: if the count alone already costs more than the target
        (z_count <= z): raise `count_noise_multiplier`.
    """
    z, zc = target_noise_multiplier, self.count_mechanism_noise_multiplier
    if not zc > z:
      raise ValueError(
          f"the clip-count release (noise multiplier {zc:.4g}) costs more than "
          f"the target noise multiplier {z:.4g}; raise count_noise_multiplier.")
    return (z ** -2 - zc ** -2) ** -0.5

  # -- the transform ----------------------------------------------------------

  def init(self) -> AdaptiveClipState:
    return AdaptiveClipState(
        l2_clip_norm=jnp.asarray(self.initial_l2_clip_norm, jnp.float32),
        unclipped_fraction=jnp.asarray(self.target_quantile, jnp.float32),
        count=jnp.zeros([], jnp.int32),
    )

  def candidate_thresholds(self) -> jax.Array:
    """[num_bins] log-spaced public grid of clip norms (percentile mode)."""
    return jnp.geomspace(self.min_l2_clip_norm, self.max_l2_clip_norm,
                         self.num_bins, dtype=jnp.float32)

  def update(
      self,
      state: AdaptiveClipState,
      per_example_norms: jax.Array,
      is_real: jax.Array,
      key: jax.Array,
  ) -> AdaptiveClipState:
    """Next C from this step's norms (measured with `state.l2_clip_norm`).

    Args:
      state: current state; its `l2_clip_norm` is the C the norms were clipped
        with.
      per_example_norms: [B] float32 pre-clipping norms (`ClipStats`); +inf
        for non-finite units (they count as clipped).
      is_real: [B] bool, False for padding (`ClipStats.is_real`).
      key: a fresh key (`Purpose.CLIP_COUNT_NOISE`), distinct from the one of
        the gradient noise.

    Returns:
      The new state. Jit/vmap compatible.
    """
    norms = per_example_norms.astype(jnp.float32)
    real = is_real.astype(jnp.bool_)
    batch = jnp.float32(self.expected_batch_size)
    clip = state.l2_clip_norm
    if self.mode == "geometric":
      centred = jnp.where(real, (norms <= clip).astype(jnp.float32) - 0.5, 0.0)
      noisy = jnp.sum(centred) + self.count_noise_multiplier * jax.random.normal(
          key, (), jnp.float32)
      fraction = noisy / batch + 0.5
      new_clip = clip * jnp.exp(-self.learning_rate * (fraction - self.target_quantile))
    else:
      grid = self.candidate_thresholds()
      # Bin j holds norms in (grid[j-1], grid[j]]; the last bin also holds
      # everything above the grid (and +inf).
      bins = jnp.minimum(jnp.searchsorted(grid, norms, side="left"),
                         self.num_bins - 1)
      hist = jnp.zeros((self.num_bins,), jnp.float32).at[bins].add(
          real.astype(jnp.float32))
      noisy_hist = hist + self.count_noise_multiplier * jax.random.normal(
          key, hist.shape, jnp.float32)
      cdf = jnp.cumsum(noisy_hist) / batch
      reached = cdf >= self.target_quantile
      index = jnp.where(jnp.any(reached), jnp.argmax(reached), self.num_bins - 1)
      # Noisy fraction unclipped at the current C, for logging.
      fraction = jnp.sum(jnp.where(grid <= clip, noisy_hist, 0.0)) / batch
      target = grid[index]
      new_clip = jnp.exp((1 - self.learning_rate) * jnp.log(clip)
                         + self.learning_rate * jnp.log(target))
    new_clip = jnp.clip(new_clip, self.min_l2_clip_norm, self.max_l2_clip_norm)
    return AdaptiveClipState(
        l2_clip_norm=new_clip.astype(jnp.float32),
        unclipped_fraction=fraction.astype(jnp.float32),
        count=state.count + 1,
    )


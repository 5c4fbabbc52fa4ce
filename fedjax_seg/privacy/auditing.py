"""One-run white-box privacy audit of DP-SGD with gradient canaries.

Steinke, Nasr and Jagielski 2023, "Privacy Auditing with One (1) Training
Run": m canaries, each included independently with probability 1/2, are
treated exactly like the units (examples or patients) of the audited site;
after training, every canary is scored and a statistical test turns the
scores of included and excluded canaries into a lower bound on epsilon that
holds with probability 1 - significance if the training is (eps, delta)-DP.
A bound above the ledger's epsilon would contradict the claimed guarantee.

The canaries here are white-box gradient canaries:
  * canary j is a fixed unit direction u_j in the flattened parameter space
    ("random": Gaussian, normalised; "dirac": one coordinate, distinct per
    canary), contributing C * u_j (norm C, the clip norm of the step, the
    largest contribution any unit can make) to the clipped sum;
  * at every local step of the audited site, each included canary is
    Poisson-sampled at the site's rate q, like a unit; its contribution is
    added to the clipped sum before the Gaussian noise, so a canary passes
    through exactly the mechanism the ledger accounts (untruncated Poisson
    sampling, noise sigma * C);
  * the observation is what DP-SGD releases: the noised gradient of every
    step of the audited site (white box). Its sum over steps is kept in the
    site's state, and canary j's score is <sum_t g_t, u_j>.

Keys (all from the run's root key, `privacy.keys`): which canaries are
included (`Purpose.AUDIT_INCLUSION`, round 0, the audited site, step 0), the
directions (`Purpose.AUDIT_DIRECTIONS`, same coordinates) and each step's
canary sample (`Purpose.AUDIT_CANARY_SAMPLE`, per round, site and step).

What the audit changes: only the audited site's clipped sums (its released
gradients, hence its update and, through the server, the global model).
Other sites' data, sampling, noise and keys are untouched; the ledger is
unchanged (canaries are units of the audited site at its own q, sigma and
C, so its accounting covers them). Adaptive clipping's count release does
not see the canaries: the audit tests the gradient release alone, which is
part of the accounted mechanism, so its bound stays a valid lower bound.

The statistics are jax_privacy's (`jax_privacy.auditing.CanaryScoreAuditor`):
`epsilon_one_run` (Steinke et al., Bonferroni over thresholds) and the
Gaussian-DP estimate `epsilon_from_gdp` (an estimate, not a bound; withheld
where the installed jax_privacy gives a positive figure on scores without
signal, see `gdp_estimator_is_sound`).
"""

import dataclasses
from typing import Any, NamedTuple

import jax
from jax import flatten_util
import jax.numpy as jnp
from jax_privacy import auditing as jp_auditing
import numpy as np
from scipy import stats

from fedjax_seg.privacy import keys as keys_lib

KINDS = ("random", "dirac")


@dataclasses.dataclass(frozen=True)
class AuditConfig:
  """Static settings of a canary audit.

  Attributes:
    num_canaries: m, the number of canaries (each included with prob. 1/2).
    kind: "random" (Gaussian unit directions) or "dirac" (one coordinate
      each; needs m <= the number of parameters).
    site: index of the audited site.
    max_per_step: most canaries one step adds ("random" only: each costs a
      parameter-sized Gaussian draw). A sample larger than this is cut to
      its first `max_per_step` canaries, which only removes contributions
      (the audited mechanism gets more private, the bound stays sound); the
      cut is counted. Choose it with `canary_capacity`.
    significance: 1 - confidence of the lower bound (0.05: 95%).
  """

  num_canaries: int = 1000
  kind: str = "random"
  site: int = 0
  max_per_step: int = 1000
  significance: float = 0.05

  def __post_init__(self):
    if self.num_canaries < 2:
      raise ValueError(f"audit num_canaries must be >= 2, got "
                       f"{self.num_canaries}.")
    if self.kind not in KINDS:
      raise ValueError(f"audit kind must be one of {KINDS}, got "
                       f"{self.kind!r}.")
    if self.site < 0:
      raise ValueError(f"audit site must be >= 0, got {self.site}.")
    if self.max_per_step < 1:
      raise ValueError(f"audit max_per_step must be >= 1, got "
                       f"{self.max_per_step}.")
    if not 0 < self.significance < 0.5:
      raise ValueError(f"audit significance must be in (0, 0.5), got "
                       f"{self.significance}.")


def canary_capacity(num_canaries: int, sampling_rate: float,
                    tail: float = 1e-9) -> int:
  """The smallest K with P(more than K of m/2 expected included canaries are
  sampled in a step) <= `tail` (Binomial(m, q / 2) upper tail), at least 1.
  """
  q = min(1.0, max(0.0, float(sampling_rate)))
  return int(max(1, min(num_canaries, stats.binom.isf(tail, num_canaries,
                                                       q / 2) + 1)))


class AuditState(NamedTuple):
  """What the audited site accumulates (kept in its `SiteState`).

  Attributes:
    observed: [d] float32, the sum over its local steps of the released
      (noised) gradient, flattened (`jax.flatten_util.ravel_pytree` order).
    sampled: [] int32, canary contributions added (all steps).
    cut: [] int32, sampled canaries left out by `max_per_step`.
  """

  observed: jax.Array
  sampled: jax.Array
  cut: jax.Array


def init_state(params) -> AuditState:
  d = flatten_util.ravel_pytree(params)[0].size
  return AuditState(jnp.zeros([d], jnp.float32), jnp.zeros([], jnp.int32),
                    jnp.zeros([], jnp.int32))


def inclusion(root_key: jax.Array, config: AuditConfig) -> jax.Array:
  """[m] bool: which canaries are included (each with probability 1/2)."""
  key = keys_lib.derive_key(root_key, round_index=0, site=config.site, step=0,
                            purpose=keys_lib.Purpose.AUDIT_INCLUSION)
  return jax.random.bernoulli(key, 0.5, (config.num_canaries,))


def directions_key(root_key: jax.Array, config: AuditConfig) -> jax.Array:
  """The key the canaries' directions derive from."""
  return keys_lib.derive_key(root_key, round_index=0, site=config.site,
                             step=0, purpose=keys_lib.Purpose.AUDIT_DIRECTIONS)


def _dirac_coordinates(key, config, dim):
  if config.num_canaries > dim:
    raise ValueError(f"dirac canaries need num_canaries <= the number of "
                     f"parameters ({dim}), got {config.num_canaries}.")
  return jax.random.permutation(key, dim)[:config.num_canaries]


def _random_direction(key, index, dim):
  u = jax.random.normal(jax.random.fold_in(key, index), (dim,), jnp.float32)
  return u / jnp.linalg.norm(u)


def canary_sum(key: jax.Array, config: AuditConfig,
               included: jax.Array, sample_key: jax.Array,
               sampling_rate: jax.Array, clip_norm: jax.Array, dim: int):
  """One step's canary contribution: ([d] C * sum of sampled u_j, number
  added, number cut). `key` is `directions_key(...)`; `included` is [m]
  bool (all False at other sites).
  """
  u = jax.random.uniform(sample_key, (config.num_canaries,))
  sampled = included & (u < sampling_rate)
  count = jnp.sum(sampled, dtype=jnp.int32)
  if config.kind == "dirac":
    coords = _dirac_coordinates(key, config, dim)
    total = jnp.zeros([dim], jnp.float32).at[coords].add(
        sampled.astype(jnp.float32))
    return clip_norm * total, count, jnp.zeros([], jnp.int32)
  capacity = min(config.max_per_step, config.num_canaries)
  index = jnp.nonzero(sampled, size=capacity, fill_value=0)[0]
  valid = jnp.arange(capacity) < count

  def add(total, j_and_valid):
    j, ok = j_and_valid
    return total + jnp.where(ok, _random_direction(key, j, dim), 0.0), None

  total, _ = jax.lax.scan(add, jnp.zeros([dim], jnp.float32), (index, valid))
  added = jnp.minimum(count, capacity)
  return clip_norm * total, added, count - added


def add_canaries(grad_sum, state: AuditState, *, key, config, included,
                 sample_key, sampling_rate, clip_norm):
  """`grad_sum` (a params pytree) plus this step's canaries, and the new
  counts. Skipped (lax.cond) at a site with no included canary."""
  flat, unravel = flatten_util.ravel_pytree(grad_sum)

  def with_canaries(_):
    return canary_sum(key, config, included, sample_key, sampling_rate,
                      clip_norm, flat.size)

  def without(_):
    return (jnp.zeros_like(flat), jnp.zeros([], jnp.int32),
            jnp.zeros([], jnp.int32))

  total, added, cut = jax.lax.cond(jnp.any(included), with_canaries, without,
                                   None)
  state = state._replace(sampled=state.sampled + added, cut=state.cut + cut)
  return unravel(flat + total.astype(flat.dtype)), state


def observe(state: AuditState, released_grad, audited: jax.Array
            ) -> AuditState:
  """Adds one step's released (noised) gradient to the observation when
  `audited` ([] bool: this is the audited site)."""
  flat = flatten_util.ravel_pytree(released_grad)[0].astype(jnp.float32)
  return state._replace(observed=state.observed + jnp.where(audited, flat,
                                                            0.0))


def scores(root_key: jax.Array, config: AuditConfig,
           observed: jax.Array) -> np.ndarray:
  """[m] canary scores <observed, u_j> (float64 on the host)."""
  observed = jnp.asarray(observed, jnp.float32)
  dim = observed.shape[0]
  key = directions_key(root_key, config)
  if config.kind == "dirac":
    return np.asarray(observed[_dirac_coordinates(key, config, dim)],
                      np.float64)
  score = jax.jit(jax.vmap(lambda j: _random_direction(key, j, dim)
                           @ observed))
  out = [np.asarray(score(jnp.arange(i, min(i + 64, config.num_canaries))))
         for i in range(0, config.num_canaries, 64)]
  return np.concatenate(out).astype(np.float64)


class AuditResult(NamedTuple):
  """The audit's figures.

  Attributes:
    epsilon_lower_bound: jax_privacy's `epsilon_one_run` (Bonferroni over
      thresholds): if the training is (eps, delta)-DP for the canaries'
      unit, eps >= this with probability >= 1 - significance.
    epsilon_gdp_estimate: jax_privacy's Gaussian-DP estimate (not a bound),
      or None when `gdp_estimator_is_sound()` is False.
    significance, delta: of the bound.
    num_canaries, num_included: m and how many were included.
    guesses, correct_guesses: the canaries guessed "included" (scores at or
      above the bound's threshold) and how many of them were.
  """

  epsilon_lower_bound: float
  epsilon_gdp_estimate: float | None
  significance: float
  delta: float
  num_canaries: int
  num_included: int
  guesses: int | None
  correct_guesses: int | None

  def to_dict(self) -> dict[str, Any]:
    return dict(self._asdict())


def _guess_counts(auditor, in_scores, out_scores, significance, delta):
  """(guesses, correct) behind `epsilon_one_run`'s Bonferroni bound: the
  canaries scoring at or above the threshold its search picked. This reads
  jax_privacy 2.0's internal search (the same call `epsilon_one_run` makes);
  (None, None) if a later version lacks it."""
  try:
    n = len(auditor._fn_counts)  # pylint: disable=protected-access
    _, threshold = auditor._epsilon_one_run_all_thresholds(  # pylint: disable=protected-access
        significance / n, delta, True, None)
  except (AttributeError, TypeError, ValueError):
    return None, None
  correct = int(np.sum(in_scores >= threshold))
  return correct + int(np.sum(out_scores >= threshold)), correct


def gdp_estimator_is_sound() -> bool:
  """Whether jax_privacy's `epsilon_from_gdp` gives 0 on scores without
  signal. jax_privacy 2.0.0 takes |mu| over thresholds as a shortcut for the
  reverse direction (fixed upstream in jax_privacy pull request 270) and
  returns 2-10 on pure noise at m = 1000, so its figure is withheld then."""
  rng = np.random.default_rng(0)
  scores_ = rng.normal(size=1000)
  included = rng.random(1000) < 0.5
  return jp_auditing.CanaryScoreAuditor(
      scores_[included], scores_[~included]).epsilon_from_gdp(0.05, 1e-5) == 0


def audit_from_scores(canary_scores: np.ndarray, included: np.ndarray,
                      delta: float, significance: float = 0.05
                      ) -> AuditResult:
  """The epsilon lower bound from canary scores (higher = "included")."""
  canary_scores = np.asarray(canary_scores, np.float64)
  included = np.asarray(included, bool)
  if canary_scores.shape != included.shape or canary_scores.ndim != 1:
    raise ValueError("canary scores and inclusion must be [m] arrays of the "
                     "same shape.")
  if included.all() or not included.any():
    raise ValueError("the audit needs both included and excluded canaries.")
  in_scores, out_scores = canary_scores[included], canary_scores[~included]
  auditor = jp_auditing.CanaryScoreAuditor(in_scores, out_scores)
  lower = float(auditor.epsilon_one_run(significance, delta))
  gdp = (float(auditor.epsilon_from_gdp(significance, delta))
         if gdp_estimator_is_sound() else None)
  guesses, correct = _guess_counts(auditor, in_scores, out_scores,
                                   significance, delta)
  return AuditResult(
      epsilon_lower_bound=lower, epsilon_gdp_estimate=gdp,
      significance=significance, delta=delta,
      num_canaries=int(included.size), num_included=int(included.sum()),
      guesses=guesses, correct_guesses=correct)

"""The plan of correlated noise in the sites (`privacy.correlated`).

From public numbers only (site sizes, batch, steps, rounds, the target):
the strategy C (jax_privacy's optimizers, once per process and setting),
each site's cyclic groups of units, the sampling they imply, the event of
every round and the calibrated noise multiplier of the fresh noise.
`plan.plan_noise` calls it for --noise_mechanism=banded or blt.

Example:
  >>> import numpy as np
  >>> mech = plan_mechanism("banded", ("a",), np.array([40]), np.array([True]),
  ...                       batch_size=4, local_steps=2, rounds=3,
  ...                       mf_bands=2, blt_max_buffers=1)
  >>> [mech.participations(r, 0) for r in range(3)]
  [1, 1, 1]
"""

import dataclasses
import math

import numpy as np

from fedjax_seg.privacy import batch_sizes
from fedjax_seg.privacy import calibration
from fedjax_seg.privacy import correlated
from fedjax_seg.privacy import events as events_lib

f32 = batch_sizes.f32


@dataclasses.dataclass(frozen=True)
class MechanismPlan:
  """Correlated noise in the sites: C and how the units participate.

  Attributes:
    kind: "banded" (cyclic Poisson sampling over `cycles` groups, amplified
      banded MF: each participation of a group is a DP-SGD step on it) or
      "blt" (each step trains one whole group; the stream is one Gaussian
      mechanism of sensitivity `Strategy.sensitivity_squared`).
    strategy: C.
    cycles: [S] b_k, site k's number of groups (unit i in group i mod b_k;
      stream step t trains group t mod b_k).
    group_sizes: [S] the largest group of each site, ceil(N_k / b_k).
    local_steps: steps per round (the stream of round r is its steps
      r * local_steps ... (r + 1) * local_steps - 1).
    sensitivity_squared: blt: [R + 1, S] ||C u||^2 of the worst b_k-
      separated participation over the first r rounds' steps; banded: None.
  """

  kind: str
  strategy: correlated.Strategy
  cycles: np.ndarray
  group_sizes: np.ndarray
  local_steps: int
  sensitivity_squared: np.ndarray | None = None
  independent_sigma: np.ndarray | None = None  # [S] DP-SGD's, same target.

  @property
  def column_norm(self) -> float:
    """||c||, banded C's largest column norm (its float32 values)."""
    return float(np.linalg.norm(np.asarray(self.strategy.coefs, np.float64)))

  def event_sigma(self, applied: float, round_index: int, k: int) -> float:
    """The noise multiplier of site k's round-`round_index` event when
    the fresh noise has multiplier `applied` (float32): banded,
    applied / ||c||; blt, applied / sqrt(the round's increase of the
    sensitivity^2) (Gaussian mechanisms compose by adding 1 / sigma^2,
    so the rounds' events compose to the whole stream's Gaussian)."""
    if self.kind == "banded":
      return applied / self.column_norm
    s2 = self.sensitivity_squared[:, k]
    return applied / math.sqrt(s2[round_index + 1] - s2[round_index])

  def participations(self, round_index: int, k: int) -> int:
    """Banded: the steps of round `round_index` in which group 0 of site k
    trains (the multiples of b_k among them). Group 0 has the most
    participations of any group in every prefix of the stream, so the
    rounds' counts compose to the worst group's ceil(steps / b_k)."""
    b, s = int(self.cycles[k]), self.local_steps
    ceil_div = lambda n: -(-n // b)  # noqa: E731
    return ceil_div((round_index + 1) * s) - ceil_div(round_index * s)

  def event(self, sigma: float, round_index: int, k: int,
            sampling_rate: float, max_batch_size: int):
    """Site k's event of round `round_index` whose recorded noise
    multiplier is `sigma` (see `event_sigma`)."""
    if self.kind == "blt":
      return events_lib.poisson_gaussian_event(sigma, 1.0, 1)
    # Banded: DP-SGD steps on the site's largest group (a no-op event in a
    # round where group 0 does not train).
    return events_lib.poisson_gaussian_event(
        sigma, sampling_rate, self.participations(round_index, k),
        dataset_size=int(self.group_sizes[k]), max_batch_size=max_batch_size)

  def model_noise_ratio(self, rounds: int, sigma: np.ndarray) -> np.ndarray:
    """[S] the RMS noise the model accumulates (prefix sums of the
    released noise over the site's steps, mean over steps) with this
    mechanism at `sigma`, over DP-SGD's at `independent_sigma` (the same
    target): below 1, the mechanism leaves less noise in the model."""
    n = rounds * self.local_steps
    rows = self.strategy.mean_prefix_rows(n)
    return (np.asarray(sigma) / self.independent_sigma) * math.sqrt(
        rows / ((n + 1) / 2))

  def to_dict(self) -> dict:
    return {"kind": self.kind, "strategy": self.strategy.to_dict(),
            "cycles": [int(b) for b in self.cycles],
            "group_sizes": [int(g) for g in self.group_sizes],
            "local_steps": self.local_steps}


def plan_mechanism(kind, names, units, training, batch_size, local_steps,
                   rounds, mf_bands, blt_max_buffers) -> MechanismPlan:
  """The strategy and the cyclic groups of every site."""
  steps = rounds * local_steps  # The stream of each site.
  if kind == "banded":
    cycles = np.full(len(units), mf_bands, np.int64)
    too_small = [names[k] for k in range(len(units))
                 if training[k] and math.ceil(units[k] / mf_bands)
                 < batch_size]
    if too_small:
      k = names.index(too_small[0])
      raise ValueError(
          f"--mf_bands={mf_bands}: site {too_small[0]!r} has {units[k]} "
          f"units, so its groups of ceil({units[k]}/{mf_bands}) are smaller "
          f"than the batch {batch_size}; use at most "
          f"{max(1, int(units[k]) // batch_size)} bands.")
    strategy = _optimized("banded", steps, mf_bands, 0)
  elif kind == "blt":
    cycles = np.maximum(1, units // batch_size)
    min_sep = int(cycles[np.asarray(training, bool)].min())
    strategy = _optimized("blt", steps, min_sep, blt_max_buffers)
  else:
    raise ValueError(f"mechanism must be one of {correlated.MECHANISMS}, "
                     f"got {kind!r}.")
  groups = np.array([correlated.cycle_groups(int(n), int(b))
                     for n, b in zip(units, cycles)], np.int64)
  sens = None
  if kind == "blt":
    sens = np.array([[strategy.sensitivity_squared(r * local_steps, int(b))
                      for b in cycles] for r in range(rounds + 1)])
  return MechanismPlan(kind, strategy, cycles, groups, local_steps, sens)


_STRATEGIES: dict = {}


def _optimized(kind: str, steps: int, bands_or_sep: int,
               max_buffers: int) -> correlated.Strategy:
  """An optimized strategy, once per process for the same settings (a
  sweep plans many members; a BLT takes seconds to optimize)."""
  key = (kind, steps, bands_or_sep, max_buffers)
  if key not in _STRATEGIES:
    _STRATEGIES[key] = (
        correlated.Strategy.optimized_banded(steps, bands_or_sep)
        if kind == "banded" else correlated.Strategy.optimized_blt(
            steps, bands_or_sep, max_buffers))
  return _STRATEGIES[key]


def sampling(mech: MechanismPlan, batch_size: int):
  """(rates, max batch): banded, Poisson rate B / G_k within the group of
  the step; blt, the whole group (rate 1, a batch of the largest group
  with one unit added, the neighbouring dataset's)."""
  if mech.kind == "banded":
    return batch_sizes.sampling_for(mech.group_sizes, batch_size)
  rates = np.ones(len(mech.group_sizes))
  return rates, int(mech.group_sizes.max()) + 1


def calibrate(mech, names, rates, max_batch, rounds, target_epsilon, delta,
              noise_multiplier, prior):
  """([S] sigma of the fresh noise, [R, S] the events' noise multipliers).

  With a target, each site's sigma is the smallest whose recorded events
  (after its prior events) meet it in a `PrivacyLedger`."""
  num = len(names)

  def recorded_for(sigma_f32: float, k: int) -> np.ndarray:
    return np.array([mech.event_sigma(sigma_f32, r, k) for r in range(rounds)])

  def events_for(sigma_f32, k):
    return [mech.event(float(e), r, k, float(rates[k]), max_batch)
            for r, e in enumerate(recorded_for(sigma_f32, k))]

  base = np.full(num, float(noise_multiplier))
  if target_epsilon is not None:
    solved = {}
    for k, name in enumerate(names):
      key = (int(mech.group_sizes[k]), int(mech.cycles[k]),
             repr(prior.get(name, ())))
      if key not in solved:
        try:
          solved[key] = calibration.calibrate_events(
              lambda sigma, k=k: events_for(f32(sigma), k), target_epsilon,
              delta, prior_events=prior.get(name, ()))
        except ValueError as e:
          raise ValueError(f"site {name!r}: {e}") from e
      base[k] = solved[key]
  recorded = np.stack([recorded_for(f32(base[k]), k) for k in range(num)],
                      axis=1)
  return base, recorded

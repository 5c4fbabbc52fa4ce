"""The plan of correlated noise in the sites (`privacy.correlated`).

From public numbers only (site sizes, batch, steps, rounds, the target):
the strategy C (jax_privacy's optimizers, once per process and setting),
each site's number of cyclic groups b_k, the sampling they imply, the event
of every round and the calibrated noise multiplier of the fresh noise.
`plan.plan_noise` calls it for --noise_mechanism=banded or blt.

Each unit's group is drawn uniformly and independently from a secret key
(`federated.sampling.cyclic_groups`; jax_privacy's INDEPENDENT partition,
the one add/remove-one DP allows): conditional on any draw a unit takes
part every b_k-th step of the stream, and the draw of the other units does
not depend on whether it is there. Group sizes are then random, so a step's
batch is never truncated: the maximum batch holds a whole site (B_max =
max N_k + 1), and the work still follows the realised sample.

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
  """Correlated noise in the sites (or at the server, `plan_server_mechanism`:
  one stream, one step per round, over the sites): each stream's C and how
  its units participate.

  Attributes:
    kind: "banded" (cyclic Poisson sampling over b_k groups, amplified
      banded MF: each participation of a group is a DP-SGD step on it) or
      "blt" (each step trains one whole group; the stream is one Gaussian
      mechanism of sensitivity `Strategy.sensitivity_squared`). A banded C
      with more bands than groups would be accounted as blt is
      (`amplified`); the planners never make one.
    strategies: [S] each site's C (banded: b_k bands; blt: optimized for
      participations b_k apart); sites with equal b_k share one.
    cycles: [S] b_k, site k's number of groups (each unit in one, drawn at
      random; stream step t trains group t mod b_k).
    local_steps: steps per round (the stream of round r is its steps
      r * local_steps ... (r + 1) * local_steps - 1).
    rounds: R, the rounds planned.
    sensitivity_squared: unamplified: [R + 1, S] ||C_k u||^2 of the worst
      b_k-separated participation over the first r rounds' steps;
      amplified: None.
    independent_sigma: [S] DP-SGD's sigma at the same target (the report's
      comparison), or None.
  """

  kind: str
  strategies: tuple
  cycles: np.ndarray
  local_steps: int
  rounds: int
  sensitivity_squared: np.ndarray | None = None
  independent_sigma: np.ndarray | None = None

  @property
  def stream(self) -> correlated.StreamShape:
    """The one streaming shape all sites' C are padded to."""
    return correlated.StreamShape.of(self.strategies)

  def stream_params(self) -> np.ndarray:
    """[S, ...] float32, each site's C padded to `stream`."""
    stream = self.stream
    return np.stack([stream.params(c) for c in self.strategies])

  @property
  def amplified(self) -> bool:
    """Whether the events are amplified banded MF: banded with no more
    bands than groups (a unit's columns never overlap). Otherwise the
    stream is one Gaussian mechanism of sensitivity `sensitivity_squared`
    and each step trains a whole group."""
    return self.kind == "banded" and all(
        len(c.coefs) <= b for c, b in zip(self.strategies, self.cycles))

  def expected_batch_sizes(self, units: np.ndarray) -> np.ndarray | None:
    """[S] what a site's noised sum is divided by, where it is not the
    --batch_size: unamplified (BLT) streams train whole groups, N_k / b_k
    units expected; amplified banded, None (its rate is chosen to expect
    the batch size)."""
    if self.amplified:
      return None
    return np.asarray(units) / self.cycles

  def column_norm(self, k: int) -> float:
    """||c_k||, banded C_k's largest column norm (its float32 values)."""
    return float(np.linalg.norm(np.asarray(self.strategies[k].coefs,
                                           np.float64)))

  def _increment(self, round_index: int, k: int) -> float:
    s2 = self.sensitivity_squared[:, k]
    return float(s2[round_index + 1] - s2[round_index])

  def event_sigma(self, applied: float, round_index: int, k: int) -> float:
    """The noise multiplier of site k's round-`round_index` event when
    the fresh noise has multiplier `applied` (float32): banded,
    applied / ||c_k||; blt, applied / sqrt(the round's increase of the
    sensitivity^2) (Gaussian mechanisms compose by adding 1 / sigma^2,
    so the rounds' events compose to the whole stream's Gaussian; a round
    that adds nothing to it records `applied` with a no-op event)."""
    if self.amplified:
      return applied / self.column_norm(k)
    increment = self._increment(round_index, k)
    return applied / math.sqrt(increment) if increment > 0 else applied

  def participations(self, round_index: int, k: int) -> int:
    """Banded: the steps of round `round_index` in which group 0 of site k
    trains (the multiples of b_k among them). Group 0 has the most
    participations of any group in every prefix of the stream, so the
    rounds' counts compose to the worst group's ceil(steps / b_k)."""
    b, s = int(self.cycles[k]), self.local_steps
    ceil_div = lambda n: -(-n // b)  # noqa: E731
    return ceil_div((round_index + 1) * s) - ceil_div(round_index * s)

  def counts(self, round_index: int, k: int) -> int:
    """The composition count of site k's event in a round: banded, group
    0's participations; blt, 1 (0 for a round that adds nothing)."""
    if not self.amplified:
      return int(self._increment(round_index, k) > 0)
    return self.participations(round_index, k)

  def event(self, sigma: float, round_index: int, k: int,
            sampling_rate: float):
    """Site k's event of round `round_index` whose recorded noise
    multiplier is `sigma` (see `event_sigma`): banded, Poisson-sampled
    Gaussian steps at the group's rate, one per participation of group 0
    (none in a round where it does not train); blt, one Gaussian (none in a
    round that adds nothing to the sensitivity). Never truncated."""
    return events_lib.poisson_gaussian_event(
        sigma, sampling_rate if self.amplified else 1.0,
        self.counts(round_index, k))

  def model_noise_ratio(self, rounds: int, sigma: np.ndarray) -> np.ndarray:
    """[S] the RMS noise the model accumulates (prefix sums of the
    released noise over the site's steps, mean over steps) with this
    mechanism at `sigma`, over DP-SGD's at `independent_sigma` (the same
    target): below 1, the mechanism leaves less noise in the model."""
    n = rounds * self.local_steps
    rows = {}
    for c in self.strategies:
      if c not in rows:
        rows[c] = c.mean_prefix_rows(n)
    ratio = np.array([rows[c] for c in self.strategies]) / ((n + 1) / 2)
    return np.asarray(sigma) / self.independent_sigma * np.sqrt(ratio)

  def to_dict(self) -> dict:
    return {"kind": self.kind,
            "strategy_per_site": [c.to_dict() for c in self.strategies],
            "cycles": [int(b) for b in self.cycles],
            "local_steps": self.local_steps,
            "event_counts_per_round": [
                [self.counts(r, k) for r in range(self.rounds)]
                for k in range(len(self.cycles))]}


def plan_mechanism(kind, names, units, training, batch_size, local_steps,
                   rounds, mf_bands, blt_max_buffers) -> MechanismPlan:
  """Each site's strategy and number of cyclic groups: b_k = N_k // B
  (at least 1; banded: at most --mf_bands), so that a group holds B units
  or more on average (the expected batch) and a site too small for b bands
  uses fewer (1: DP-SGD)."""
  del names, training  # Every site gets its own b_k.
  steps = rounds * local_steps  # The stream of each site.
  # Never more groups than steps (a group that never trains).
  cycles = np.clip(np.asarray(units) // batch_size, 1, steps)
  if kind == "banded":
    cycles = np.minimum(cycles, mf_bands)
    strategies = tuple(_optimized("banded", steps, int(b), 0)
                       for b in cycles)
  elif kind == "blt":
    strategies = tuple(_optimized("blt", steps, int(b), blt_max_buffers)
                       for b in cycles)
  else:
    raise ValueError(f"mechanism must be one of {correlated.MECHANISMS}, "
                     f"got {kind!r}.")
  return _with_sensitivity(
      MechanismPlan(kind, strategies, cycles, local_steps, rounds))


def _with_sensitivity(mech: MechanismPlan) -> MechanismPlan:
  """`mech` with the sensitivities of an unamplified stream."""
  if mech.amplified:
    return mech
  sens = np.array([[c.sensitivity_squared(r * mech.local_steps, int(b))
                    for c, b in zip(mech.strategies, mech.cycles)]
                   for r in range(mech.rounds + 1)])
  return dataclasses.replace(mech, sensitivity_squared=sens)


def server_cycles(kind: str, site_sampling_rate: float, mf_bands: int,
                  rounds: int) -> int:
  """b, the number of cyclic groups of sites at the server: floor(1 / q)
  (so a round expects about q K sites), banded at most --mf_bands, never
  more than the rounds."""
  groups = min(max(1, int(math.floor(1.0 / site_sampling_rate + 1e-9))),
               rounds)
  return min(groups, mf_bands) if kind == "banded" else groups


def server_round_rate(kind: str, site_sampling_rate: float, mf_bands: int,
                      rounds: int) -> float:
  """The chance that a given site trains in a given round: q_g / b (at
  most q for banded; 1 / b for BLT's whole groups), from the settings
  alone (the cohort slots of --num_sites are sized by it)."""
  b = server_cycles(kind, site_sampling_rate, mf_bands, rounds)
  if kind == "banded":
    return min(1.0, site_sampling_rate * b) / b
  return 1.0 / b


def plan_server_mechanism(kind: str, site_sampling_rate: float, rounds: int,
                          mf_bands: int, blt_max_buffers: int
                          ) -> MechanismPlan:
  """Correlated noise on DP-FedAvg's noised sum, over rounds (one stream,
  one step per round; every site's site-level ledger records its events).

  Each site is in one of b = `server_cycles` groups, drawn at random from
  the secret root; round r trains group r mod b. Banded: b bands, and the
  group's sites are Poisson-sampled at min(1, q b) (amplified banded MF, as
  in the sites). BLT: the whole group trains; the strategy is optimized for
  participations b apart and the stream is one Gaussian mechanism. With
  q = 1 (every site every round) b = 1: banded is then DP-SGD's noise, and
  the BLT optimizer's answer for participation in every round is the
  identity to 1e-7 (no Toeplitz factorisation lowers the prefix-sum error
  when every unit takes part in every step; `tests/privacy/
  test_correlated_server.py` checks this for banded strategies)."""
  b = server_cycles(kind, site_sampling_rate, mf_bands, rounds)
  strategy = (_optimized("banded", rounds, b, 0) if kind == "banded"
              else _optimized("blt", rounds, b, blt_max_buffers))
  return _with_sensitivity(
      MechanismPlan(kind, (strategy,), np.array([b]), 1, rounds))


def server_group_rate(mech: MechanismPlan, site_sampling_rate: float
                      ) -> float:
  """The Poisson rate of a site of the round's group: amplified banded,
  min(1, q b); otherwise 1 (the whole group)."""
  if not mech.amplified:
    return 1.0
  return min(1.0, site_sampling_rate * float(mech.cycles[0]))


def calibrate_independent_server(site_sampling_rate: float, rounds: int,
                                 target_epsilon, delta, prior) -> float:
  """DP-FedAvg's z with independent noise: the smallest whose R Poisson-
  sampled Gaussian rounds meet the target at every site."""
  return _calibrate_all_sites(
      lambda z: [events_lib.poisson_gaussian_event(
          f32(z), site_sampling_rate, 1)] * rounds, target_epsilon, delta,
      prior)


def _calibrate_all_sites(events_for, target_epsilon, delta, prior) -> float:
  """The largest over the training sites' prior events (`prior`, one
  sequence per training site) of the smallest z whose `events_for(z)` meet
  the target after them: every site meets it, the most spent one exactly."""
  solved = {}
  for events in list(prior) or [()]:
    key = repr(tuple(events))
    if key not in solved:
      solved[key] = calibration.calibrate_events(
          events_for, target_epsilon, delta, prior_events=tuple(events))
  return max(solved.values())


def calibrate_server(mech: MechanismPlan, group_rate: float, target_epsilon,
                     delta, noise_multiplier, prior) -> float:
  """z of the server's fresh noise: `noise_multiplier`, or with a target
  the smallest z whose site-level events (the one stream's, which every
  training site's ledger records after its own prior events, `prior`: one
  sequence per training site) meet it at every training site."""
  if target_epsilon is None:
    return float(noise_multiplier)

  def events_for(z):
    return [mech.event(mech.event_sigma(f32(z), r, 0), r, 0, group_rate)
            for r in range(mech.rounds)]

  return _calibrate_all_sites(events_for, target_epsilon, delta, prior)


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


def sampling(mech: MechanismPlan, units: np.ndarray, batch_size: int):
  """([S] rates, max batch): banded, Poisson rate min(1, B b_k / N_k)
  within the step's group (B units expected); blt, the whole group (rate
  1). The maximum batch is the largest site plus one unit (the
  neighbouring dataset's): random groups are never truncated."""
  units = np.asarray(units)
  rates = (np.minimum(1.0, batch_size * mech.cycles / units)
           if mech.amplified else np.ones(len(units)))
  return rates, int(units.max()) + 1


def calibrate(mech, names, rates, rounds, target_epsilon, delta,
              noise_multiplier, prior):
  """([S] sigma of the fresh noise, [R, S] the events' noise multipliers).

  With a target, each site's sigma is the smallest whose recorded events
  (after its prior events) meet it in a `PrivacyLedger`."""
  num = len(names)

  def recorded_for(sigma_f32: float, k: int) -> np.ndarray:
    return np.array([mech.event_sigma(sigma_f32, r, k) for r in range(rounds)])

  def events_for(sigma_f32, k):
    return [mech.event(float(e), r, k, float(rates[k]))
            for r, e in enumerate(recorded_for(sigma_f32, k))]

  base = np.full(num, float(noise_multiplier))
  if target_epsilon is not None:
    solved = {}
    for k, name in enumerate(names):
      key = (float(rates[k]), int(mech.cycles[k]), mech.strategies[k],
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

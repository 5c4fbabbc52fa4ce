"""Noise calibration: the smallest noise that meets an (epsilon, delta) target.

Uses `dp_accounting.calibrate_dp_mechanism` (Brent search over the parameter
with a fresh accountant per trial) on exactly the events `PrivacyLedger`
records, so a calibrated run lands on its target in the ledger.
"""

import json
from typing import Mapping, Sequence

import dp_accounting
from dp_accounting import pld
import numpy as np

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import events as events_lib
from fedjax_seg.privacy import schedules as schedules_lib

_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def schedule_event(
    scale: float,
    sampling_rate: float,
    steps: int,
    schedule: schedules_lib.Schedule | None = None,
) -> dp_accounting.DpEvent:
  """The event of `steps` steps with sigma_t = scale * schedule(t).

  Steps with equal sigma are grouped (composition is commutative), so a
  schedule that changes once per round costs one RDP evaluation per round.
  """
  return _grouped_event(scale, sampling_rate, _shape_groups(schedule, steps))


def _shape_groups(schedule, steps) -> list[tuple[float, int]]:
  """[(relative sigma, number of steps)] of a schedule shape (or constant 1)."""
  if schedule is None:
    return [(1.0, steps)]
  groups = schedules_lib.group_values(schedules_lib.evaluate(schedule, steps))
  if any(value <= 0 for value, _ in groups):
    raise ValueError("a noise schedule shape must be > 0 at every step.")
  return groups


def _grouped_event(scale, sampling_rate, groups) -> dp_accounting.DpEvent:
  events = [events_lib.poisson_gaussian_event(scale * value, sampling_rate, n)
            for value, n in groups]
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sampling_rate: float,
    steps: int,
    schedule: schedules_lib.Schedule | None = None,
    *,
    accountant: str = "rdp",
    tol: float = 1e-5,
    prior_events: Sequence[dp_accounting.DpEvent] = (),
) -> float:
  """Noise multiplier (or scale of a schedule shape) meeting a target epsilon.

  Formal guarantees:
    The returned sigma (constant) or scale s (sigma_t = s * schedule(t)) gives,
    for `steps` Poisson-sampled Gaussian steps at rate q and add/remove-one
    neighbours, epsilon <= `target_epsilon` at `delta` under the chosen
    accountant ("rdp", the one the ledger uses online, or "pld"), and is
    within `tol` of the smallest such value.

  Args:
    target_epsilon: epsilon to reach, > 0.
    delta: target delta in (0, 1).
    sampling_rate: Poisson rate q in (0, 1].
    steps: number of noisy steps, >= 1.
    schedule: optional shape `step -> relative sigma` (> 0); the result is
      then its scale.
    accountant: "rdp" or "pld".
    tol: absolute tolerance on the returned value.
    prior_events: events the same units already spent (e.g. a DP run this
      one starts from, on the same patients): the target is met by their
      composition with the new steps. Truncated sampling in them is
      accounted as untruncated here (`meet_target_in_ledger` then checks the
      ledger's exact figure).

  Returns:
    sigma (or the schedule's scale), a float.

  Raises:
    ValueError: if `prior_events` alone reach the target.

  Example:
    >>> sigma = calibrate_noise_multiplier(2.5966, 1e-5, 256 / 60000, 14062)
    >>> round(sigma, 3)
    1.1
  """
  if not target_epsilon > 0:
    raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}.")
  if not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")
  if not 0 < sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate}.")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}.")
  if accountant == "rdp":
    make_accountant = accounting.VectorizedRdpAccountant
  elif accountant == "pld":
    make_accountant = lambda: pld.PLDAccountant(_ADD_REMOVE)
  else:
    raise ValueError(f"accountant must be 'rdp' or 'pld', got {accountant!r}.")
  groups = _shape_groups(schedule, steps)  # Once, not once per trial.
  prior = [events_lib.poisson_equivalent(e)[0] for e in prior_events]
  if prior:
    spent = _epsilon(make_accountant, dp_accounting.ComposedDpEvent(prior),
                     delta)
    if not spent < target_epsilon:
      raise ValueError(f"the prior events alone reach epsilon {spent:.4g} >= "
                       f"the target {target_epsilon}.")
    make_event = lambda scale: dp_accounting.ComposedDpEvent(  # noqa: E731
        prior + [_grouped_event(scale, sampling_rate, groups)])
  else:
    make_event = lambda scale: _grouped_event(scale, sampling_rate, groups)
  if accountant == "rdp":
    # The search must start above 0: sigma = 0 is a non-private event.
    bracket = dp_accounting.LowerEndpointAndGuess(1e-3, 1.0)
  else:
    # PLD needs no more noise than RDP, and its discretisation of a very
    # small sigma can need tens of GB: bracket it below the RDP answer.
    upper = calibrate_noise_multiplier(
        target_epsilon, delta, sampling_rate, steps, schedule, tol=tol,
        prior_events=prior_events)
    lower = upper / 2
    while _epsilon(make_accountant, make_event(lower), delta) <= target_epsilon:
      upper, lower = lower, lower / 2
    bracket = dp_accounting.ExplicitBracketInterval(lower, upper)
  return float(dp_accounting.calibrate_dp_mechanism(
      make_accountant, make_event, target_epsilon, delta,
      bracket_interval=bracket, tol=tol))


def _epsilon(make_accountant, event, delta) -> float:
  accountant = make_accountant()
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def calibrate_site_noise_multipliers(
    target_epsilon: float,
    delta: float,
    *,
    site_sizes: Mapping[str, int],
    batch_size: int | Mapping[str, int],
    steps: int,
    schedule: schedules_lib.Schedule | None = None,
    accountant: str = "rdp",
    max_batch_size: int | None = None,
    steps_per_event: int = 1,
    prior_events: Mapping[str, Sequence[dp_accounting.DpEvent]] | None = None,
) -> dict[str, float]:
  """Site-adaptive noise: each site's sigma_k so all reach `target_epsilon`.

  With a common expected batch B, a small site has a large sampling rate
  q_k = B / N_k and would spend its budget faster under a common sigma; here
  each site gets the smallest sigma_k that keeps it at `target_epsilon` after
  `steps` local steps (all rounds).

  Args:
    target_epsilon, delta: the common target.
    site_sizes: {site: N_k}, number of privacy units (examples or patients).
    batch_size: expected batch B (common) or {site: B_k}.
    steps: planned local steps per site over the whole run.
    schedule: optional shape shared by all sites (each gets its own scale).
    accountant: "rdp" or "pld".
    max_batch_size: if given, every step's Poisson sample is truncated to at
      most this many units, and each sigma_k is then checked against exactly
      what a `PrivacyLedger` will record (see `meet_target_in_ledger`).
    steps_per_event: with `max_batch_size`, the ledger records one event per
      this many steps (e.g. a round's local steps; sigma must be constant
      within an event).
    prior_events: {site: events its units already spent} (composed into
      its ledger before these steps; see `calibrate_noise_multiplier`).

  Returns:
    {site: sigma_k} (or scales of `schedule`).

  Formal guarantees:
    With `max_batch_size` (and accountant "rdp"), a `PrivacyLedger` that
    records, for site k, its `prior_events` and then the events
    `planned_events(sigma_k, ...)` (float32 sigmas, as a device applies
    them) reports epsilon <= `target_epsilon`.

  Example:
    >>> sig = calibrate_site_noise_multipliers(
    ...     4.0, 1e-5, site_sizes={"small": 200, "large": 2000},
    ...     batch_size=16, steps=100)
    >>> sig["small"] > sig["large"]
    True
  """
  result, by_size = {}, {}
  for site, size in site_sizes.items():
    b = batch_size[site] if isinstance(batch_size, Mapping) else batch_size
    if size < 1 or b < 1:
      raise ValueError(f"site {site!r}: size {size} and batch {b} must be >= 1.")
    prior = tuple((prior_events or {}).get(site, ()))
    # Sites of the same size, batch and prior spending get the same sigma:
    # calibrate once (a consortium of 10,000 sites has a few hundred
    # distinct sizes). The prior events by their JSON form: a composed
    # event holds a list and cannot be hashed.
    key = (size, b, json.dumps([events_lib.event_to_dict(e) for e in prior],
                               sort_keys=True))
    if key in by_size:
      result[site] = by_size[key]
      continue
    rate = min(1.0, b / size)
    try:
      sigma = calibrate_noise_multiplier(target_epsilon, delta, rate, steps,
                                         schedule, accountant=accountant,
                                         prior_events=prior)
    except ValueError as e:
      raise ValueError(f"site {site!r}: {e}") from e
    if max_batch_size is not None:
      sigma = meet_target_in_ledger(
          sigma, target_epsilon, delta, sampling_rate=rate, steps=steps,
          schedule=schedule, steps_per_event=steps_per_event,
          dataset_size=int(size), max_batch_size=max_batch_size,
          prior_events=prior)
    result[site] = by_size[key] = sigma
  return result


def planned_events(
    scale: float,
    sampling_rate: float,
    steps: int,
    *,
    schedule: schedules_lib.Schedule | None = None,
    steps_per_event: int = 1,
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> list[dp_accounting.DpEvent]:
  """The events a ledger records for `steps` steps of sigma_t = scale * s(t).

  One event per `steps_per_event` steps, with the float32 sigma of the
  event's first step (what a device applies and reports back), truncated
  sampling if `max_batch_size` is given. `steps` must be a multiple of
  `steps_per_event` and the schedule constant within each event.
  """
  if steps_per_event < 1 or steps % steps_per_event:
    raise ValueError(f"steps ({steps}) must be a positive multiple of "
                     f"steps_per_event ({steps_per_event}).")
  shape = (schedules_lib.evaluate(schedule, steps) if schedule is not None
           else np.ones(steps))
  events = []
  for first in range(0, steps, steps_per_event):
    block = shape[first:first + steps_per_event]
    if not np.all(block == block[0]):
      raise ValueError(f"the schedule changes within the event of steps "
                       f"{first}..{first + steps_per_event - 1}.")
    sigma = float(np.float32(scale * float(block[0])))
    events.append(events_lib.poisson_gaussian_event(
        sigma, sampling_rate, steps_per_event, dataset_size=dataset_size,
        max_batch_size=max_batch_size))
  return events


def meet_target_in_ledger(
    sigma: float,
    target_epsilon: float,
    delta: float,
    *,
    sampling_rate: float,
    steps: int,
    dataset_size: int,
    max_batch_size: int,
    schedule: schedules_lib.Schedule | None = None,
    steps_per_event: int = 1,
    relative_margin: float = 1e-6,
    growth: float = 1.0005,
    max_tries: int = 200,
    prior_events: Sequence[dp_accounting.DpEvent] = (),
) -> float:
  """Raises a calibrated sigma until the ledger's figure meets the target.

  Calibration accounts untruncated Poisson sampling in float64; a ledger
  records truncated batches (adding the tiny truncation slack to delta) and
  the float32 sigma a device applied, which can tip the last digit over the
  target. This returns the smallest `sigma * growth**i` whose planned events
  (`planned_events`) give a `PrivacyLedger` epsilon <= target * (1 -
  relative_margin) (the margin absorbs conversions such as adaptive
  clipping's accounted noise multiplier), after the units' `prior_events`.

  Raises:
    ValueError: if no such sigma is found within `max_tries` steps.
  """
  spent = accounting.PrivacyLedger(["site"], delta=delta)
  for event in prior_events:  # Once: every try adds its plan to them.
    spent.record_event("site", event)
  for _ in range(max_tries):
    planned = planned_events(
        sigma, sampling_rate, steps, schedule=schedule,
        steps_per_event=steps_per_event, dataset_size=dataset_size,
        max_batch_size=max_batch_size)
    if spent.epsilon_if("site", planned) <= target_epsilon * (
        1 - relative_margin):
      return sigma
    sigma *= growth
  raise ValueError(f"could not meet target epsilon {target_epsilon} with "
                   f"truncation at {max_batch_size} units; raise the maximum "
                   "batch size.")


def calibrate_events(
    make_events,
    target_epsilon: float,
    delta: float,
    *,
    prior_events: Sequence[dp_accounting.DpEvent] = (),
    relative_tol: float = 1e-6,
    relative_margin: float = 1e-6,
) -> float:
  """The smallest float32 sigma whose events meet a target in a ledger.

  For mechanisms whose events are not a fixed Poisson-Gaussian shape (e.g.
  the matrix mechanism's per-round Gaussians, `privacy.plan`):
  `make_events(sigma)` gives the list of events a `PrivacyLedger` will
  record; the result is the smallest sigma (float32, to `relative_tol`)
  with ledger epsilon <= target * (1 - `relative_margin`) after
  `prior_events`, found by bisection (epsilon decreases in sigma).

  Raises:
    ValueError: if the prior events alone reach the target.
  """
  ledger = accounting.PrivacyLedger(["site"], delta=delta)
  for event in prior_events:
    ledger.record_event("site", event)
  goal = target_epsilon * (1 - relative_margin)
  if prior_events and not ledger.epsilon("site") < goal:
    raise ValueError(f"the prior events alone reach epsilon "
                     f"{ledger.epsilon('site'):.4g} >= the target "
                     f"{target_epsilon}.")

  def meets(sigma: float) -> bool:
    try:
      return ledger.epsilon_if("site", make_events(sigma)) <= goal
    except ValueError:  # E.g. truncation that costs delta at a large eps.
      return False

  high = 1.0
  while not meets(high):
    high *= 2
    if high > 1e6:
      raise ValueError(f"no noise multiplier up to 1e6 meets epsilon "
                       f"{target_epsilon}.")
  low = high / 2
  while meets(low) and low > 1e-3:
    high, low = low, low / 2
  while high - low > relative_tol * high:
    mid = (low + high) / 2
    if meets(mid):
      high = mid
    else:
      low = mid
  sigma = float(np.float32(high))
  while not meets(sigma):  # float32 rounding down.
    sigma = float(np.nextafter(np.float32(sigma), np.float32(np.inf)))
  return sigma

"""The noise plan: every round's sigma per site, the ledger's events, budgets.

A federated run under DP fixes, before its first round and from public
numbers only, what every round applies and accounts:

  * per site k, the sampling rate q_k = min(1, B / N_k) over its N_k units and
    a maximum batch (truncation probability at most 1e-12 per step);
  * per site, the base noise multiplier: --noise_multiplier, or calibrated so
    the site reaches a target epsilon after the rounds of its window (after
    any events its units already spent, e.g. a DP run it starts from);
  * per round, sigma = schedule shape(round) x base: what the device applies
    (raised to pay for a noised clip count under adaptive clipping) and what
    the ledger records (float32, as the device reports it);
  * under site-level DP (DP-FedAvg), the server's noise multiplier;
  * with correlated noise (`privacy.correlated`), the strategy matrix C, the
    cyclic groups of each site's units and the events of the matrix
    mechanism (`correlated_plan.MechanismPlan`).

`plan_noise` builds it from plain numbers (site sizes, batch, rounds,
windows, target, schedule shape): it reads no configuration object and no
data, so it is tested alone. A `NoisePlan` then answers the host loop's
privacy questions: which sites a round charges, whether a round would break
the budget, whether the device applied the plan, and it charges a round.

Example:
  >>> import numpy as np
  >>> plan = plan_noise(
  ...     site_names=("a", "b"), units=np.array([40, 400]), batch_size=8,
  ...     local_steps=1, rounds=10, target_epsilon=4.0, delta=1e-5)
  >>> bool(plan.base_sigma[0] > plan.base_sigma[1])  # The small site.
  True
  >>> ledger, site_ledger = plan.new_ledgers()
  >>> _ = plan.charge(ledger, site_ledger, 0, np.array([True, True]))
  >>> len(ledger.events("a"))
  1
"""

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import events as events_lib
from fedjax_seg.privacy import adaptive_clipping
from fedjax_seg.privacy import batch_sizes
from fedjax_seg.privacy import calibration
from fedjax_seg.privacy import correlated_plan
from fedjax_seg.privacy import schedules
from fedjax_seg.privacy import units as units_lib

# The batch numbers (re-exported: `plan.f32`, `plan.sampling_for`, ...).
f32 = batch_sizes.f32
max_batch_size_for = batch_sizes.max_batch_size_for
sampling_for = batch_sizes.sampling_for
TRUNCATION_TAIL = batch_sizes.TRUNCATION_TAIL


@dataclasses.dataclass(frozen=True)
class AdaptiveSettings:
  """Adaptive clipping of a clip norm through a noised clipped count.

  Attributes:
    mode: "geometric" (Andrew et al. 2021) or "percentile".
    target_quantile: the fraction of units left unclipped that is aimed at.
    learning_rate: geometric update rate (1.0 for percentile).
    count_noise_multiplier: the count's noise; 0 picks the smallest that
      raises the gradient noise by at most 10% for the largest sigma.
  """

  mode: str
  target_quantile: float
  learning_rate: float
  count_noise_multiplier: float = 0.0

  def build(self, initial_l2_clip_norm: float, expected_batch_size: float,
            largest_sigma: float) -> adaptive_clipping.AdaptiveClipping:
    """The transform's settings, its count noise in float32 (what a device
    draws, and so what is accounted)."""
    kwargs = dict(initial_l2_clip_norm=initial_l2_clip_norm,
                  target_quantile=self.target_quantile,
                  expected_batch_size=expected_batch_size,
                  learning_rate=self.learning_rate, mode=self.mode)
    if self.count_noise_multiplier:
      adaptive = adaptive_clipping.AdaptiveClipping(
          count_noise_multiplier=self.count_noise_multiplier, **kwargs)
    else:
      # The default count noise raises the gradient noise by 10% for the
      # largest sigma of the run (less for every other site and round).
      adaptive = adaptive_clipping.AdaptiveClipping.with_noise_overhead(
          noise_multiplier=largest_sigma, overhead=0.1, **kwargs)
    return dataclasses.replace(
        adaptive, count_noise_multiplier=f32(adaptive.count_noise_multiplier))


@dataclasses.dataclass
class NoisePlan:
  """Everything a run's DP mechanism applies and accounts, fixed in advance.

  Every value is public: a function of the settings and of the sites' unit
  counts, never of the data's content. Arrays are over sites [S] or rounds
  and sites [R, S].
  """

  site_names: tuple
  unit: units_lib.PrivacyUnit
  units: np.ndarray  # [S] N_k in privacy units.
  sampling_rates: np.ndarray  # [S] q_k.
  max_batch_size: int
  local_steps: int
  delta: float
  record_level: bool
  use_site_level: bool
  base_sigma: np.ndarray  # [S] before the schedule.
  accounted_sigma: np.ndarray  # [R, S]
  applied_sigma: np.ndarray  # [R, S] what the device applies.
  recorded_sigma: np.ndarray  # [R, S] what the ledger records.
  adaptive: adaptive_clipping.AdaptiveClipping | None
  site_adaptive: adaptive_clipping.AdaptiveClipping | None
  site_applied_sigma: float  # z of the server noise (float32).
  site_recorded_sigma: float
  site_sampling_rate: float
  training_sites: np.ndarray  # [S] bool (held-out sites excluded).
  active: np.ndarray | None = None  # [R, S] bool: in the federation.
  prior_events: Mapping = dataclasses.field(default_factory=dict)
  prior_site_level_events: Mapping = dataclasses.field(default_factory=dict)
  mechanism: correlated_plan.MechanismPlan | None = None  # Independent: None
  # DP-FedAvg's correlated noise over rounds (--unit=site), else None; the
  # Poisson rate of a site of the round's group.
  site_mechanism: correlated_plan.MechanismPlan | None = None
  site_group_rate: float = 1.0

  # -- what a round charges ---------------------------------------------------

  def record_level_event(self, round_index: int, k: int):
    """The record-level ledger's event of site k in a round."""
    if self.mechanism is not None:
      return self.mechanism.event(float(self.recorded_sigma[round_index, k]),
                                  round_index, k,
                                  float(self.sampling_rates[k]))
    return events_lib.poisson_gaussian_event(
        float(self.recorded_sigma[round_index, k]),
        float(self.sampling_rates[k]), self.local_steps,
        dataset_size=int(self.units[k]), max_batch_size=self.max_batch_size)

  def site_level_event(self, round_index: int):
    """The site-level ledger's event of a round (every training site)."""
    mech = self.site_mechanism
    if mech is not None:
      return mech.event(mech.event_sigma(self.site_applied_sigma,
                                         round_index, 0),
                        round_index, 0, self.site_group_rate)
    return events_lib.poisson_gaussian_event(
        self.site_recorded_sigma, self.site_sampling_rate, 1)

  @property
  def expected_sites(self) -> float:
    """What DP-FedAvg divides the noised sum by: q K, or with correlated
    noise the expected sites of a round's group (q_g K / b)."""
    training = int(self.training_sites.sum())
    if self.site_mechanism is None:
      return self.site_sampling_rate * training
    return self.site_group_rate * training / float(
        self.site_mechanism.cycles[0])

  def charged_sites(self, participating: np.ndarray) -> np.ndarray:
    """[S] bool: the sites the record-level ledger charges this round.

    Without site-level DP, the sites that train (drawn from the noise root,
    independently of the data, so public). With site-level DP the sampled
    set must stay hidden (the site-level guarantee relies on it), so every
    training site is charged every round: an upper bound for the sites that
    did not train, and a ledger that reveals nothing.
    """
    return self.training_sites if self.use_site_level else participating

  def _charges(self, round_index: int, participating: np.ndarray):
    """[(which ledger, site index, event)] of a round."""
    out = []
    if self.record_level:
      out += [("record", k, self.record_level_event(round_index, k))
              for k in np.flatnonzero(self.charged_sites(participating))]
    if self.use_site_level:
      out += [("site", k, self.site_level_event(round_index))
              for k in np.flatnonzero(self.training_sites)]
    return out

  def budget_stop(self, ledger: accounting.PrivacyLedger,
                  site_ledger: accounting.PrivacyLedger, round_index: int,
                  participating: np.ndarray, budget: float | None
                  ) -> str | None:
    """The stop reason if the round would take any site it charges, in any
    ledger in use, past `budget` (with the values it would record)."""
    if budget is None:
      return None
    for which, k, event in self._charges(round_index, participating):
      target = ledger if which == "record" else site_ledger
      name = self.site_names[k]
      would = target.epsilon_if(name, event)
      if would > budget:
        label = units_lib.PrivacyUnit(target.unit).epsilon_label
        return (f"budget: round {round_index + 1} would take site {name!r} "
                f"to {which}-level {label} {would:.3f} > budget {budget}")
    return None

  def check_applied(self, round_index: int, participating: np.ndarray, *,
                    noise_multiplier, steps, sampling_rate,
                    server_noise_multiplier=None) -> None:
    """Raises AssertionError unless the device applied exactly the plan:
    each participating site's sigma, local steps and q, and the server's z."""
    if self.record_level:
      for k in np.flatnonzero(participating):
        got, want = float(noise_multiplier[k]), f32(
            self.applied_sigma[round_index, k])
        if got != want or int(steps[k]) != self.local_steps or not (
            math.isclose(float(sampling_rate[k]), self.sampling_rates[k],
                         rel_tol=1e-6)):
          raise AssertionError(
              f"site {self.site_names[k]}: applied sigma {got}, steps "
              f"{int(steps[k])}, q {float(sampling_rate[k])} != planned "
              f"{want}, {self.local_steps}, {self.sampling_rates[k]}")
    if self.use_site_level and float(
        server_noise_multiplier) != self.site_applied_sigma:
      raise AssertionError(f"server: applied z {float(server_noise_multiplier)}"
                           f" != planned {self.site_applied_sigma}")

  def charge(self, ledger: accounting.PrivacyLedger,
             site_ledger: accounting.PrivacyLedger, round_index: int,
             participating: np.ndarray) -> np.ndarray:
    """Records a round in the ledgers; returns the indices of the sites the
    record-level ledger charged."""
    charges = self._charges(round_index, participating)
    # All charged sites' RDP in one vectorised evaluation.
    ledger.record_events({self.site_names[k]: event
                          for which, k, event in charges if which == "record"})
    for which, k, event in charges:
      if which == "site":
        site_ledger.record_event(self.site_names[k], event)
    return np.array([k for which, k, _ in charges if which == "record"], int)

  def main_ledger(self, ledger, site_ledger):
    """Of the (record-level, site-level) ledgers, the one of the run's
    unit: the record-level one if DP-SGD runs in the sites, else the
    site-level one."""
    return ledger if self.record_level else site_ledger

  def new_ledgers(self, orders: Sequence[float] | None = None):
    """(record-level, site-level) ledgers holding the prior events."""
    kwargs = {} if orders is None else {"orders": orders}
    ledger = accounting.PrivacyLedger(self.site_names, delta=self.delta,
                                      unit=self.unit, **kwargs)
    site_ledger = accounting.PrivacyLedger(
        self.site_names, delta=self.delta, unit=units_lib.PrivacyUnit.SITE,
        **kwargs)
    for target, prior in ((self.main_ledger(ledger, site_ledger),
                           self.prior_events),
                          (site_ledger, self.prior_site_level_events)):
      for site, events in prior.items():
        for event in events:
          target.record_event(site, event)
    return ledger, site_ledger

  def prior_epsilon_at_least(self, budget: float) -> tuple[str, float] | None:
    """(site, epsilon) of a site whose prior events alone spend `budget` or
    more, or None."""
    ledger, site_ledger = self.new_ledgers()
    for target, prior in ((self.main_ledger(ledger, site_ledger),
                           self.prior_events),
                          (site_ledger, self.prior_site_level_events)):
      for site in prior:
        if target.epsilon(site) >= budget:
          return site, target.epsilon(site)
    return None

  # -- resumption ----------------------------------------------------------

  def to_meta(self) -> dict:
    """What a checkpoint keeps to refuse a resumption that changes it."""
    def count(ac):
      return None if ac is None else ac.count_noise_multiplier

    return {"recorded_sigma": self.recorded_sigma.tolist(),
            "applied_sigma": np.vectorize(f32)(self.applied_sigma).tolist(),
            "site_recorded_sigma": self.site_recorded_sigma,
            "site_applied_sigma": self.site_applied_sigma,
            "count_noise_multiplier": count(self.adaptive),
            "site_count_noise_multiplier": count(self.site_adaptive),
            "noise_mechanism": (None if self.mechanism is None
                                else self.mechanism.to_dict()),
            "site_noise_mechanism": (None if self.site_mechanism is None
                                     else self.site_mechanism.to_dict())}

  def same_planned_noise(self, saved: Mapping) -> bool:
    """Whether every round planned in both `saved` (a `to_meta`) and this
    plan has the same noise: a rerun round under the same keys with another
    sigma would draw the same Gaussian at two scales (their difference
    cancels the noise)."""
    now = self.to_meta()
    n = min(len(saved["recorded_sigma"]), len(now["recorded_sigma"]))
    return all(
        np.array_equal(np.asarray(saved[key][:n], np.float64),
                       np.asarray(now[key][:n], np.float64))
        for key in ("recorded_sigma", "applied_sigma")) and all(
            saved.get(key) == now[key] for key in (
                "site_recorded_sigma", "site_applied_sigma",
                "count_noise_multiplier", "site_count_noise_multiplier",
                "noise_mechanism", "site_noise_mechanism"))


def plan_noise(
    *,
    site_names: Sequence[str],
    units: np.ndarray,
    batch_size: int,
    local_steps: int,
    rounds: int,
    delta: float,
    unit: str = "example",
    record_level: bool = True,
    noise_multiplier: float = 1.0,
    target_epsilon: float | None = None,
    schedule_shape: schedules.Schedule | None = None,
    windows: np.ndarray | None = None,
    training_sites: np.ndarray | None = None,
    active: np.ndarray | None = None,
    l2_clip_norm: float = 1.0,
    adaptive: AdaptiveSettings | None = None,
    use_site_level: bool = False,
    site_noise_multiplier: float = 0.0,
    site_sampling_rate: float = 1.0,
    site_clip_norm: float = 1.0,
    site_adaptive: AdaptiveSettings | None = None,
    prior_events: Mapping | None = None,
    prior_site_level_events: Mapping | None = None,
    mechanism: str = "independent",
    mf_bands: int = 1,
    blt_max_buffers: int = 4,
    site_mechanism: str = "independent",
    site_target_epsilon: float | None = None,
) -> NoisePlan:
  """The plan of a run, from plain numbers.

  Args:
    site_names: [S] site names.
    units: [S] training units per site (N_k >= 1).
    batch_size: expected units per step B (q_k = min(1, B / N_k)).
    local_steps: steps per round (one ledger event per round and site).
    rounds: R, the rounds planned.
    delta: the ledgers' delta.
    unit: "example", "patient" or "site" (the main ledger's unit).
    record_level: DP-SGD in every site.
    noise_multiplier: the base sigma when `target_epsilon` is None.
    target_epsilon: calibrate each site's base sigma to end its window here.
    schedule_shape: `round -> relative sigma` (1 at round 0; e.g.
      `schedules.named_shape`); None: constant. Each round's sigma is the
      site's base sigma times its value.
    windows: [S, 2] (first round, end round) each site is in the federation
      (calibration covers those rounds); None: all rounds.
    training_sites: [S] bool, False for held-out sites; None: all.
    active: [R, S] bool membership per round (scenarios), or None.
    l2_clip_norm: the record-level clip norm (initial, if adaptive).
    adaptive: adaptive clipping of the record-level clip norm, or None.
    use_site_level: DP-FedAvg at the server (on top of, or instead of,
      record-level DP).
    site_noise_multiplier, site_sampling_rate, site_clip_norm: DP-FedAvg's
      z, Poisson rate of sites and clip norm.
    site_adaptive: adaptive clipping of the site clip norm (site-level DP
      without record-level DP), or None.
    prior_events: {site: events its units already spent} (a DP run on the
      same patients this one starts from): composed first, and the
      calibration aims at the total.
    prior_site_level_events: the same for the site-level ledger.
    mechanism: the record-level noise: "independent" (DP-SGD), "banded"
      (banded MF with `mf_bands` cyclic groups per site) or "blt" (a BLT
      of at most `blt_max_buffers` buffers; site k's units in N_k // B
      groups). Correlated noise needs a constant schedule, no adaptive
      clipping and every site in every round (`correlated_plan`).
    site_mechanism: DP-FedAvg's noise over rounds: "independent", or
      "banded"/"blt" over cyclic groups of sites
      (`correlated_plan.plan_server_mechanism`; not with site adaptive
      clipping).
    site_target_epsilon: calibrate DP-FedAvg's z so that every site's
      site-level epsilon ends here (None: `site_noise_multiplier`).

  Raises:
    ValueError: a site without units, or a calibration that cannot meet
      the target (e.g. the prior events alone reach it).
  """
  names = tuple(site_names)
  units = np.asarray(units, np.int64)
  if np.any(units < 1):
    raise ValueError(f"sites {[names[k] for k in np.flatnonzero(units < 1)]}"
                     " have no training units.")
  schedule_shape = schedule_shape or schedules.constant_schedule(1.0)
  shape = schedules.evaluate(schedule_shape, rounds)  # [R], float64.
  rates, max_batch = sampling_for(units, batch_size)
  if windows is None:
    windows = np.tile([0, rounds], (len(units), 1))
  training = (np.ones(len(units), bool) if training_sites is None
              else np.asarray(training_sites, bool))
  prior = dict(prior_events or {})
  site_prior = dict(prior_site_level_events or {})
  # The site-level ledger's prior: with --unit=site it is the main ledger,
  # which holds `prior_events` too (`new_ledgers`).
  ledger_prior = site_prior if record_level else {
      s: tuple(prior.get(s, ())) + tuple(site_prior.get(s, ()))
      for s in names}
  site_fields = _site_level_fields(
      use_site_level=use_site_level, record_level=record_level,
      training=training, rounds=rounds, delta=delta,
      z=site_noise_multiplier, sampling_rate=site_sampling_rate,
      clip_norm=site_clip_norm, adaptive=site_adaptive,
      calibration_priors=[ledger_prior.get(s, ()) for s, t in
                          zip(names, training) if t],
      mechanism=site_mechanism, target_epsilon=site_target_epsilon,
      mf_bands=mf_bands, blt_max_buffers=blt_max_buffers)
  site_fields["prior_site_level_events"] = site_prior
  if record_level and mechanism != "independent":
    if np.any(shape != 1.0) or adaptive is not None or (
        active is not None and not np.all(active)):
      raise ValueError(
          f"the {mechanism} mechanism needs a constant noise schedule, no "
          "adaptive clipping and every site in every round (its analyses "
          "assume one noise scale and a fixed participation pattern).")
    mech = correlated_plan.plan_mechanism(
        mechanism, names, units, training, batch_size, local_steps, rounds,
        mf_bands, blt_max_buffers)
    mech_rates, mech_max_batch = correlated_plan.sampling(mech, units,
                                                          batch_size)
    base, recorded = correlated_plan.calibrate(
        mech, names, mech_rates, rounds, target_epsilon, delta,
        noise_multiplier, prior)
    return NoisePlan(
        site_names=names, unit=units_lib.PrivacyUnit(unit), units=units,
        sampling_rates=mech_rates, max_batch_size=mech_max_batch,
        local_steps=local_steps, delta=delta, record_level=True,
        use_site_level=use_site_level, base_sigma=base,
        accounted_sigma=np.tile(base, (rounds, 1)),
        applied_sigma=np.tile(np.vectorize(f32)(base), (rounds, 1)),
        recorded_sigma=recorded, adaptive=None, active=None,
        prior_events=prior, **site_fields,
        # DP-SGD's sigma at the same target, for the report's comparison.
        mechanism=dataclasses.replace(mech, independent_sigma=(
            _calibrate(names, units, batch_size, local_steps, schedule_shape,
                       windows, target_epsilon, delta, max_batch, prior)
            if target_epsilon is not None else base)))
  if record_level and target_epsilon is not None:
    base = _calibrate(names, units, batch_size, local_steps, schedule_shape,
                      windows, target_epsilon, delta, max_batch, prior)
  else:
    base = np.full(len(units), noise_multiplier if record_level else 0.0)
  accounted = shape[:, None] * base[None, :]
  # The count release must cost less than every site's total noise: size it
  # from the largest sigma any site will use.
  record_adaptive = None if adaptive is None or not record_level else (
      adaptive.build(l2_clip_norm, batch_size,
                     float(accounted.max()) or 1.0))
  if record_adaptive is None:
    applied = accounted
    recorded = np.vectorize(f32)(accounted)
  else:
    applied = np.vectorize(
        lambda z: record_adaptive.gradient_noise_multiplier(z) if z > 0
        else 0.0)(accounted)
    recorded = np.vectorize(
        lambda z: record_adaptive.accounted_noise_multiplier(f32(z)))(applied)
  return NoisePlan(
      site_names=names, unit=units_lib.PrivacyUnit(unit), units=units,
      sampling_rates=rates, max_batch_size=max_batch, local_steps=local_steps,
      delta=delta, record_level=record_level, use_site_level=use_site_level,
      base_sigma=base, accounted_sigma=accounted, applied_sigma=applied,
      recorded_sigma=np.asarray(recorded, np.float64),
      adaptive=record_adaptive, active=active, prior_events=prior,
      **site_fields)


def _site_level_fields(*, use_site_level, record_level, training, rounds,
                       delta, z, sampling_rate, clip_norm, adaptive,
                       calibration_priors, mechanism, target_epsilon,
                       mf_bands, blt_max_buffers) -> dict:
  """The `NoisePlan` fields of DP-FedAvg at the server.

  `calibration_priors`: each training site's prior site-level events, which
  a calibrated z must compose with."""
  prior = calibration_priors
  out = dict(site_adaptive=None, site_applied_sigma=0.0,
             site_recorded_sigma=0.0, site_sampling_rate=sampling_rate,
             training_sites=training, site_mechanism=None,
             site_group_rate=1.0)
  if not use_site_level:
    return out
  if mechanism != "independent":
    if adaptive is not None and not record_level:
      raise ValueError(f"the {mechanism} mechanism at the server needs a "
                       "fixed site clip norm (no adaptive clipping).")
    mech = correlated_plan.plan_server_mechanism(
        mechanism, sampling_rate, rounds, mf_bands, blt_max_buffers)
    rate = correlated_plan.server_group_rate(mech, sampling_rate)
    independent = z if target_epsilon is None else (
        correlated_plan.calibrate_independent_server(
            sampling_rate, rounds, target_epsilon, delta, prior))
    z = correlated_plan.calibrate_server(mech, rate, target_epsilon, delta,
                                         z, prior)
    # Independent DP-FedAvg's z at the same target, for the report.
    mech = dataclasses.replace(mech, independent_sigma=np.array(
        [independent]))
    return dict(out, site_applied_sigma=f32(z), site_recorded_sigma=f32(z),
                site_mechanism=mech, site_group_rate=rate)
  if target_epsilon is not None:
    z = correlated_plan.calibrate_independent_server(
        sampling_rate, rounds, target_epsilon, delta, prior)
  if adaptive is not None and not record_level:
    server_adaptive = adaptive.build(
        clip_norm, sampling_rate * int(training.sum()), z or 1.0)
    applied = f32(server_adaptive.gradient_noise_multiplier(z))
    return dict(out, site_adaptive=server_adaptive, site_applied_sigma=applied,
                site_recorded_sigma=server_adaptive.accounted_noise_multiplier(
                    applied))
  return dict(out, site_applied_sigma=f32(z), site_recorded_sigma=f32(z))


def _calibrate(names, units, batch_size, local_steps, schedule_shape, windows,
               target_epsilon, delta, max_batch, prior) -> np.ndarray:
  """[S] base sigmas: each site calibrated for the rounds of its window
  (with the schedule's values of those rounds) after its prior events."""
  shape = schedule_shape
  sigmas = {}
  for first, end in sorted({tuple(w) for w in np.asarray(windows).tolist()}):
    members = [k for k in range(len(units)) if tuple(windows[k]) == (first,
                                                                      end)]
    window_shape = (shape if first == 0 else
                    (lambda r, first=first: shape(r + first)))
    sigmas.update(calibration.calibrate_site_noise_multipliers(
        target_epsilon, delta,
        site_sizes={names[k]: int(units[k]) for k in members},
        batch_size=batch_size, steps=(end - first) * local_steps,
        schedule=schedules.per_round(window_shape, local_steps),
        max_batch_size=max_batch, steps_per_event=local_steps,
        prior_events=prior))
  return np.array([sigmas[s] for s in names])

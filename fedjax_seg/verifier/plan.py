"""The privacy plan of a run, re-derived from its config and site sizes alone.

The runner writes its plan into report.json (`privacy.plan`), but that plan
comes from the same code that wrote the ledger. This module derives, with its
own code, what the ledger must hold from two inputs only: the run's
configuration (`report.config`, every flag) and the number of training units
of each site (`report.sites[s].train_units`, public by the run's stated
assumption). Then it checks the ledger (and the report's plan fields) event
by event against that derivation:

  * each site's sampling rate q_k = min(1, B / N_k) and the maximum batch
    (the smallest B_max whose per-step truncation probability, P[Binomial(N_k
    + 1, q_k) > B_max], is at most 1e-12, grown as the runner grows it, the
    largest over sites);
  * the noise multiplier of every round and site: the schedule's shape
    (constant, linear, exponential, cosine, step, as optax defines them)
    times the site's base sigma, in float32 as a device applies it. The base
    is --noise_multiplier, or with --target_epsilon each site's calibrated
    sigma, re-checked with dp_accounting as the calibration's defining
    property: over the site's whole planned window (its joins and leaves),
    after any composed prior events, it meets the target, and 0.99 of it
    does not (so it is the smallest, to 1%);
  * the rounds each site was charged: every round of its window up to the
    rounds completed, held-out sites none; with sampled cohorts
    (--sites_per_round, --dropout_rate) the sites in each published history
    row, checked to be eligible and as many as the cohort; under site-level
    DP every training site every round;
  * a composed --init_from source (a DP run on this run's patients): its
    ledger's events first, read from the source's own report.json;
  * --epsilon_budget: no site's recomputed epsilon above it.

What it trusts: the site sizes and dp_accounting; with adaptive clipping,
that the gradient and count noise the device applied compose to the recorded
sigma (the runner checks the applied value at run time).
"""

import dataclasses
import math
import os
import pathlib
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from fedjax_seg.verifier import correlated
from fedjax_seg.verifier import epsilons
from fedjax_seg.verifier import fields

SCHEDULES = ("constant", "linear", "exponential", "cosine", "step")
TRUNCATION_TAIL = 1e-12  # Per step, as the runner sizes its batches.
MINIMALITY = 0.99  # A calibrated sigma times this must miss the target.
# The device evaluates the schedule's shape in float32 with its own cos and
# pow (and may contract operations): the derived shape is known to within a
# few units in the last place of 1. Sigmas compare to this much of the
# site's base sigma, beside the relative 1e-6.
SHAPE_ATOL = 8 * 2.0 ** -24


@dataclasses.dataclass(frozen=True)
class Setting:
  """The configuration fields that fix a run's privacy plan."""

  enabled: bool
  unit: str
  site_level: bool
  target_epsilon: float | None
  noise_multiplier: float
  schedule: str
  end_factor: float
  decay_rate: float
  delta: float
  epsilon_budget: float | None
  site_noise_multiplier: float
  site_sampling_rate: float
  batch_size: int
  local_steps: int
  rounds: int
  sites_per_round: int
  dropout_rate: float
  held_out: tuple
  joins: tuple
  leaves: tuple
  dataset: str
  data_seed: int
  init_from: str | None
  init_from_public: bool
  init_from_disjoint: bool
  noise_mechanism: str = "independent"
  site_target_epsilon: float | None = None
  mf_bands: int = 1
  blt_max_buffers: int = 1
  adaptive_clipping: str = "off"
  audit: bool = False
  cohorts: bool = False

  @property
  def record_level(self) -> bool:
    return self.enabled and self.unit != "site"

  @property
  def use_site_level(self) -> bool:
    return self.enabled and (self.site_level or self.unit == "site")


def read_setting(config: Mapping, path: str = "config") -> Setting:
  """The plan's settings from a report's `config`; ReportError naming a
  missing field."""
  sections = {s: fields.get(config, s, path, "object") for s in
              ("data", "model", "privacy", "federated")}
  p, f, d, m = (sections[s] for s in ("privacy", "federated", "data", "model"))

  def g(obj, key, section, kind, default=fields.MISSING):
    return fields.get(obj, key, f"{path}.{section}", kind, default)

  seed = fields.get(config, "seed", path, "int")
  data_seed = g(d, "data_seed", "data", "int", None)
  target = g(p, "target_epsilon", "privacy", "number", None)
  budget = g(p, "epsilon_budget", "privacy", "number", None)
  site_target = g(p, "site_target_epsilon", "privacy", "number", None)
  setting = Setting(
      enabled=g(p, "enabled", "privacy", "bool"),
      unit=g(p, "unit", "privacy", "str"),
      site_level=g(p, "site_level", "privacy", "bool"),
      target_epsilon=None if target is None else float(target),
      noise_multiplier=float(g(p, "noise_multiplier", "privacy", "number")),
      schedule=g(p, "noise_schedule", "privacy", "str"),
      end_factor=float(g(p, "schedule_end_factor", "privacy", "number")),
      decay_rate=float(g(p, "schedule_decay_rate", "privacy", "number")),
      delta=float(g(p, "delta", "privacy", "number")),
      epsilon_budget=None if budget is None else float(budget),
      site_noise_multiplier=float(g(p, "site_noise_multiplier", "privacy",
                                    "number")),
      site_sampling_rate=float(g(p, "site_sampling_rate", "privacy",
                                 "number")),
      batch_size=g(f, "batch_size", "federated", "int"),
      local_steps=g(f, "local_steps", "federated", "int"),
      rounds=g(f, "rounds", "federated", "int"),
      sites_per_round=g(f, "sites_per_round", "federated", "int", 0),
      dropout_rate=float(g(f, "dropout_rate", "federated", "number", 0.0)),
      held_out=tuple(g(d, "held_out_sites", "data", "list", [])),
      joins=tuple(g(d, "site_joins", "data", "list", [])),
      leaves=tuple(g(d, "site_leaves", "data", "list", [])),
      dataset=g(d, "dataset", "data", "str"),
      data_seed=seed if data_seed is None else data_seed,
      init_from=g(m, "init_from", "model", "str", None),
      init_from_public=g(m, "init_from_public", "model", "bool", False),
      init_from_disjoint=g(m, "init_from_disjoint", "model", "bool", False),
      noise_mechanism=g(p, "noise_mechanism", "privacy", "str",
                        "independent"),
      site_target_epsilon=(None if site_target is None
                           else float(site_target)),
      mf_bands=g(p, "mf_bands", "privacy", "int", 1),
      blt_max_buffers=g(p, "blt_max_buffers", "privacy", "int", 1),
      adaptive_clipping=g(p, "adaptive_clipping", "privacy", "str", "off"),
      audit=g(p, "audit", "privacy", "bool", False),
      cohorts=(g(d, "num_sites", "data", "int", None) is not None
               or g(d, "stream_sites", "data", "bool", False)))
  if setting.noise_mechanism not in correlated.MECHANISMS:
    raise fields.ReportError(f"{path}.privacy.noise_mechanism: "
                             f"{setting.noise_mechanism!r} is not one of "
                             f"{correlated.MECHANISMS}.")
  if setting.schedule not in SCHEDULES:
    raise fields.ReportError(f"{path}.privacy.noise_schedule: "
                             f"{setting.schedule!r} is not one of {SCHEDULES}.")
  if setting.batch_size < 1 or setting.local_steps < 1 or setting.rounds < 1:
    raise fields.ReportError(f"{path}.federated: batch_size, local_steps and "
                             "rounds must be >= 1.")
  return setting


def round_shape(s: Setting) -> np.ndarray:
  """[rounds] the schedule's relative sigma per round, as optax's schedules
  compute it over the round index: in float32, the device's precision (a
  float32 decay rate drifts from its float64 value by 2e-8 per round)."""
  f = np.float32
  r = np.arange(s.rounds, dtype=np.int32)
  span = max(s.rounds - 1, 1)
  if s.schedule == "constant":
    return np.ones(s.rounds, np.float32)
  if s.schedule == "linear":  # optax.linear_schedule(1, end, span)
    frac = f(1) - np.clip(r, 0, span).astype(f) / f(span)
    return f(1.0 - s.end_factor) * frac + f(s.end_factor)
  if s.schedule == "exponential":  # exponential_decay(1, rate, 1)
    return np.power(f(s.decay_rate), r.astype(f))
  if s.schedule == "cosine":  # optax.cosine_decay_schedule(1, span, end)
    count = np.minimum(r.astype(f), f(span))
    cosine = f(0.5) * (f(1) + np.cos(f(np.pi) * count / f(span)))
    return f(1.0 - s.end_factor) * cosine + f(s.end_factor)
  # step: piecewise constant, times end_factor from half the rounds on.
  return np.where(r < max(s.rounds // 2, 1), f(1), f(s.end_factor))


def windows(s: Setting, names: Sequence[str]) -> dict:
  """{site: (first round, end round)}, 0-based, end exclusive: the rounds a
  site is in the federation (--site_joins=SITE:R from round R, 1-based;
  --site_leaves=SITE:R from round R on no longer)."""
  out = {n: [0, s.rounds] for n in names}
  for entries, bound, flag in ((s.joins, 0, "site_joins"),
                               (s.leaves, 1, "site_leaves")):
    for entry in entries:
      name, _, r = str(entry).partition(":")
      if name not in out or not r.strip().isdigit():
        raise fields.ReportError(f"config.data.{flag}: cannot read "
                                 f"{entry!r} for the sites {list(out)[:5]}.")
      out[name][bound] = int(r) - 1
  return {n: tuple(w) for n, w in out.items()}


def max_batch_size(units: Sequence[int], rates: Sequence[float]) -> int:
  """The largest over sites of the smallest B_max with P[Binomial(N + 1, q)
  > B_max] <= TRUNCATION_TAIL, searched in the runner's steps."""
  best = 1
  for n, q in zip(units, rates):
    b = max(1, int(math.ceil(n * q)))
    while b < n + 1 and stats.binom.sf(b, n + 1, q) > TRUNCATION_TAIL:
      b += max(1, b // 16)
    best = max(best, min(b, n + 1) if n > 0 else 1)
  return best


def _f32(x: float) -> float:
  return float(np.float32(x))


def composition_required(s: Setting, report: Mapping, source: Mapping,
                         problems: list) -> bool:
  """Whether an --init_from source's events must be in this run's ledger:
  it trained under DP on this run's patients (the same dataset and
  preparation; the built-in data with the same data seed). Appends a
  problem for a source the runner refuses (a non-DP one on this run's
  patients, or this run's patients stated public or disjoint)."""
  other = read_setting(fields.get(source, "config", "the --init_from report",
                                  "object"), "the --init_from run's config")
  same = other.dataset == s.dataset and (
      s.dataset != "synthetic" or other.data_seed == s.data_seed)
  mine = (report.get("dataset") or {}).get("preparation_id")
  theirs = (source.get("dataset") or {}).get("preparation_id")
  if same and mine and theirs and mine != theirs:
    same = False  # Prepared again: the runner asks for a statement.
    if not (s.init_from_disjoint or s.init_from_public):
      problems.append("FAIL plan: the --init_from run trained on another "
                      "preparation of this dataset and no relation is stated")
  if not same:
    return False
  for flag, stated in (("--init_from_public", s.init_from_public),
                       ("--init_from_disjoint", s.init_from_disjoint),
                       ("a non-private source", not other.enabled)):
    if stated:
      problems.append(f"FAIL plan: the --init_from run trained on this "
                      f"run's patients, with {flag}: the runner refuses it")
  return other.enabled and not (s.init_from_public or s.init_from_disjoint)


def _charged_rounds(s: Setting, report: Mapping, names, training, wins,
                    done: int, problems: list) -> dict:
  """{site: [rounds charged]} (module docstring)."""
  history = fields.get(report, "history", "", "list")
  if len(history) != done or any(
      not isinstance(row, Mapping) or row.get("round") != i + 1
      for i, row in enumerate(history)):
    problems.append(f"FAIL plan: history has {len(history)} rows, not one "
                    f"per completed round 1..{done}")
  eligible = {n: [r for r in range(done) if training[n]
                  and wins[n][0] <= r < wins[n][1]] for n in names}
  if s.use_site_level:
    return {n: list(range(done)) if training[n] else [] for n in names}
  published = [set(row.get("participants", ())) if isinstance(row, Mapping)
               and "participants" in row else None for row in history[:done]]
  if s.sites_per_round == 0 and s.dropout_rate == 0:
    for r, part in enumerate(published):
      want = {n for n in names if r in eligible[n]}
      if part is not None and part != want:
        problems.append(f"FAIL plan: round {r + 1}'s published participants "
                        f"differ from the sites in the federation "
                        f"({sorted(part ^ want)[:5]})")
    return eligible
  charged = {n: [] for n in names}
  for r, part in enumerate(published):
    if part is None:
      problems.append(f"FAIL plan: round {r + 1} samples its sites but its "
                      "history row publishes no participants")
      continue
    pool = {n for n in names if r in eligible[n]}
    if not part <= pool:
      problems.append(f"FAIL plan: round {r + 1}'s participants "
                      f"{sorted(part - pool)[:5]} are not in the federation")
    cohort = min(s.sites_per_round, len(pool))
    # The cohort is drawn among the sites in the federation with a scenario,
    # else among all sites, held-out ones then dropped (fewer may train).
    exact = not s.held_out or s.joins or s.leaves
    if s.sites_per_round and s.dropout_rate == 0 and (
        len(part) != cohort if exact else len(part) > cohort):
      problems.append(f"FAIL plan: round {r + 1} has {len(part)} "
                      f"participants, --sites_per_round gives {cohort}")
    for n in part & pool:
      charged[n].append(r)
  return charged


def same_directory(recorded: str, given: str) -> bool:
  """Whether `recorded` (the absolute path the runner resolved) can be the
  directory `given` on its command line: equal if `given` is absolute, else
  ending in `given`'s components (whole names: "pre" is not "/runs/xpre";
  leading "." and ".." cannot be resolved without the run's working
  directory, so a `given` of only those cannot be contradicted)."""
  mine = pathlib.PurePath(os.path.normpath(recorded)).parts
  theirs = pathlib.PurePath(os.path.normpath(given))
  if theirs.is_absolute():
    return mine == theirs.parts
  tail = list(theirs.parts)
  while tail and tail[0] in (os.curdir, os.pardir):
    tail.pop(0)
  return not tail or list(mine[-len(tail):]) == tail


def _load_source(s: Setting, report: Mapping, privacy: Mapping,
                 problems: list, verify_source) -> tuple[Mapping | None, bool]:
  """(the --init_from run's report, whether its events must be composed):
  read from the path the runner recorded (`privacy.init_from.workdir`,
  which must be the config's --init_from), checked against the recorded
  sha256, and itself verified (`verify_source`)."""
  recorded = privacy.get("init_from") or {}
  composed = privacy.get("composed_from")
  if not s.init_from:
    if recorded or composed:
      problems.append("FAIL plan: the report names an --init_from source, "
                      "the config has none")
    return None, False
  where = recorded.get("workdir") or s.init_from
  if recorded.get("workdir") and not same_directory(where, s.init_from):
    problems.append(f"FAIL plan: privacy.init_from.workdir {where!r} is not "
                    f"the config's --init_from {s.init_from!r}")
  try:
    source, digest = fields.read_report(where)
  except fields.ReportError as e:
    problems.append(f"FAIL plan: the --init_from run's report cannot be read "
                    f"({e}); whether its events belong in the ledger cannot "
                    "be checked (verify where that run is reachable)")
    return None, False
  if recorded.get("report_sha256") not in (None, digest):
    problems.append(f"FAIL plan: the --init_from run's report ({where}) "
                    "changed since this run read it (sha256 differs)")
  required = composition_required(s, report, source, problems)
  if required and not composed:
    problems.append(f"FAIL plan: the --init_from run ({where}) trained under "
                    "DP on this run's patients, but its events are not "
                    "composed into the ledger (no privacy.composed_from)")
  if composed and not required:
    problems.append("FAIL plan: events composed from an --init_from run "
                    "that did not train under DP on this run's patients")
  if required and source.get("privacy", {}).get("enabled"):
    problems.extend(f"FAIL the --init_from run: {line}"
                    for line in verify_source(source))
  return source, required


def _source_events(source: Mapping | None, required: bool,
                   site_level: bool) -> dict:
  """{site: the source's events} for the main (or site-level) ledger."""
  if source is None or not required:
    return {}
  section = fields.get(source, "privacy", "the --init_from report", "object")
  if site_level:
    section = section.get("site_level")
    if section is None:
      return {}
  sites, _ = epsilons.parse_ledger(
      fields.get(section, "ledger", "the --init_from report", "object"),
      "the --init_from run's ledger")
  return sites


def check(report: Mapping, ledgers: Mapping[str, tuple], recomputed: Mapping,
          problems: list, verify_source=lambda source: []) -> None:
  """Checks the ledgers against the plan derived from the config and site
  sizes; appends one line per mismatch to `problems`.

  Args:
    report: the report dict (with `config`, `sites`, `history`).
    ledgers: {section path ("privacy", "privacy.site_level"): ({site:
      [events]}, orders)} as parsed from the report.
    recomputed: {section path: {site: RDP epsilon}} (for the budget).
    problems: the list of problems to append to.
    verify_source: `report -> [problems]`, to verify a composed --init_from
      run's own report.
  """
  s = read_setting(fields.get(report, "config", "", "object"))
  privacy = fields.get(report, "privacy", "", "object")
  # The report's privacy header must be the config's.
  both = s.use_site_level and s.record_level
  for what, got, want in (
      ("privacy.enabled", privacy.get("enabled"), s.enabled),
      ("privacy.delta", privacy.get("delta"), s.delta),
      ("privacy.unit", privacy.get("unit"), s.unit),
      ("a privacy.site_level ledger", "privacy.site_level" in ledgers, both)):
    if got != want:
      problems.append(f"FAIL plan: {what} is {got!r}, the config gives "
                      f"{want!r}")
  sizes = fields.get(report, "sites", "", "object")
  names = list(sizes)
  units = {n: fields.get(fields.get(sizes, n, "sites", "object"),
                         "train_units", f"sites.{n}", "int") for n in names}
  done = fields.get(report, "rounds_completed", "", "int")
  training = {n: n not in s.held_out for n in names}
  wins = windows(s, names)
  rates = {n: min(1.0, s.batch_size / units[n]) if units[n] > 0 else 1.0
           for n in names}
  charged = _charged_rounds(s, report, names, training, wins, done, problems)
  for path, (sites, _) in ledgers.items():
    if set(sites) != set(names):
      problems.append(f"FAIL plan: {path}.ledger's sites differ from the "
                      f"report's sites ({sorted(set(sites) ^ set(names))[:5]})")
  source, required = _load_source(s, report, privacy, problems,
                                  verify_source)
  # What round `done` (the next one) would add per ledger and site.
  next_events = {}
  if (s.record_level and "privacy" in ledgers
      and s.noise_mechanism != "independent"):
    next_events["privacy"] = correlated.check_record_level(
        s, privacy, ledgers["privacy"], names, units, training, charged,
        done, _source_events(source, required, False), problems)
  elif s.record_level and "privacy" in ledgers:
    next_events["privacy"] = _check_record_level(
        s, privacy, ledgers["privacy"], names, units, rates, training, wins,
        charged, done, _source_events(source, required, False), problems)
  if s.use_site_level:
    path = "privacy" if s.unit == "site" else "privacy.site_level"
    if path in ledgers:
      next_events[path] = correlated.check_site_level(
          s, privacy, path, ledgers[path], names, training, done,
          _source_events(source, required, path != "privacy"), problems)
  _check_stop(s, report, done, ledgers, next_events, recomputed, problems)


def _check_stop(s, report, done, ledgers, next_events, recomputed,
                problems) -> None:
  """The stop reason agrees with the rounds done, and the budget holds: a
  budget stop only where the next round would have exceeded it."""
  reason = str(report.get("stopped_reason", ""))
  if done > s.rounds:
    problems.append(f"FAIL plan: {done} rounds completed, --rounds="
                    f"{s.rounds}")
  if reason.startswith("completed"):
    if done != s.rounds:
      problems.append(f"FAIL plan: stopped 'completed' after {done} of "
                      f"{s.rounds} rounds")
  elif reason.startswith("budget:"):
    over = s.epsilon_budget is not None and done < s.rounds and any(
        epsilons.rdp_epsilon(ledgers[path][0][n] + [event],
                             ledgers[path][1], s.delta) > s.epsilon_budget
        for path, events in next_events.items()
        for n, event in events.items())
    if not over:
      problems.append(f"FAIL plan: stopped by the budget after {done} "
                      "rounds, but no site the next round charges would "
                      "have exceeded --epsilon_budget")
  else:
    problems.append(f"FAIL plan: unknown stopped_reason {reason!r}")
  if s.epsilon_budget is not None:
    for path, figures in recomputed.items():
      for site, eps in figures.items():
        if isinstance(eps, float) and eps > s.epsilon_budget:
          problems.append(f"FAIL site {site!r}, ledger {path}.ledger: "
                          f"epsilon {eps:.6f} is above --epsilon_budget="
                          f"{s.epsilon_budget}")


def _check_record_level(s, privacy, ledger, names, units, rates, training,
                        wins, charged, done, prior, problems) -> dict:
  """Checks the record-level ledger; returns {site: the event round `done`
  would add} for the sites in the federation then."""
  sites, orders = ledger
  plan = fields.get(privacy, "plan", "privacy", "object")
  max_batch = max_batch_size([units[n] for n in names],
                             [rates[n] for n in names])
  if plan.get("max_batch_size") != max_batch:
    problems.append(f"FAIL plan: privacy.plan.max_batch_size is "
                    f"{plan.get('max_batch_size')!r}, derived {max_batch}")
  for key, want in (("dataset_size_per_site", units),
                    ("sampling_rate_per_site", rates)):
    got = plan.get(key, {})
    bad = [n for n in names if not (isinstance(got.get(n), (int, float))
                                    and fields.close(got[n], want[n]))]
    if bad:
      problems.append(f"FAIL plan: privacy.plan.{key} differs from the "
                      f"derived value for sites {bad[:5]}")
  shape = round_shape(s)
  if s.target_epsilon is None:
    base = {n: s.noise_multiplier for n in names}
  else:
    claimed = fields.get(privacy, "noise_multiplier_per_site", "privacy",
                         "object")
    base = {n: float(fields.site_value(claimed, n,
                                       "privacy.noise_multiplier_per_site",
                                       "number")) for n in names}
  sigma = {n: [_f32(float(shape[r]) * base[n]) for r in range(s.rounds)]
           for n in names}

  def near(value, n, r):
    return abs(float(value) - sigma[n][r]) <= (
        fields.REL_TOL * sigma[n][r] + SHAPE_ATOL * base[n])
  recorded = plan.get("accounted_sigma_per_round", {})
  trained = fields.get(plan, "rounds_trained_per_site", "privacy.plan",
                       "object")

  def event(n, value):
    return epsilons.planned_event(value, rates[n], s.local_steps,
                                  dataset_size=units[n],
                                  max_batch_size=max_batch)

  checked = {}
  for n in names:
    label = f"FAIL site {n!r}, ledger privacy.ledger"
    mine = recorded.get(n)
    if not (isinstance(mine, list) and len(mine) == s.rounds and all(
        fields.kind_ok(a, "number") and near(a, n, r)
        for r, a in enumerate(mine))):
      problems.append(f"{label}: privacy.plan.accounted_sigma_per_round "
                      "differs from the schedule times the site's sigma")
    if charged[n] != trained.get(n):
      problems.append(f"{label}: privacy.plan.rounds_trained_per_site "
                      f"differs from the derived rounds {charged[n][:10]}")
    before = list(prior.get(n, ()))
    events = sites.get(n, [])
    want = []
    for i, r in enumerate(charged[n]):
      # The recorded sigma where it is the derived one up to the device's
      # float32 schedule (then the event must match in every other field).
      got = _sigma_of(events[len(before) + i]) if len(before) + i < len(
          events) else None
      want.append(event(n, got if got is not None and near(got, n, r)
                        else sigma[n][r]))
    epsilons.compare_events(events, before + want, label, problems)
    if s.target_epsilon is None or not training[n]:
      continue
    first, end = wins[n]
    key = (units[n], wins[n], base[n], tuple(map(repr, before)))
    if key not in checked:
      full = before + [event(n, sigma[n][r]) for r in range(first, end)]
      lower = before + [
          event(n, _f32(float(shape[r]) * base[n] * MINIMALITY))
          for r in range(first, end)]
      checked[key] = (epsilons.rdp_epsilon(full, orders, s.delta),
                      epsilons.rdp_epsilon(lower, orders, s.delta))
    problem = epsilons.calibration_problem(
        label, base[n], *checked[key], s.target_epsilon,
        f"its planned rounds {first + 1}..{end}", MINIMALITY)
    if problem:
      problems.append(problem)
  if done >= s.rounds:
    return {}
  charge_all = s.use_site_level  # Every training site, every round.
  return {n: event(n, sigma[n][done]) for n in names if training[n] and (
      charge_all or wins[n][0] <= done < wins[n][1])}


def _sigma_of(event) -> float | None:
  """The noise multiplier of a (self-composed, sampled) Gaussian event."""
  while isinstance(event, epsilons.dp_event.SelfComposedDpEvent):
    event = event.event
  if isinstance(event, epsilons.dp_event.PoissonSampledDpEvent):
    event = event.event
  value = getattr(event, "noise_multiplier", None)
  return float(value) if fields.kind_ok(value, "number") else None

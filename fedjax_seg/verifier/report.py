"""Checks of a report: its epsilons, its ledger, its plan (and sweeps).

`verify_report(report)` runs every check of `python -m fedjax_seg.verifier`
in-process; `verify_ledger(ledger)` checks a bare `PrivacyLedger` dump;
`verify_sweep(workdir)` a sweep's members and the epsilon of releasing them
all. See the package docstring for what is recomputed, from what, and what
is trusted.
"""

import dataclasses
import math
import os
from typing import Mapping, Sequence

from fedjax_seg.verifier import correlated
from fedjax_seg.verifier import epsilons
from fedjax_seg.verifier import fields
from fedjax_seg.verifier import plan as plan_lib

ReportError = fields.ReportError
UNITS = ("example", "patient", "site")
NEIGHBORING_RELATION = "ADD_OR_REMOVE_ONE"
LEDGER_FORMAT = epsilons.LEDGER_FORMAT
DEFAULT_PLD_INTERVAL = epsilons.DEFAULT_PLD_INTERVAL


@dataclasses.dataclass(frozen=True)
class Row:
  """One line of the table: one site of one ledger."""

  ledger: str
  site: str
  unit: str
  events: int
  claimed_rdp: float | None
  rdp: float | None
  claimed_pld: float | None
  pld: float | None
  ok: bool

  @classmethod
  def of(cls, ledger, site, unit, events, claimed_rdp, rdp, claimed_pld, pld,
         ok) -> "Row":
    """A row; a recomputed figure given as an error message (str) is
    shown as missing."""
    figure = lambda x: None if isinstance(x, str) else x  # noqa: E731
    return cls(ledger, site, unit, events, claimed_rdp, figure(rdp),
               claimed_pld, figure(pld), ok)


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """Outcome of `verify_report`.

  ok: no mismatch (True also for a non-private run, where `private` is False
    and nothing was checked).
  rows: one `Row` per (ledger, site).
  problems: one line per mismatch, naming ledger and site.
  private: False if the report says privacy was disabled.
  num_events: events recomputed, over all ledgers and sites.
  rederived: whether the plan was re-derived from the report's config (not
    for a bare ledger or a report without config).
  """

  ok: bool
  rows: list
  problems: list
  private: bool = True
  num_events: int = 0
  rederived: bool = False

  @property
  def summary(self) -> str:
    if not self.private:
      return "NOT PRIVATE: nothing to verify (privacy.enabled is false)"
    if self.ok:
      return (f"verified: all {len(self.rows)} epsilons recompute (RDP and "
              f"PLD) from {self.num_events} events" +
              ("; the ledger follows the plan re-derived from the config "
               "and site sizes" if self.rederived else
               "; plan NOT re-derived (no config): the ledger follows the "
               "report's own plan"))
    return (f"MISMATCH: {len(self.problems)} problem(s) in "
            f"{sum(not r.ok for r in self.rows)} of {len(self.rows)} "
            f"site epsilons; see the FAIL lines")


def _format_number(x) -> str:
  return "-" if x is None else f"{x:.6f}"


def _check_header(ledger: Mapping, path: str, delta: float, unit: str,
                  problems: list) -> str:
  ledger_delta = fields.get(ledger, "delta", path, "number")
  ledger_unit = fields.get(ledger, "unit", path, "str")
  relation = fields.get(ledger, "neighboring_relation", path, "str")
  if float(ledger_delta) != delta:
    problems.append(f"FAIL ledger {path}: delta {ledger_delta!r} != "
                    f"privacy.delta {delta!r}")
  if ledger_unit != unit:
    problems.append(f"FAIL ledger {path}: unit {ledger_unit!r}, the report "
                    f"says {unit!r}")
  if relation != NEIGHBORING_RELATION:
    problems.append(f"FAIL ledger {path}: neighboring_relation {relation!r}, "
                    f"expected {NEIGHBORING_RELATION!r}")
  return ledger_unit


def _check_rounds(rounds, where: str) -> list[int]:
  if not all(fields.kind_ok(r, "int") and r >= 0 for r in rounds):
    raise fields.ReportError(
        f"{where}: must be a list of round indices (ints >= 0).")
  return [int(r) for r in rounds]


def _record_level_plan_events(plan: Mapping, path: str, site: str):
  """(planned events, their round indices) of one site, record-level."""
  local_steps = fields.get(plan, "local_steps", path, "int")
  max_batch = fields.get(plan, "max_batch_size", path, "int")
  if local_steps < 1 or max_batch < 1:
    raise fields.ReportError(
        f"{path}: local_steps and max_batch_size must be >= 1.")
  n = fields.site_value(fields.site_map(plan, "dataset_size_per_site", path),
                        site, f"{path}.dataset_size_per_site", "int")
  q = fields.site_value(fields.site_map(plan, "sampling_rate_per_site", path),
                        site, f"{path}.sampling_rate_per_site", "number")
  rounds = _check_rounds(
      fields.site_value(fields.site_map(plan, "rounds_trained_per_site", path),
                        site, f"{path}.rounds_trained_per_site", "list"),
      f"{path}.rounds_trained_per_site.{site}")
  sigmas_where = f"{path}.accounted_sigma_per_round.{site}"
  sigmas = fields.site_value(
      fields.site_map(plan, "accounted_sigma_per_round", path), site,
      f"{path}.accounted_sigma_per_round", "list")
  if n < 1:
    raise fields.ReportError(
        f"{path}.dataset_size_per_site.{site}: must be >= 1.")
  if not 0 < q <= 1:
    raise fields.ReportError(
        f"{path}.sampling_rate_per_site.{site}: must be in "
        f"(0, 1], got {q!r}.")
  # Correlated noise: the events of the site's cyclic groups.
  mechanism_event = correlated.plan_event_function(plan, path, site)
  planned = []
  for r in rounds:
    if r >= len(sigmas):
      raise fields.ReportError(f"{sigmas_where}[{r}]: missing (round {r} is in "
                               f"rounds_trained_per_site.{site}).")
    sigma = sigmas[r]
    if not (fields.kind_ok(sigma, "number") and sigma >= 0 and
            math.isfinite(sigma)):
      raise fields.ReportError(
          f"{sigmas_where}[{r}]: must be a finite number >= 0.")
    if mechanism_event is not None:
      planned.append(mechanism_event(r, float(sigma), float(q),
                                     int(max_batch)))
    else:
      planned.append(
          epsilons.planned_event(float(sigma),
                                 float(q),
                                 int(local_steps),
                                 dataset_size=int(n),
                                 max_batch_size=int(max_batch)))
  return planned, rounds


def _site_level_plan_events(plan: Mapping, path: str):
  z = fields.get(plan, "noise_multiplier", path, "number")
  q = fields.get(plan, "sampling_rate", path, "number")
  rounds = _check_rounds(fields.get(plan, "rounds", path, "list"),
                         f"{path}.rounds")
  if not (z >= 0 and math.isfinite(z)):
    raise fields.ReportError(
        f"{path}.noise_multiplier: must be a finite number >= 0.")
  if not 0 < q <= 1:
    raise fields.ReportError(
        f"{path}.sampling_rate: must be in (0, 1], got {q!r}.")
  charged = fields.get(plan, "charged_sites", path, "list", default=None)
  if charged is not None:
    if not all(isinstance(c, str) for c in charged):
      raise fields.ReportError(f"{path}.charged_sites: must be a list of site "
                               f"names.")
    charged = set(charged)
  # Correlated noise over rounds: the stream's events from the plan's C.
  stream = correlated.site_plan_events(plan, path, float(z), rounds)
  planned = stream if stream is not None else [
      epsilons.planned_event(float(z), float(q), 1) for _ in rounds]
  return planned, rounds, charged


def _check_events(events, planned, rounds, ledger_path, site, problems):
  label = f"FAIL site {site!r}, ledger {ledger_path}"
  if len(set(rounds)) != len(rounds) or rounds != sorted(rounds):
    problems.append(f"{label}: the plan's rounds {rounds} are not strictly "
                    f"increasing")
  if len(events) != len(planned):
    problems.append(f"{label}: {len(events)} events recorded, the plan has "
                    f"{len(planned)} rounds ({rounds})")
  for i, (event, plan_event) in enumerate(zip(events, planned)):
    if epsilons.contains(event, epsilons.dp_event.NonPrivateDpEvent):
      problems.append(f"{label}: event {i} (round {rounds[i]}) is a "
                      f"NonPrivateDpEvent (no noise) in a private run")
      continue
    d = epsilons.diff(event, plan_event, "event")
    if d:
      problems.append(f"{label}: event {i} (round {rounds[i]}): {d}")


def _claimed(mapping: Mapping, site: str, path: str):
  """A claimed per-site epsilon: a number (inf allowed), or ReportError."""
  if site not in mapping:
    raise fields.ReportError(f"{path}.{site}: missing.")
  value = mapping[site]
  if value is None:
    return None
  if not fields.kind_ok(value, "number"):
    raise fields.ReportError(
        f"{path}.{site}: expected number, got {value!r:.60}.")
  return float(value)


def _recomputed(figures: dict, site: str, label: str,
                problems: list[str]) -> tuple:
  """The (RDP, PLD) epsilons recomputed for `site`; a figure that could not
  be recomputed is a message (str), which becomes a problem."""
  eps_rdp, eps_pld = figures[site]
  for what, value in (("RDP epsilon", eps_rdp), ("PLD epsilon", eps_pld)):
    if isinstance(value, str):
      problems.append(f"{label}: {what} {value}")
  return eps_rdp, eps_pld


def _compare(label, what, claimed, recomputed, delta, problems) -> None:
  if isinstance(recomputed, str):
    return  # Reported once, where it was computed.
  if claimed is None:
    problems.append(f"{label}: no {what} claimed (null); recomputed "
                    f"{recomputed!r} at delta={delta:g}")
  elif not fields.close(claimed, recomputed):
    rel = (abs(claimed - recomputed) / abs(recomputed)
           if recomputed and math.isfinite(recomputed) else float("nan"))
    problems.append(f"{label}: {what} {claimed!r} != recomputed "
                    f"{recomputed!r} at delta={delta:g} (relative difference "
                    f"{rel:.2g})")


def _verify_ledger(section: Mapping, section_path: str, delta: float, unit: str,
                   interval: float, site_level: bool, rows: list,
                   problems: list, workers: int | str):
  """Checks one ledger of the report; returns ({site: [events]}, orders,
  {site: recomputed RDP epsilon})."""
  ledger_path = f"{section_path}.ledger"
  # A composed --init_from source's events come first (checked against the
  # source's own report by the plan's derivation).
  prior = fields.get(
      fields.get(section, "composed_from", section_path, "object", {}),
      "events_per_site", f"{section_path}.composed_from", "object", {})
  ledger = fields.get(section, "ledger", section_path, "object")
  sites, orders = epsilons.parse_ledger(ledger, ledger_path)
  ledger_unit = _check_header(ledger, ledger_path, delta, unit, problems)
  claimed_rdp = fields.get(section, "epsilon_per_site", section_path, "object")
  claimed_pld = fields.get(section, "epsilon_pld_per_site", section_path,
                           "object")
  claimed_max = fields.get(section, "epsilon_max", section_path, "number")
  plan_path = f"{section_path}.plan"
  plan = fields.get(section, "plan", section_path, "object")
  if site_level:
    site_planned, site_rounds, charged = _site_level_plan_events(
        plan, plan_path)
    for extra in sorted((charged or set()) - set(sites)):
      problems.append(f"FAIL site {extra!r}, ledger {ledger_path}: "
                      f"{plan_path}.charged_sites names a site the ledger "
                      f"does not have")
  for name, mapping in (("epsilon_per_site", claimed_rdp),
                        ("epsilon_pld_per_site", claimed_pld)):
    for extra in sorted(set(map(str, mapping)) - set(sites)):
      problems.append(f"FAIL site {extra!r}, ledger {ledger_path}: "
                      f"{section_path}.{name} claims an epsilon for a site the "
                      f"ledger does not have")
  recomputed_rdp = []
  figures = epsilons.recompute_sites(sites, orders, delta, interval, workers)
  for site, events in sites.items():
    label = f"FAIL site {site!r}, ledger {ledger_path}"
    before = len(problems)
    # Read every claim first: a missing one is an input error (exit 2).
    c_rdp = _claimed(claimed_rdp, site, f"{section_path}.epsilon_per_site")
    c_pld = _claimed(claimed_pld, site, f"{section_path}.epsilon_pld_per_site")
    own = _claimed(ledger["sites"][site], "epsilon",
                   f"{ledger_path}.sites.{site}")
    if not site_level:
      planned, rounds = _record_level_plan_events(plan, plan_path, site)
    elif charged is None or site in charged:
      planned, rounds = site_planned, site_rounds
    else:  # A held-out site: no site-level event.
      planned, rounds = [], []
    eps_rdp, eps_pld = _recomputed(figures, site, label, problems)
    _compare(label, f"claimed RDP epsilon ({section_path}.epsilon_per_site)",
             c_rdp, eps_rdp, delta, problems)
    _compare(
        label, f"ledger's own RDP epsilon ({ledger_path}.sites.{site}."
        f"epsilon)", own, eps_rdp, delta, problems)
    _compare(label, f"claimed PLD epsilon ({section_path}."
             f"epsilon_pld_per_site)", c_pld, eps_pld, delta, problems)
    _check_events(events[int(prior.get(site, 0)):], planned, rounds,
                  ledger_path, site, problems)
    recomputed_rdp.append(eps_rdp)
    rows.append(
        Row.of(ledger_path, site, ledger_unit, len(events),
               c_rdp, eps_rdp, c_pld, eps_pld,
               len(problems) == before))
  if any(isinstance(e, str) for e in recomputed_rdp):
    problems.append(f"FAIL ledger {ledger_path}: {section_path}.epsilon_max "
                    f"cannot be verified (a site's RDP epsilon does not "
                    f"recompute)")
  elif not fields.close(float(claimed_max), max(recomputed_rdp)):
    problems.append(f"FAIL ledger {ledger_path}: {section_path}.epsilon_max "
                    f"{claimed_max!r} != the largest recomputed RDP epsilon "
                    f"{max(recomputed_rdp)!r}")
  return sites, orders, dict(zip(sites, recomputed_rdp))


def verify_report(report: Mapping,
                  workers: int | str = 1,
                  rederive: bool = True) -> VerifyResult:
  """Recomputes and checks every epsilon of a report dict (see module doc).

  `workers`: 1 recomputes here; a number, or "auto" (one per core when
  there are 32 or more distinct events), spreads the sites over worker
  processes (they import the verifier alone, never the caller's
  `__main__`); the figures are the same.

  For each ledger (`privacy.ledger`; `privacy.site_level.ledger` if present)
  and each of its sites:
    1. the RDP epsilon recomputed from its events equals the claimed
       `epsilon_per_site` and the ledger's own `sites[s].epsilon`; the PLD
       epsilon equals `epsilon_pld_per_site`; `epsilon_max` is the largest
       recomputed RDP epsilon;
    2. the ledger's delta and unit are the report's, its neighbouring
       relation add/remove-one;
    3. its events are exactly what the plan gives, one per recorded round:
       record-level, round r = `rounds_trained_per_site[k][i]` must be
       `SelfComposedDpEvent(TruncatedSubsampledGaussianDpEvent(N_k + 1, q_k,
       max_batch_size, accounted_sigma_per_round[k][r]), local_steps)`
       (`GaussianDpEvent(sigma)` inside if q_k == 1); site-level, one
       `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), 1)`
       (`GaussianDpEvent(z)` inside if q == 1) per round of `plan.rounds`
       for each site of `plan.charged_sites` (every site if absent), none
       for the others.
       Floats compare to a relative 1e-6 (the ledger holds the float32 values
       the device used). A NonPrivateDpEvent (sigma = 0) always fails.
       Events a composed --init_from source brought
       (`composed_from.events_per_site`) come first and are left to 4.
    4. with the run's `config` in the report (every run writes it): the
       plan re-derived from the config and the site sizes alone
       (`fedjax_seg.verifier.plan`): sampling rates, maximum batch, every
       round's sigma (a calibrated sigma re-checked against its target),
       the rounds each site was charged, a composed source's events, the
       budget. Without a config this fails, unless `rederive` is False
       (a hand-made report: its epsilons and its own plan only, and
       `rederived` is False).

  Returns:
    A `VerifyResult`; for a report with `privacy.enabled` false, ok=True,
    private=False and no rows (nothing to verify).

  Raises:
    ReportError: a field is missing or malformed (the message names it).
  """
  if not isinstance(report, Mapping):
    raise fields.ReportError("report: expected a JSON object.")
  if report.get("format") == LEDGER_FORMAT:
    return verify_ledger(report, workers=workers)
  privacy = fields.get(report, "privacy", "", "object")
  path = "privacy"
  if not fields.get(privacy, "enabled", path, "bool"):
    return VerifyResult(ok=True, rows=[], problems=[], private=False)
  delta = float(fields.get(privacy, "delta", path, "number"))
  if not 0 < delta < 1:
    raise fields.ReportError(
        f"privacy.delta: must be in (0, 1), got {delta!r}.")
  unit = fields.get(privacy, "unit", path, "str")
  if unit not in UNITS:
    raise fields.ReportError(
        f"privacy.unit: must be one of {UNITS}, got {unit!r}.")
  interval = float(
      fields.get(privacy,
                 "pld_value_discretization_interval",
                 path,
                 "number",
                 default=DEFAULT_PLD_INTERVAL))
  if not 0 < interval < 1:
    raise fields.ReportError(
        "privacy.pld_value_discretization_interval: must be in "
        f"(0, 1), got {interval!r}.")
  rows, problems = [], []
  ledgers, recomputed = {}, {}
  for section_path, section, section_unit, site_level in (("privacy", privacy,
                                                           unit,
                                                           unit == "site"),
                                                          ("privacy.site_level",
                                                           fields.get(
                                                               privacy,
                                                               "site_level",
                                                               path, "object",
                                                               None), "site",
                                                           True)):
    if section is None:
      continue
    sites, orders, figures = _verify_ledger(section, section_path, delta,
                                            section_unit, interval, site_level,
                                            rows, problems, workers)
    ledgers[section_path] = (sites, orders)
    recomputed[section_path] = figures
  rederived = rederive and "config" in report
  if rederived:
    plan_lib.check(
        report, ledgers, recomputed, problems,
        verify_source=lambda source: verify_report(source, workers).problems)
  elif rederive:
    problems.append("FAIL report: no config, so the plan cannot be "
                    "re-derived (every run writes one; for a hand-made "
                    "report, check its epsilons and its own plan only with "
                    "--no-plan)")
  return VerifyResult(
      ok=not problems,
      rows=rows,
      problems=problems,
      private=True,
      num_events=sum(
          len(e) for sites, _ in ledgers.values() for e in sites.values()),
      rederived=rederived)


def verify_ledger(ledger: Mapping,
                  value_discretization_interval: float = DEFAULT_PLD_INTERVAL,
                  workers: int | str = 1) -> VerifyResult:
  """Checks a bare `PrivacyLedger.to_dict()` dump (e.g. your own code's).

  A ledger alone carries no plan, so only check 1 of `verify_report` applies:
  each site's RDP epsilon recomputed from its events, at the ledger's own
  delta, must equal the ledger's `sites[s].epsilon`; the PLD epsilon is
  recomputed and shown (a ledger dump claims none).
  """
  sites, orders = epsilons.parse_ledger(ledger, "ledger")
  delta = float(fields.get(ledger, "delta", "ledger", "number"))
  if not 0 < delta < 1:
    raise fields.ReportError(f"ledger.delta: must be in (0, 1), got {delta!r}.")
  unit = fields.get(ledger, "unit", "ledger", "str")
  relation = fields.get(ledger, "neighboring_relation", "ledger", "str")
  rows, problems = [], []
  if relation != NEIGHBORING_RELATION:
    problems.append(f"FAIL ledger: neighboring_relation {relation!r}, "
                    f"expected {NEIGHBORING_RELATION!r}")
  figures = epsilons.recompute_sites(sites, orders, delta,
                                     value_discretization_interval, workers)
  for site, events in sites.items():
    label = f"FAIL site {site!r}, ledger"
    before = len(problems)
    own = _claimed(ledger["sites"][site], "epsilon", f"ledger.sites.{site}")
    eps_rdp, eps_pld = _recomputed(figures, site, label, problems)
    _compare(label, f"ledger's own RDP epsilon (ledger.sites.{site}.epsilon)",
             own, eps_rdp, delta, problems)
    rows.append(
        Row.of("ledger", site, unit, len(events),
               own, eps_rdp, None, eps_pld,
               len(problems) == before))
  return VerifyResult(ok=not problems,
                      rows=rows,
                      problems=problems,
                      private=True,
                      num_events=sum(len(e) for e in sites.values()))


_COLUMNS = ("ledger", "site", "unit", "events", "claimed RDP", "recomputed RDP",
            "claimed PLD", "recomputed PLD", "ok")


def format_table(rows: Sequence[Row]) -> str:
  """The rows as an aligned text table (header first)."""
  cells = [_COLUMNS] + [(r.ledger, r.site, r.unit, str(
      r.events), _format_number(r.claimed_rdp), _format_number(
          r.rdp), _format_number(r.claimed_pld), _format_number(
              r.pld), "ok" if r.ok else "FAIL") for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
  return "\n".join(" | ".join(c.ljust(w)
                              for c, w in zip(row, widths)).rstrip()
                   for row in cells)


# -- sweeps -------------------------------------------------------------------

SWEEP_JSON = "sweep.json"


@dataclasses.dataclass(frozen=True)
class SweepResult:
  """Outcome of `verify_sweep`: each member's `VerifyResult` and the
  composed release's."""

  ok: bool
  members: dict
  release: VerifyResult | None
  problems: list

  @property
  def summary(self) -> str:
    if self.ok:
      return (f"verified: {len(self.members)} members, and releasing all "
              "private members together")
    return f"MISMATCH: {len(self.problems)} problem(s); see the FAIL lines"


def verify_sweep(workdir: str, workers: int | str = 1) -> SweepResult:
  """Checks a sweep's directory: every member's report (`verify_report`)
  and `sweep.json`'s `release_all_members`, whose ledger must hold, per
  site, every private member's main-ledger events in member order and whose
  epsilons must recompute from them."""
  summary = fields.load_report(os.path.join(workdir, SWEEP_JSON))
  fields.get(summary, "members", SWEEP_JSON, "list")
  # The members on disk (index-prefixed names, so sorted is member order),
  # not the list sweep.json gives.
  root = os.path.join(workdir, "members")
  names = sorted(n for n in (os.listdir(root) if os.path.isdir(root) else [])
                 if os.path.isfile(os.path.join(root, n, "report.json")))
  listed = [e.get("name") for e in summary["members"]
            if isinstance(e, Mapping)]
  results, problems, composed = {}, [], {}
  if listed != names:
    problems.append(f"FAIL {SWEEP_JSON}: lists members {listed}, the "
                    f"members/ directory holds {names}")
  private, deltas, units = [], [], set()
  for name in names:
    report = fields.load_report(os.path.join(root, name))
    result = verify_report(report, workers=workers)
    results[name] = result
    problems += [f"member {name}: {line}" for line in result.problems]
    if result.private:
      private.append(name)
      deltas.append(float(report["privacy"]["delta"]))
      units.add(report["privacy"]["ledger"]["unit"])
      sites, _ = epsilons.parse_ledger(report["privacy"]["ledger"],
                                       f"member {name} ledger")
      for site, events in sites.items():
        composed.setdefault(site, []).extend(events)
  release = summary.get("release_all_members")
  if not composed:
    return SweepResult(ok=not problems, members=results, release=None,
                       problems=problems)
  if not isinstance(release, Mapping):
    problems.append(f"FAIL {SWEEP_JSON}: no release_all_members for its "
                    "private members")
    return SweepResult(ok=False, members=results, release=None,
                       problems=problems)
  delta = float(fields.get(release, "delta", "release_all_members", "number"))
  unit = fields.get(release, "unit", "release_all_members", "str")
  for what, got, want in (("members", release.get("members"), private),
                          ("delta", delta, min(deltas)),
                          ("unit", {unit}, units)):
    if got != want:
      problems.append(f"FAIL release_all_members: {what} is {got!r}, the "
                      f"private members give {want!r}")
  rows, release_problems = [], []
  ledger = fields.get(release, "ledger", "release_all_members", "object")
  got, orders = epsilons.parse_ledger(ledger, "release_all_members.ledger")
  for site, events in composed.items():
    if len(got.get(site, [])) != len(events) or any(
        epsilons.diff(a, b, "event") for a, b in zip(got[site], events)):
      release_problems.append(
          f"FAIL site {site!r}, release_all_members.ledger: not the private "
          "members' events in member order")
  figures = epsilons.recompute_sites(
      got, orders, delta,
      float(
          release.get("pld_value_discretization_interval",
                      DEFAULT_PLD_INTERVAL)), workers)
  claimed_rdp = fields.get(release, "epsilon_per_site", "release_all_members",
                           "object")
  claimed_pld = fields.get(release, "epsilon_pld_per_site",
                           "release_all_members", "object")
  for site in got:
    label = f"FAIL site {site!r}, release_all_members"
    eps_rdp, eps_pld = figures[site]
    c_rdp = _claimed(claimed_rdp, site, "release_all_members.epsilon_per_site")
    c_pld = _claimed(claimed_pld, site,
                     "release_all_members.epsilon_pld_per_site")
    _compare(label, "claimed RDP epsilon", c_rdp, eps_rdp, delta,
             release_problems)
    _compare(label, "claimed PLD epsilon", c_pld, eps_pld, delta,
             release_problems)
    rows.append(
        Row.of("release_all_members", site, unit, len(got[site]),
               c_rdp, eps_rdp, c_pld, eps_pld,
               not any(site in line for line in release_problems)))
  release_result = VerifyResult(ok=not release_problems,
                                rows=rows,
                                problems=release_problems,
                                num_events=sum(len(e) for e in got.values()))
  problems += release_problems
  return SweepResult(ok=not problems,
                     members=results,
                     release=release_result,
                     problems=problems)

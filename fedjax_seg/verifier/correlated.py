"""The plan of a run with correlated noise, and the site-level plan,
re-derived.

With --noise_mechanism=banded or blt the runner adds the matrix mechanism's
noise x_t = g_t + (C^{-1} z)_t in every site (`privacy.correlated`), or
with --unit=site at the server over rounds (`check_site_level`, which also
checks every independent DP-FedAvg ledger). This module derives, with its
own code, from the config, the site sizes and the strategy C the report
stores (`privacy.plan.noise_mechanism.strategy`):

  * the cyclic groups: site k's units in b_k = max(1, N_k // --batch_size)
    groups (banded: at most --mf_bands; never more than the stream's
    steps), each unit's drawn at random; the
    sampling rate (banded: min(1, B b_k / N_k) within the step's group;
    blt: 1, the whole group) and the maximum batch (the largest site plus
    one unit: random groups are never truncated);
  * each site's C (`privacy.plan.noise_mechanism.strategy_per_site`): banded, exactly b_k coefficients
    of norm <= 1 + 1e-6; blt, at most --blt_max_buffers buffers; both with
    non-negative, non-increasing Toeplitz coefficients (what the
    sensitivity relies on);
  * the sensitivity of a blt stream: the largest ||C u||^2 over
    participations b_k apart, whose worst case for such coefficients is
    the most participations, b_k apart from step 0 (McMahan et al. 2024,
    arXiv 2405.13763, Thm. 2): computed here as the norm of a sum of
    shifted columns;
  * every round's event: banded, the DP-SGD event of the steps in which
    group 0 trains (the multiples of b among the round's steps; Choquette-
    Choo et al. 2023, Thm. 4) at sigma / ||c||; blt, a Gaussian of noise
    multiplier sigma / sqrt(the round's increase of the sensitivity^2)
    (Gaussians compose by adding 1 / sigma^2, so the rounds compose to the
    whole stream's mechanism; a round that adds nothing is a no-op);
  * with --target_epsilon, each site's sigma meets the target over all
    rounds and 0.99 of it does not.

What it trusts, besides the plan module's list: the two theorems above.
"""

import json
import math
from typing import Mapping

import numpy as np

from fedjax_seg.verifier import epsilons
from fedjax_seg.verifier import fields

MECHANISMS = ("independent", "banded", "blt")
MINIMALITY = 0.99
NORM_SLACK = 1e-6  # A float32 strategy's norm may exceed 1 by rounding.


def toeplitz_column(strategy: Mapping, n: int, path: str) -> np.ndarray:
  """[n] C's first column from the report's strategy."""
  kind = strategy.get("kind")
  if kind == "banded":
    c = np.asarray(fields.get(strategy, "coefs", path, "list"), np.float64)
    out = np.zeros(n)
    out[:min(n, c.size)] = c[:n]
    return out
  if kind == "blt":
    decay = np.asarray(fields.get(strategy, "buf_decay", path, "list"),
                       np.float64)
    scale = np.asarray(fields.get(strategy, "output_scale", path, "list"),
                       np.float64)
    if decay.shape != scale.shape or decay.size == 0:
      raise fields.ReportError(f"{path}: buf_decay and output_scale must "
                               "have one (non-zero) length.")
    out = np.ones(n)
    for i in range(1, n):
      out[i] = float(np.sum(scale * decay ** (i - 1)))
    return out
  raise fields.ReportError(f"{path}.kind: {kind!r} is not banded or blt.")


def minsep_sensitivity_squared(column: np.ndarray, n: int,
                               min_sep: int) -> float:
  """||sum_j C[:, j * min_sep]||^2 over the first n rows: participations at
  0, b, 2b, ... < n, the worst case for non-negative, non-increasing
  Toeplitz coefficients."""
  total = np.zeros(n)
  for start in range(0, n, min_sep):
    total[start:] += column[:n - start]
  return float(total @ total)


def json_key(value) -> str:
  return json.dumps(value, sort_keys=True)


def participations(r: int, local_steps: int, b: int) -> int:
  """Multiples of b among the steps of round r."""
  return (math.ceil((r + 1) * local_steps / b)
          - math.ceil(r * local_steps / b))


def stream_events(value: float, rounds: int, local_steps: int, b: int,
                  norm: float | None, rate: float, sens) -> list:
  """Every round's event of one stream at fresh-noise sigma `value`
  (float32): amplified banded (`norm` given), DP-SGD on group 0's steps at
  sigma / ||c||; otherwise a Gaussian of sigma / sqrt(the round's increase
  of the sensitivity^2 `sens` [rounds + 1]) (Gaussians compose by adding
  1 / sigma^2; a round that adds nothing is a no-op)."""
  applied = float(np.float32(value))
  out = []
  for r in range(rounds):
    if norm is not None:
      out.append(epsilons.planned_event(applied / norm, rate,
                                        participations(r, local_steps, b)))
    else:
      increment = sens[r + 1] - sens[r]
      out.append(epsilons.planned_event(
          applied / math.sqrt(increment) if increment > 0 else applied,
          1.0, int(increment > 0)))
  return out


def strategy_problem(strategy, kind: str, n: int, bands: int | None,
                     max_buffers: int, label: str):
  """(C's first column, banded norm or None, a problem line or None) of a
  reported strategy: the kind asked for; Toeplitz coefficients positive at
  0, non-negative and non-increasing; banded, exactly `bands` coefficients
  of norm <= 1; blt, at most `max_buffers` buffers."""
  if not isinstance(strategy, Mapping) or strategy.get("kind") != kind:
    return None, None, f"{label} is not a {kind} strategy"
  column = toeplitz_column(strategy, n, label)
  if not column[0] > 0 or np.any(column < 0) or np.any(np.diff(column) > 0):
    return column, None, (f"{label}: its Toeplitz coefficients are not "
                          "positive at 0, non-negative and non-increasing")
  if kind == "banded":
    coefs = np.asarray(strategy.get("coefs", ()), np.float64)
    norm = float(np.linalg.norm(coefs))
    if coefs.size != bands or norm > 1 + NORM_SLACK:
      return column, norm, (f"{label} has {coefs.size} bands of norm {norm}; "
                            f"derived {bands} bands, norm <= 1")
    return column, norm, None
  if len(strategy.get("buf_decay", ())) > max_buffers:
    return column, None, (f"{label} has more buffers than "
                          f"--blt_max_buffers={max_buffers}")
  return column, None, None


def check_site_level(s, privacy: Mapping, path: str, ledger, names, training,
                     done: int, prior, problems: list) -> dict:
  """Checks the site-level ledger of DP-FedAvg (independent noise at
  --site_noise_multiplier, or calibrated by --site_target_epsilon, or
  correlated over rounds: --unit=site with --noise_mechanism=banded|blt);
  returns {site: the event round `done` would add}.

  Derived here: b = floor(1 / q) cyclic groups of sites (banded: at most
  --mf_bands), the group's rate (banded: min(1, q b); blt: 1), C's
  validity, the stream's events (one stream, one step per round, every
  training site charged every round) and, with a target, z's minimality.
  """
  sites, orders = ledger
  section = privacy if path == "privacy" else privacy.get("site_level", {})
  plan = fields.get(section, "plan", path, "object")
  where = f"{path}.plan"
  q = s.site_sampling_rate
  z = (s.site_noise_multiplier if s.site_target_epsilon is None else
       float(fields.get(plan, "noise_multiplier", where, "number")))
  correlated = s.noise_mechanism != "independent" and not s.record_level
  if not correlated:
    def events(value):
      return [epsilons.planned_event(float(np.float32(value)), q, 1)
              ] * s.rounds
  else:
    banded = s.noise_mechanism == "banded"
    b = min(max(1, int(math.floor(1.0 / q + 1e-9))), s.rounds)
    if banded:
      b = min(b, s.mf_bands)
    mech = fields.get(plan, "noise_mechanism", where, "object")
    listed = fields.get(mech, "strategy_per_site", f"{where}.noise_mechanism",
                        "list")
    if mech.get("kind") != s.noise_mechanism or mech.get("cycles") != [b] or (
        len(listed) != 1):
      problems.append(f"FAIL plan: {where}.noise_mechanism is a "
                      f"{mech.get('kind')!r} stream of cycles "
                      f"{mech.get('cycles')!r}; derived one "
                      f"{s.noise_mechanism} stream of {b} groups")
      return {}
    column, norm, problem = strategy_problem(
        listed[0], s.noise_mechanism, s.rounds, b if banded else None,
        s.blt_max_buffers, f"FAIL plan: {where}.noise_mechanism.strategy")
    if problem:
      problems.append(problem)
      return {}
    rate = min(1.0, q * b) if banded else 1.0
    if not fields.close(mech.get("group_sampling_rate", -1.0), rate):
      problems.append(f"FAIL plan: {where}.noise_mechanism."
                      f"group_sampling_rate differs from the derived {rate}")
    sens = None if banded else [minsep_sensitivity_squared(column, r, b)
                                for r in range(s.rounds + 1)]

    def events(value):
      return stream_events(value, s.rounds, 1, b, norm, rate, sens)

  mine = events(z)
  checked = {}
  for n in names:
    before = list(prior.get(n, ()))
    epsilons.compare_events(sites.get(n, []),
                            before + (mine[:done] if training[n] else []),
                            f"FAIL site {n!r}, ledger {path}.ledger",
                            problems)
    if s.site_target_epsilon is not None and training[n]:
      key = tuple(map(repr, before))
      if key not in checked:
        checked[key] = tuple(
            epsilons.rdp_epsilon(before + events(value), orders, s.delta)
            for value in (z, z * MINIMALITY))
  if checked:
    # One z for all sites: every training site meets the target, and 0.99 z
    # would take the most spent one past it.
    problem = epsilons.calibration_problem(
        f"FAIL plan: {where}.noise_multiplier", z,
        max(at for at, _ in checked.values()),
        max(below for _, below in checked.values()), s.site_target_epsilon,
        "all rounds at every training site", MINIMALITY)
    if problem:
      problems.append(problem.replace("--target_epsilon",
                                      "--site_target_epsilon"))
  if done >= s.rounds:
    return {}
  return {n: mine[done] for n in names if training[n]}


def site_plan_events(plan: Mapping, path: str, z: float, rounds: list):
  """For the report's own site-level plan: None without correlated noise
  at the server, else the events of `rounds` from its stream (C, groups,
  the group's rate) at z (`check_site_level` derives those itself)."""
  mech = plan.get("noise_mechanism")
  if mech is None:
    return None
  where = f"{path}.noise_mechanism"
  kind = fields.get(mech, "kind", where, "str")
  cycles = fields.get(mech, "cycles", where, "list")
  listed = fields.get(mech, "strategy_per_site", where, "list")
  rate = fields.get(mech, "group_sampling_rate", where, "number")
  if kind not in ("banded", "blt") or len(cycles) != 1 or len(listed) != 1 or (
      not fields.kind_ok(cycles[0], "int") or cycles[0] < 1) or not (
          0 < rate <= 1):
    raise fields.ReportError(f"{where}: one banded or blt stream with "
                             "cycles >= 1 and a rate in (0, 1].")
  n = max(rounds, default=-1) + 1
  column = toeplitz_column(listed[0], max(n, 1), f"{where}.strategy_per_site")
  b = int(cycles[0])
  amplified = kind == "banded" and len(listed[0].get("coefs", ())) <= b
  norm = (float(np.linalg.norm(np.asarray(listed[0]["coefs"], np.float64)))
          if amplified else None)
  sens = None if amplified else [minsep_sensitivity_squared(column, r, b)
                                 for r in range(n + 1)]
  events = stream_events(z, n, 1, b, norm, float(rate), sens)
  return [events[r] for r in rounds]


def plan_event_function(plan: Mapping, path: str, site: str):
  """For the report's own plan (`privacy.plan`): None without correlated
  noise, else `(round, sigma, q, max_batch) -> the event` of `site`'s
  cyclic group in that round (its count from `event_counts_per_round`;
  `check_record_level` derives those counts itself)."""
  mech = plan.get("noise_mechanism")
  if mech is None:
    return None
  where = f"{path}.noise_mechanism"
  names = list(fields.site_map(plan, "dataset_size_per_site", path))
  k = names.index(site)
  kind = fields.get(mech, "kind", where, "str")
  counts = fields.get(mech, "event_counts_per_round", where, "list")
  if kind not in ("banded", "blt") or len(counts) != len(names) or not all(
      isinstance(row, list) and all(fields.kind_ok(c, "int") and c >= 0
                                    for c in row) for row in counts):
    raise fields.ReportError(f"{where}: kind must be banded or blt and "
                             "event_counts_per_round ints >= 0, per site.")

  def event(r, sigma, q, max_batch):
    del max_batch  # Random groups are never truncated.
    if r >= len(counts[k]):
      raise fields.ReportError(f"{where}.event_counts_per_round: no round "
                               f"{r} for site {site!r}.")
    return epsilons.planned_event(sigma, q if kind == "banded" else 1.0,
                                  counts[k][r])

  return event


def check_record_level(s, privacy: Mapping, ledger, names, units, training,
                       charged, done: int, prior, problems: list) -> dict:
  """Checks a correlated-noise run's record-level ledger; returns {site:
  the event round `done` would add}."""
  sites, orders = ledger
  plan = fields.get(privacy, "plan", "privacy", "object")
  where = "privacy.plan.noise_mechanism"
  mech = fields.get(plan, "noise_mechanism", "privacy.plan", "object")
  if mech.get("kind") != s.noise_mechanism:
    problems.append(f"FAIL plan: {where}.kind is {mech.get('kind')!r}, "
                    f"--noise_mechanism={s.noise_mechanism}")
    return {}
  for ok, what in (
      (s.schedule == "constant", "--noise_schedule=constant"),
      (s.adaptive_clipping == "off", "--adaptive_clipping=off"),
      (not s.audit, "no --audit"),
      (not s.joins and not s.leaves and s.sites_per_round == 0
       and s.dropout_rate == 0 and not s.cohorts
       and not (s.use_site_level and s.site_sampling_rate < 1),
       "every site in every round"),
      (s.mf_bands >= 1 and s.blt_max_buffers >= 1,
       "--mf_bands and --blt_max_buffers >= 1"),
      (all(units[m] >= 1 for m in names), "every site with units")):
    if not ok:
      problems.append(f"FAIL plan: correlated noise needs {what}")
      return {}
  banded = s.noise_mechanism == "banded"
  n = s.rounds * s.local_steps
  cycles = {m: min(max(1, units[m] // s.batch_size), n) for m in names}
  if banded:
    cycles = {m: min(b, s.mf_bands) for m, b in cycles.items()}
  listed = fields.get(mech, "strategy_per_site", where, "list")
  if len(listed) != len(names):
    raise fields.ReportError(f"{where}.strategy_per_site: one per site.")
  columns, norms = {}, {}
  for m, strategy in zip(names, listed):
    columns[m], norms[m], problem = strategy_problem(
        strategy, s.noise_mechanism, n, cycles[m], s.blt_max_buffers,
        f"FAIL plan: {where}.strategy_per_site[{m!r}]")
    if problem:
      problems.append(problem)
      return {}
  rates = {m: min(1.0, s.batch_size * cycles[m] / units[m]) if banded
           else 1.0 for m in names}
  max_batch = max(units.values()) + 1
  if mech.get("cycles") != [cycles[m] for m in names]:
    problems.append(f"FAIL plan: {where}.cycles is {mech.get('cycles')!r}, "
                    f"derived {[cycles[m] for m in names]}")
  if plan.get("max_batch_size") != max_batch:
    problems.append(f"FAIL plan: privacy.plan.max_batch_size is "
                    f"{plan.get('max_batch_size')!r}, derived {max_batch}")
  got = plan.get("sampling_rate_per_site", {})
  if any(not fields.close(got.get(m, -1.0), rates[m]) for m in names):
    problems.append("FAIL plan: privacy.plan.sampling_rate_per_site differs "
                    "from the derived cyclic-group rates")
  if s.target_epsilon is None:
    sigma = {m: s.noise_multiplier for m in names}
  else:
    claimed = fields.get(privacy, "noise_multiplier_per_site", "privacy",
                         "object")
    sigma = {m: float(fields.site_value(
        claimed, m, "privacy.noise_multiplier_per_site", "number"))
             for m in names}
  sens = {m: [minsep_sensitivity_squared(columns[m], r * s.local_steps,
                                         cycles[m])
              for r in range(s.rounds + 1)] for m in names if not banded}

  counts = [[participations(r, s.local_steps, cycles[m]) if banded
             else int(sens[m][r + 1] > sens[m][r]) for r in range(s.rounds)]
            for m in names]
  if mech.get("event_counts_per_round") != counts:
    problems.append(f"FAIL plan: {where}.event_counts_per_round differs "
                    "from the derived counts")

  def events(m, value):
    """Site m's events of every round at fresh-noise sigma `value`."""
    return stream_events(value, s.rounds, s.local_steps, cycles[m],
                         norms[m] if banded else None, rates[m],
                         None if banded else sens[m])

  trained = fields.get(plan, "rounds_trained_per_site", "privacy.plan",
                       "object")
  checked = {}
  for m in names:
    label = f"FAIL site {m!r}, ledger privacy.ledger"
    if charged[m] != trained.get(m):
      problems.append(f"{label}: privacy.plan.rounds_trained_per_site "
                      f"differs from the derived rounds {charged[m][:10]}")
    before = list(prior.get(m, ()))
    mine = events(m, sigma[m])
    want = before + [mine[r] for r in charged[m]]
    epsilons.compare_events(sites.get(m, []), want, label, problems)
    if s.target_epsilon is None or not training[m]:
      continue
    key = (rates[m], cycles[m], sigma[m], json_key(listed[names.index(m)]),
           tuple(map(repr, before)))
    if key not in checked:
      checked[key] = tuple(
          epsilons.rdp_epsilon(before + events(m, value), orders, s.delta)
          for value in (sigma[m], sigma[m] * MINIMALITY))
    problem = epsilons.calibration_problem(
        label, sigma[m], *checked[key], s.target_epsilon, "all rounds",
        MINIMALITY)
    if problem:
      problems.append(problem)
  if done >= s.rounds:
    return {}
  return {m: events(m, sigma[m])[done] for m in names if training[m]}

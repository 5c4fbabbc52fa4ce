"""Independent epsilon verifier: `python -m fedjax_seg.privacy.verify PATH`.

PATH is a run's workdir (its `report.json` is read), a `report.json` file,
or a bare `PrivacyLedger` JSON dump (`ledger.to_json()`, e.g. from your own
DP-SGD code; only the epsilons are checked then, see `verify_ledger`).

What it recomputes, and from what:
  Every epsilon the report claims, from the events saved in the report's
  privacy ledger(s) (`privacy.ledger` and, if present,
  `privacy.site_level.ledger`; format "fedjax_seg.PrivacyLedger/2"), with
  plain dp_accounting and nothing else:
    * RDP: per site, every event is composed into one
      `dp_accounting.rdp.RdpAccountant(orders, ADD_OR_REMOVE_ONE)` over the
      ledger's `orders`, each `TruncatedSubsampledGaussianDpEvent(D, q, B,
      sigma)` replaced by `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`
      with truncation probability P = binom.sf(B, D, q) per step (D is already
      the larger neighbour's size N + 1; times the SelfComposed count). With
      P_T the summed P: epsilon = compute_epsilon(orders, rdp, delta) if
      P_T == 0, else eps_hi = compute_epsilon(.., delta / 2), slack = (1 +
      e^min(eps_hi, 700)) * P_T, which must be <= delta / 2, and epsilon =
      compute_epsilon(.., delta - slack) (a coupling argument).
    * PLD: per site, one `dp_accounting.pld.PLDAccountant(ADD_OR_REMOVE_ONE,
      interval)` composing one `ComposedDpEvent` of `SelfComposedDpEvent(base,
      total count)` per distinct base event (first-seen order; unhashable
      events kept as they are), at the report's
      `privacy.pld_value_discretization_interval` (1e-4 if absent). PLD
      accounts truncated sampling exactly.
  Both at the report's `privacy.delta`. The recomputed figures must equal the
  claimed `epsilon_per_site`, the ledger's own `sites[s].epsilon`,
  `epsilon_pld_per_site` and `epsilon_max` to a relative 1e-6 (absolute 1e-9
  near zero). The ledger header must agree with the report (delta, unit,
  add/remove-one), and every event must be the one the report's `plan` says
  the configuration produces, round by round (see `verify_report`).

What it trusts:
  The report's `plan` fields ARE the configuration (dataset sizes, sampling
  rates, maximum batch, local steps, rounds trained, per-round sigma); they are
  not re-derived from the run's flags or data. The ledger's RDP `orders` are
  taken as given (any set of orders gives a valid RDP bound). dp_accounting
  itself.

What it cannot check:
  That the recorded events are the ones the device really applied (the runner
  checks the applied noise multiplier and sampling rate against the plan at
  run time, before recording them); that the noise seed was secret and the
  sampler sound; anything about events that were never recorded.

Exit codes: 0 every epsilon recomputes (or the run is not private: then it
prints "NOT PRIVATE: nothing to verify" loudly and checks nothing); 1 at
least one mismatch (one line per mismatch, naming ledger and site); 2 the
input cannot be read (missing file or field, malformed JSON, unknown ledger
format, an event that is not a dp_accounting event).

This module deliberately imports nothing from fedjax_seg: only the standard
library, numpy, scipy and dp_accounting, so the computation is independent of
the code that produced the ledger. (`python -m fedjax_seg.privacy.verify`
still runs the packages' `__init__` files, which import jax and the project's
privacy code, though nothing of them is used; to run no project code at all,
run this file as a script, `python fedjax_seg/privacy/verify.py PATH`, or copy
it anywhere.) `verify_report(report)` runs the same checks in-process.

Cost: dp_accounting's own computations, the same as the report's. RDP takes
about 0.1 s per distinct event. PLD takes about a second per distinct Poisson
event and about 5 s per distinct truncated event at interval 1e-4 (about 0.5 s
at 1e-3), so a run whose sigma changes every round costs minutes. Both are
cached per distinct input (they are pure functions): repeated events, and
sites with identical events (every site of a site-level ledger), are computed
once. With 32 or more distinct events (summed over sites with distinct
events), the command line and the runners recompute sites in parallel, one
worker process per core (this file run as a script; `verify_report(report,
workers=...)`; the default, 1, computes in-process).
"""

import argparse
import dataclasses
import functools
import json
import logging
import math
import numbers
import os
import pickle
import subprocess
import sys
from typing import Any, Mapping, Sequence

import dp_accounting
from dp_accounting import dp_event
from dp_accounting import pld
from dp_accounting import rdp
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import stats

LEDGER_FORMAT = "fedjax_seg.PrivacyLedger/2"
UNITS = ("example", "patient", "site")
NEIGHBORING_RELATION = "ADD_OR_REMOVE_ONE"
DEFAULT_PLD_INTERVAL = 1e-4
REL_TOL = 1e-6
ABS_TOL = 1e-9
EXIT_OK, EXIT_MISMATCH, EXIT_INPUT = 0, 1, 2

_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
_MISSING = object()


class ReportError(ValueError):
  """The report cannot be read: a missing or malformed field (exit code 2)."""


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


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """Outcome of `verify_report`.

  ok: no mismatch (True also for a non-private run, where `private` is False
    and nothing was checked).
  rows: one `Row` per (ledger, site).
  problems: one line per mismatch, naming ledger and site.
  private: False if the report says privacy was disabled.
  num_events: events recomputed, over all ledgers and sites.
  """
  ok: bool
  rows: list
  problems: list
  private: bool = True
  num_events: int = 0

  @property
  def summary(self) -> str:
    if not self.private:
      return "NOT PRIVATE: nothing to verify (privacy.enabled is false)"
    if self.ok:
      return (f"verified: all {len(self.rows)} epsilons recompute (RDP and "
              f"PLD) from {self.num_events} events")
    return (f"MISMATCH: {len(self.problems)} problem(s) in "
            f"{sum(not r.ok for r in self.rows)} of {len(self.rows)} "
            f"site epsilons; see the FAIL lines")


# -- reading fields -----------------------------------------------------------


def _kind_ok(value, kind: str) -> bool:
  if kind == "object":
    return isinstance(value, Mapping)
  if kind == "list":
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))
  if kind == "str":
    return isinstance(value, str)
  if kind == "bool":
    return isinstance(value, bool)
  if kind == "int":
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
  if kind == "number":
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
  raise AssertionError(kind)


def _get(obj: Mapping, key: str, path: str, kind: str, default=_MISSING):
  """obj[key], checked to be of `kind`; ReportError naming `path.key`."""
  where = f"{path}.{key}" if path else key
  if key not in obj or obj[key] is None:
    if default is not _MISSING:
      return default
    raise ReportError(f"{where}: missing (or null).")
  value = obj[key]
  if not _kind_ok(value, kind):
    raise ReportError(f"{where}: expected {kind}, got {type(value).__name__} "
                      f"{value!r:.60}.")
  return value


def _site_map(obj: Mapping, key: str, path: str) -> Mapping:
  return _get(obj, key, path, "object")


def _site_value(mapping: Mapping, site: str, path: str, kind: str):
  return _get(mapping, site, path, kind)


def _close(a: float, b: float) -> bool:
  return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def _fmt(x) -> str:
  if x is None:
    return "-"
  return f"{x:.6f}"


# -- events -------------------------------------------------------------------


def event_from_json(data: Any, path: str) -> dp_event.DpEvent:
  """Rebuilds a dp_accounting event from its `to_named_tuple()` dict.

  Only classes defined in `dp_accounting.dp_event` are built; any other
  module_name is refused (the JSON must not name code to import).
  """

  def convert(value, where):
    if isinstance(value, Mapping):
      if "class_name" in value:
        return build(value, where)
      return {k: convert(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
      return [convert(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value

  def build(value, where):
    module, name = value.get("module_name"), value.get("class_name")
    if module != dp_event.__name__:
      raise ReportError(f"{where}: not a dp_accounting event (module_name "
                        f"{module!r}, expected {dp_event.__name__!r}).")
    cls = (getattr(dp_event, name, None)
           if isinstance(name, str) and not name.startswith("_") else None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent)
            and cls.__module__ == dp_event.__name__):
      raise ReportError(f"{where}: {name!r} is not a class of "
                        f"{dp_event.__name__}.")
    kwargs = {k: convert(v, f"{where}.{k}") for k, v in value.items()
              if k not in ("module_name", "class_name")}
    try:
      return cls(**kwargs)
    except (TypeError, ValueError) as e:
      raise ReportError(f"{where}: cannot build {name}: {e}") from e

  if not (isinstance(data, Mapping) and "class_name" in data):
    raise ReportError(f"{path}: not an event (an object with class_name).")
  return build(data, path)


def _event_fields(event: dp_event.DpEvent) -> list[str]:
  return [f for f in event.to_named_tuple()._fields
          if f not in ("module_name", "class_name")]


def _contains(event, cls) -> bool:
  if isinstance(event, cls):
    return True
  if isinstance(event, dp_event.DpEvent):
    return any(_contains(getattr(event, f), cls) for f in _event_fields(event))
  if isinstance(event, (list, tuple)):
    return any(_contains(e, cls) for e in event)
  return False


def _diff(actual, expected, where: str) -> str | None:
  """First difference between an event and the planned one, or None."""
  if isinstance(expected, dp_event.DpEvent):
    if type(actual) is not type(expected):
      return (f"{where} is {type(actual).__name__}, the plan gives "
              f"{type(expected).__name__}")
    for f in _event_fields(expected):
      d = _diff(getattr(actual, f), getattr(expected, f), f"{where}.{f}")
      if d:
        return d
    return None
  if isinstance(expected, bool) or not isinstance(expected, numbers.Real):
    return None if actual == expected else (
        f"{where} is {actual!r}, the plan gives {expected!r}")
  if not _kind_ok(actual, "number"):
    return f"{where} is {actual!r}, the plan gives {expected!r}"
  if isinstance(expected, numbers.Integral):
    same = actual == expected
  else:
    same = math.isclose(float(actual), float(expected), rel_tol=REL_TOL,
                        abs_tol=0.0)
  return None if same else (
      f"{where.split('.')[-1]} is {actual!r}, the plan gives {expected!r}")


def _planned_event(sigma: float, q: float, steps: int,
                   dataset_size: int | None = None,
                   max_batch_size: int | None = None) -> dp_event.DpEvent:
  """What the configuration says the ledger must record for one round."""
  if steps == 0:
    return dp_event.NoOpDpEvent()
  if sigma == 0:
    return dp_event.NonPrivateDpEvent()
  if max_batch_size is not None and q < 1:
    step = dp_event.TruncatedSubsampledGaussianDpEvent(
        dataset_size=int(dataset_size) + 1, sampling_probability=float(q),
        truncated_batch_size=int(max_batch_size),
        noise_multiplier=float(sigma))
  elif q < 1:
    step = dp_event.PoissonSampledDpEvent(
        float(q), dp_event.GaussianDpEvent(float(sigma)))
  else:
    step = dp_event.GaussianDpEvent(float(sigma))
  return dp_event.SelfComposedDpEvent(step, int(steps))


# -- recomputation ------------------------------------------------------------


def _untruncated(event) -> tuple[dp_event.DpEvent, float]:
  """(event with truncated sampling replaced by Poisson, summed P_T)."""
  if isinstance(event, dp_event.TruncatedSubsampledGaussianDpEvent):
    p = float(stats.binom.sf(event.truncated_batch_size, event.dataset_size,
                             event.sampling_probability))
    return dp_event.PoissonSampledDpEvent(
        event.sampling_probability,
        dp_event.GaussianDpEvent(event.noise_multiplier)), p
  if isinstance(event, dp_event.SelfComposedDpEvent):
    inner, p = _untruncated(event.event)
    return dp_event.SelfComposedDpEvent(inner, event.count), p * event.count
  if isinstance(event, dp_event.ComposedDpEvent):
    parts = [_untruncated(e) for e in event.events]
    return (dp_event.ComposedDpEvent([e for e, _ in parts]),
            sum(p for _, p in parts))
  return event, 0.0


class _Unaccountable(Exception):
  pass


def _hashable(value) -> bool:
  try:
    hash(value)
  except TypeError:
    return False
  return True


def _event_rdp(event: dp_event.DpEvent, orders: tuple) -> Any:
  """RDP vector of one event over `orders`, from a fresh RdpAccountant.

  Adding these vectors in order is exactly what one accountant composing
  every event does (it adds each event's RDP to its running vector), so the
  cache below changes no digit; it only skips recomputing a repeated event.
  """
  if _hashable(event):
    return _cached_event_rdp(event, orders)
  return _uncached_event_rdp(event, orders)  # E.g. a ComposedDpEvent.


def _uncached_event_rdp(event, orders):
  accountant = rdp.RdpAccountant(list(orders), _ADD_REMOVE)
  if not accountant.supports(event):
    raise _Unaccountable(f"the RDP accountant does not support {event}")
  accountant.compose(event)
  result = accountant.rdp
  result.setflags(write=False)
  return result


_cached_event_rdp = functools.lru_cache(maxsize=4096)(_uncached_event_rdp)


def rdp_epsilon(events: Sequence[dp_event.DpEvent], orders: Sequence[float],
                delta: float) -> float:
  """RDP epsilon of composing `events` (truncation through the coupling)."""
  orders = tuple(float(o) for o in orders)
  total = np.zeros(len(orders))
  p_trunc = 0.0
  for event in events:
    untruncated, p = _untruncated(event)
    total = total + _event_rdp(untruncated, orders)
    p_trunc += p
  if p_trunc == 0.0:
    return float(rdp_privacy_accountant.compute_epsilon(orders, total,
                                                        delta)[0])
  eps_hi = rdp_privacy_accountant.compute_epsilon(orders, total, delta / 2)[0]
  slack = (1.0 + math.exp(min(eps_hi, 700.0))) * p_trunc
  if not slack <= delta / 2:
    raise _Unaccountable(
        f"batch truncation is not negligible: summed truncation probability "
        f"{p_trunc:.3g} costs {slack:.3g} of delta={delta:g} (> delta / 2)")
  return float(rdp_privacy_accountant.compute_epsilon(orders, total,
                                                      delta - slack)[0])


def grouped(events: Sequence[dp_event.DpEvent]) -> dp_event.ComposedDpEvent:
  """Equal events counted together, in first-seen order."""
  counts: dict = {}
  unhashable = []
  for event in events:
    base, count = ((event.event, event.count) if isinstance(
        event, dp_event.SelfComposedDpEvent) else (event, 1))
    try:
      counts[base] = counts.get(base, 0) + count
    except TypeError:
      unhashable.append(event)
  return dp_event.ComposedDpEvent(
      [dp_event.SelfComposedDpEvent(base, n) for base, n in counts.items()]
      + unhashable)


def pld_epsilon(events: Sequence[dp_event.DpEvent], delta: float,
                value_discretization_interval: float = DEFAULT_PLD_INTERVAL
                ) -> float:
  """PLD epsilon of composing `events` (grouped; 0 for no events)."""
  if not events:
    return 0.0
  parts = tuple(grouped(events).events)
  if _hashable(parts):
    # Sites with the same events (every site of a site-level ledger) cost one
    # computation: the result is a function of the grouped events alone.
    return _cached_pld_epsilon(parts, float(delta),
                               float(value_discretization_interval))
  return _uncached_pld_epsilon(parts, delta, value_discretization_interval)


def _uncached_pld_epsilon(events, delta, value_discretization_interval):
  accountant = pld.PLDAccountant(_ADD_REMOVE, value_discretization_interval)
  composed = dp_event.ComposedDpEvent(list(events))
  if not accountant.supports(composed):
    unsupported = sorted({
        type(getattr(e, "event", e)).__name__ for e in events
        if not pld.PLDAccountant(_ADD_REMOVE).supports(e)})
    raise _Unaccountable(f"the PLD accountant does not support "
                         f"{', '.join(unsupported)}")
  accountant.compose(composed)
  return float(accountant.get_epsilon(delta))


_cached_pld_epsilon = functools.lru_cache(maxsize=1024)(_uncached_pld_epsilon)


def _recompute_site(events, orders, delta, interval):
  """(RDP epsilon, PLD epsilon) of one site; an error message (str) for one
  that cannot be computed."""
  figures = []
  for compute in (lambda: rdp_epsilon(events, orders, delta),
                  lambda: pld_epsilon(events, delta, interval)):
    try:
      figures.append(compute())
    except (_Unaccountable, TypeError, ValueError, ArithmeticError) as e:
      figures.append(f"cannot be recomputed: {e}")
  return tuple(figures)


def recompute_epsilons(ledger: Mapping, delta: float,
                       value_discretization_interval: float =
                       DEFAULT_PLD_INTERVAL, workers: int | str = 1) -> dict:
  """{site: (RDP epsilon, PLD epsilon)} of a `PrivacyLedger.to_dict()` dict.

  At `delta` (not necessarily the ledger's). An epsilon that cannot be
  computed is given as the error message (a str). Raises ReportError if the
  ledger cannot be read.
  """
  sites, orders = _parse_ledger(ledger, "ledger")
  return _recompute_sites(sites, orders, delta, value_discretization_interval,
                          workers)


# Workers start in about a second; below this many distinct events (summed
# over distinct sites, about 0.3 s each), one process is faster.
_MIN_PARALLEL_EVENTS = 32
_WORKER_FLAG = "--recompute-sites-worker"
_RESULT_HEADER = b"fedjax_seg.verify/1\n"


def _recompute_sites(sites: Mapping, orders, delta, interval,
                     workers: int | str = 1) -> dict:
  """{site: _recompute_site(...)}: here (workers=1), in `workers` worker
  processes, or ("auto") one per core when the distinct sites hold at least
  `_MIN_PARALLEL_EVENTS` distinct events. Sites with equal events (every
  site of a site-level ledger) are computed once. The same figures either
  way.

  A worker is this file run as a script (`python -I verify.py`, so it
  imports no project code and not the caller's `__main__`), given the
  caller's sys.path and its sites' arguments by pickle on stdin; if any
  worker fails, everything is recomputed here.
  """
  distinct: dict = {}  # grouped events (or site name) -> events
  site_key = {}
  for site, events in sites.items():
    parts = tuple(grouped(events).events)
    key = parts if _hashable(parts) else ("site", site)
    distinct.setdefault(key, events)
    site_key[site] = key
  keys = list(distinct)
  args = [(distinct[k], orders, delta, interval) for k in keys]
  if workers == "auto":
    work = sum(len(grouped(events).events) for events in distinct.values())
    try:
      cores = len(os.sched_getaffinity(0))
    except AttributeError:  # Not on Linux.
      cores = os.cpu_count() or 1
    workers = cores if work >= _MIN_PARALLEL_EVENTS else 1
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f"workers must be a positive int or 'auto', got "
                     f"{workers!r}.")
  workers = min(workers, len(args))
  figures = None
  if workers > 1:
    figures = _recompute_in_workers(args, workers)
  if figures is None:
    figures = [_recompute_site(*a) for a in args]
  by_key = dict(zip(keys, figures))
  return {site: by_key[site_key[site]] for site in sites}


def _recompute_in_workers(args: list, workers: int):
  """[_recompute_site(*a) for a in args] in worker processes, or None."""
  procs = []
  try:
    payloads = [pickle.dumps(list(sys.path)) + pickle.dumps(args[w::workers])
                for w in range(workers)]
    procs = [subprocess.Popen(
        [sys.executable, "-I", os.path.abspath(__file__), _WORKER_FLAG],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in payloads]
    for proc, payload in zip(procs, payloads):
      proc.stdin.write(payload)  # Read in full before the worker computes.
      proc.stdin.close()
    outputs = [proc.stdout.read() for proc in procs]
    if any(proc.wait() for proc in procs) or not all(
        out.startswith(_RESULT_HEADER) for out in outputs):
      raise RuntimeError("a worker failed")
    figures = [None] * len(args)
    for w, out in enumerate(outputs):
      figures[w::workers] = pickle.loads(out[len(_RESULT_HEADER):])
    return figures
  except (OSError, RuntimeError, pickle.PicklingError, pickle.UnpicklingError,
          EOFError) as e:
    for proc in procs:
      proc.kill()
    logging.warning("verifier workers failed (%s); recomputing in this "
                    "process", e)
    return None


def _worker() -> None:
  """A `_recompute_sites` worker: sys.path and [args] on stdin, [figures]
  on stdout (fd 1 goes to stderr while it computes)."""
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  stream = sys.stdin.buffer
  sys.path[:0] = [p for p in pickle.load(stream) if p not in sys.path]
  chunk = pickle.load(stream)
  out.write(_RESULT_HEADER + pickle.dumps([_recompute_site(*a)
                                           for a in chunk]))
  out.close()


def _parse_ledger(ledger: Mapping, path: str):
  """({site: [events]}, orders) of a ledger dict, or ReportError."""
  if not isinstance(ledger, Mapping):
    raise ReportError(f"{path}: expected object.")
  fmt = _get(ledger, "format", path, "str")
  if fmt != LEDGER_FORMAT:
    raise ReportError(f"{path}.format: {fmt!r}, this verifier reads "
                      f"{LEDGER_FORMAT!r} (earlier formats stored a different "
                      f"dataset_size in truncated events).")
  orders = _get(ledger, "orders", path, "list")
  if not orders or not all(_kind_ok(o, "number") and o >= 1 for o in orders):
    raise ReportError(f"{path}.orders: must be a non-empty list of numbers "
                      f">= 1.")
  orders = [float(o) for o in orders]
  sites_field = _get(ledger, "sites", path, "object")
  sites = {}
  for site, entry in sites_field.items():
    where = f"{path}.sites.{site}"
    if not isinstance(entry, Mapping):
      raise ReportError(f"{where}: expected object.")
    events = _get(entry, "events", where, "list")
    sites[str(site)] = [event_from_json(e, f"{where}.events[{i}]")
                        for i, e in enumerate(events)]
  if not sites:
    raise ReportError(f"{path}.sites: no sites.")
  return sites, orders


# -- the checks ---------------------------------------------------------------


def _check_header(ledger: Mapping, path: str, delta: float, unit: str,
                  problems: list) -> str:
  ledger_delta = _get(ledger, "delta", path, "number")
  ledger_unit = _get(ledger, "unit", path, "str")
  relation = _get(ledger, "neighboring_relation", path, "str")
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
  if not all(_kind_ok(r, "int") and r >= 0 for r in rounds):
    raise ReportError(f"{where}: must be a list of round indices (ints >= 0).")
  return [int(r) for r in rounds]


def _record_level_plan_events(plan: Mapping, path: str, site: str):
  """(planned events, their round indices) of one site, record-level."""
  local_steps = _get(plan, "local_steps", path, "int")
  max_batch = _get(plan, "max_batch_size", path, "int")
  if local_steps < 1 or max_batch < 1:
    raise ReportError(f"{path}: local_steps and max_batch_size must be >= 1.")
  n = _site_value(_site_map(plan, "dataset_size_per_site", path), site,
                  f"{path}.dataset_size_per_site", "int")
  q = _site_value(_site_map(plan, "sampling_rate_per_site", path), site,
                  f"{path}.sampling_rate_per_site", "number")
  rounds = _check_rounds(_site_value(
      _site_map(plan, "rounds_trained_per_site", path), site,
      f"{path}.rounds_trained_per_site", "list"),
      f"{path}.rounds_trained_per_site.{site}")
  sigmas_where = f"{path}.accounted_sigma_per_round.{site}"
  sigmas = _site_value(_site_map(plan, "accounted_sigma_per_round", path),
                       site, f"{path}.accounted_sigma_per_round", "list")
  if n < 1:
    raise ReportError(f"{path}.dataset_size_per_site.{site}: must be >= 1.")
  if not 0 < q <= 1:
    raise ReportError(f"{path}.sampling_rate_per_site.{site}: must be in "
                      f"(0, 1], got {q!r}.")
  planned = []
  for r in rounds:
    if r >= len(sigmas):
      raise ReportError(f"{sigmas_where}[{r}]: missing (round {r} is in "
                        f"rounds_trained_per_site.{site}).")
    sigma = sigmas[r]
    if not (_kind_ok(sigma, "number") and sigma >= 0 and math.isfinite(sigma)):
      raise ReportError(f"{sigmas_where}[{r}]: must be a finite number >= 0.")
    planned.append(_planned_event(float(sigma), float(q), int(local_steps),
                                  dataset_size=int(n),
                                  max_batch_size=int(max_batch)))
  return planned, rounds


def _site_level_plan_events(plan: Mapping, path: str):
  z = _get(plan, "noise_multiplier", path, "number")
  q = _get(plan, "sampling_rate", path, "number")
  rounds = _check_rounds(_get(plan, "rounds", path, "list"), f"{path}.rounds")
  if not (z >= 0 and math.isfinite(z)):
    raise ReportError(f"{path}.noise_multiplier: must be a finite number >= 0.")
  if not 0 < q <= 1:
    raise ReportError(f"{path}.sampling_rate: must be in (0, 1], got {q!r}.")
  charged = _get(plan, "charged_sites", path, "list", default=None)
  if charged is not None:
    if not all(isinstance(c, str) for c in charged):
      raise ReportError(f"{path}.charged_sites: must be a list of site "
                        f"names.")
    charged = set(charged)
  planned = [_planned_event(float(z), float(q), 1) for _ in rounds]
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
    if _contains(event, dp_event.NonPrivateDpEvent):
      problems.append(f"{label}: event {i} (round {rounds[i]}) is a "
                      f"NonPrivateDpEvent (no noise) in a private run")
      continue
    d = _diff(event, plan_event, "event")
    if d:
      problems.append(f"{label}: event {i} (round {rounds[i]}): {d}")


def _claimed(mapping: Mapping, site: str, path: str):
  """A claimed per-site epsilon: a number (inf allowed), or ReportError."""
  if site not in mapping:
    raise ReportError(f"{path}.{site}: missing.")
  value = mapping[site]
  if value is None:
    return None
  if not _kind_ok(value, "number"):
    raise ReportError(f"{path}.{site}: expected number, got {value!r:.60}.")
  return float(value)


def _compare(label, what, claimed, recomputed, delta, problems) -> None:
  if isinstance(recomputed, str):
    return  # Reported once, where it was computed.
  if claimed is None:
    problems.append(f"{label}: no {what} claimed (null); recomputed "
                    f"{recomputed!r} at delta={delta:g}")
  elif not _close(claimed, recomputed):
    rel = (abs(claimed - recomputed) / abs(recomputed)
           if recomputed and math.isfinite(recomputed) else float("nan"))
    problems.append(f"{label}: {what} {claimed!r} != recomputed "
                    f"{recomputed!r} at delta={delta:g} (relative difference "
                    f"{rel:.2g})")


def _verify_ledger(section: Mapping, section_path: str, delta: float,
                   unit: str, interval: float, site_level: bool,
                   rows: list, problems: list, workers: int | str) -> int:
  """Checks one ledger of the report; returns its number of events."""
  ledger_path = f"{section_path}.ledger"
  ledger = _get(section, "ledger", section_path, "object")
  sites, orders = _parse_ledger(ledger, ledger_path)
  ledger_unit = _check_header(ledger, ledger_path, delta, unit, problems)
  claimed_rdp = _get(section, "epsilon_per_site", section_path, "object")
  claimed_pld = _get(section, "epsilon_pld_per_site", section_path, "object")
  claimed_max = _get(section, "epsilon_max", section_path, "number")
  plan_path = f"{section_path}.plan"
  plan = _get(section, "plan", section_path, "object")
  if site_level:
    site_planned, site_rounds, charged = _site_level_plan_events(plan,
                                                                 plan_path)
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
  figures = _recompute_sites(sites, orders, delta, interval, workers)
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
    eps_rdp, eps_pld = figures[site]
    for what, value in (("RDP epsilon", eps_rdp), ("PLD epsilon", eps_pld)):
      if isinstance(value, str):
        problems.append(f"{label}: {what} {value}")
    _compare(label, f"claimed RDP epsilon ({section_path}.epsilon_per_site)",
             c_rdp, eps_rdp, delta, problems)
    _compare(label, f"ledger's own RDP epsilon ({ledger_path}.sites.{site}."
             f"epsilon)", own, eps_rdp, delta, problems)
    _compare(label, f"claimed PLD epsilon ({section_path}."
             f"epsilon_pld_per_site)", c_pld, eps_pld, delta, problems)
    _check_events(events, planned, rounds, ledger_path, site, problems)
    recomputed_rdp.append(eps_rdp)
    rows.append(Row(
        ledger=ledger_path, site=site, unit=ledger_unit, events=len(events),
        claimed_rdp=c_rdp,
        rdp=None if isinstance(eps_rdp, str) else eps_rdp,
        claimed_pld=c_pld,
        pld=None if isinstance(eps_pld, str) else eps_pld,
        ok=len(problems) == before))
  if any(isinstance(e, str) for e in recomputed_rdp):
    problems.append(f"FAIL ledger {ledger_path}: {section_path}.epsilon_max "
                    f"cannot be verified (a site's RDP epsilon does not "
                    f"recompute)")
  elif not _close(float(claimed_max), max(recomputed_rdp)):
    problems.append(f"FAIL ledger {ledger_path}: {section_path}.epsilon_max "
                    f"{claimed_max!r} != the largest recomputed RDP epsilon "
                    f"{max(recomputed_rdp)!r}")
  return sum(len(e) for e in sites.values())


def verify_report(report: Mapping, workers: int | str = 1) -> VerifyResult:
  """Recomputes and checks every epsilon of a report dict (see module doc).

  `workers`: 1 recomputes here; a number, or "auto" (one per core when
  there are 32 or more distinct events), spreads the sites over worker
  processes (this file run as a script; they never import the caller's
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

  Returns:
    A `VerifyResult`; for a report with `privacy.enabled` false, ok=True,
    private=False and no rows (nothing to verify).

  Raises:
    ReportError: a field is missing or malformed (the message names it).
  """
  if not isinstance(report, Mapping):
    raise ReportError("report: expected a JSON object.")
  if report.get("format") == LEDGER_FORMAT:
    return verify_ledger(report, workers=workers)
  privacy = _get(report, "privacy", "", "object")
  path = "privacy"
  if not _get(privacy, "enabled", path, "bool"):
    return VerifyResult(ok=True, rows=[], problems=[], private=False)
  delta = float(_get(privacy, "delta", path, "number"))
  if not 0 < delta < 1:
    raise ReportError(f"privacy.delta: must be in (0, 1), got {delta!r}.")
  unit = _get(privacy, "unit", path, "str")
  if unit not in UNITS:
    raise ReportError(f"privacy.unit: must be one of {UNITS}, got {unit!r}.")
  interval = float(_get(privacy, "pld_value_discretization_interval", path,
                        "number", default=DEFAULT_PLD_INTERVAL))
  if not 0 < interval < 1:
    raise ReportError("privacy.pld_value_discretization_interval: must be in "
                      f"(0, 1), got {interval!r}.")
  rows, problems = [], []
  num_events = _verify_ledger(privacy, path, delta, unit, interval,
                              unit == "site", rows, problems, workers)
  site_level = _get(privacy, "site_level", path, "object", default=None)
  if site_level is not None:
    num_events += _verify_ledger(site_level, "privacy.site_level", delta,
                                 "site", interval, True, rows, problems,
                                 workers)
  return VerifyResult(ok=not problems, rows=rows, problems=problems,
                      private=True, num_events=num_events)


def verify_ledger(ledger: Mapping,
                  value_discretization_interval: float = DEFAULT_PLD_INTERVAL,
                  workers: int | str = 1) -> VerifyResult:
  """Checks a bare `PrivacyLedger.to_dict()` dump (e.g. your own code's).

  A ledger alone carries no plan, so only check 1 of `verify_report` applies:
  each site's RDP epsilon recomputed from its events, at the ledger's own
  delta, must equal the ledger's `sites[s].epsilon`; the PLD epsilon is
  recomputed and shown (a ledger dump claims none).
  """
  sites, orders = _parse_ledger(ledger, "ledger")
  delta = float(_get(ledger, "delta", "ledger", "number"))
  if not 0 < delta < 1:
    raise ReportError(f"ledger.delta: must be in (0, 1), got {delta!r}.")
  unit = _get(ledger, "unit", "ledger", "str")
  relation = _get(ledger, "neighboring_relation", "ledger", "str")
  rows, problems = [], []
  if relation != NEIGHBORING_RELATION:
    problems.append(f"FAIL ledger: neighboring_relation {relation!r}, "
                    f"expected {NEIGHBORING_RELATION!r}")
  figures = _recompute_sites(sites, orders, delta,
                             value_discretization_interval, workers)
  for site, events in sites.items():
    label = f"FAIL site {site!r}, ledger"
    before = len(problems)
    own = _claimed(ledger["sites"][site], "epsilon", f"ledger.sites.{site}")
    eps_rdp, eps_pld = figures[site]
    for what, value in (("RDP epsilon", eps_rdp), ("PLD epsilon", eps_pld)):
      if isinstance(value, str):
        problems.append(f"{label}: {what} {value}")
    _compare(label, f"ledger's own RDP epsilon (ledger.sites.{site}.epsilon)",
             own, eps_rdp, delta, problems)
    rows.append(Row(
        ledger="ledger", site=site, unit=unit, events=len(events),
        claimed_rdp=own, rdp=None if isinstance(eps_rdp, str) else eps_rdp,
        claimed_pld=None, pld=None if isinstance(eps_pld, str) else eps_pld,
        ok=len(problems) == before))
  return VerifyResult(ok=not problems, rows=rows, problems=problems,
                      private=True,
                      num_events=sum(len(e) for e in sites.values()))


# -- command line -------------------------------------------------------------

_COLUMNS = ("ledger", "site", "unit", "events", "claimed RDP",
            "recomputed RDP", "claimed PLD", "recomputed PLD", "ok")


def format_table(rows: Sequence[Row]) -> str:
  """The rows as an aligned text table (header first)."""
  cells = [_COLUMNS] + [
      (r.ledger, r.site, r.unit, str(r.events), _fmt(r.claimed_rdp),
       _fmt(r.rdp), _fmt(r.claimed_pld), _fmt(r.pld),
       "ok" if r.ok else "FAIL") for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
  return "\n".join(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
                   for row in cells)


def load_report(path: str) -> dict:
  """The report at `path`: a workdir (its report.json) or a JSON file."""
  file = os.path.join(path, "report.json") if os.path.isdir(path) else path
  try:
    with open(file, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError as e:
    raise ReportError(f"{file}: no such file.") from e
  except json.JSONDecodeError as e:
    raise ReportError(f"{file}: malformed JSON: {e}.") from e
  except (OSError, UnicodeDecodeError) as e:
    raise ReportError(f"{file}: cannot read: {e}.") from e


class _CountRdpConvergenceWarnings(logging.Filter):
  """Drops (and counts) dp_accounting's warning, once per order and event,
  that a fractional-order series did not converge and that order is left out
  (the RDP bound stays valid, slightly looser; the ledger did the same)."""

  def __init__(self):
    super().__init__()
    self.dropped = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if (record.filename == "rdp_privacy_accountant.py"
        and "failed to converge" in record.getMessage()):
      self.dropped += 1
      return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; `argv` without the program name. Returns the exit
  code: 0 verified (or not private), 1 mismatch, 2 unreadable input."""
  parser = argparse.ArgumentParser(
      prog="python -m fedjax_seg.privacy.verify",
      description="Recompute every epsilon of a fedjax_seg report from its "
      "saved privacy ledger with plain dp_accounting.")
  parser.add_argument("path", help="a run's workdir, its report.json, or a "
                      "PrivacyLedger JSON dump (ledger.to_json())")
  args = parser.parse_args(argv)
  quiet = _CountRdpConvergenceWarnings()
  absl_logger = logging.getLogger("absl")
  absl_logger.addFilter(quiet)
  try:
    result = verify_report(load_report(args.path), workers="auto")
  except ReportError as e:
    print(f"verify: input error: {e}", file=sys.stderr)
    return EXIT_INPUT
  finally:
    absl_logger.removeFilter(quiet)
  if quiet.dropped:
    print(f"note: dp_accounting left out {quiet.dropped} non-converging "
          f"fractional RDP orders (valid, slightly looser bounds; the ledger "
          f"did the same)", file=sys.stderr)
  if not result.private:
    print("NOT PRIVATE: nothing to verify: privacy.enabled is false, this run "
          "was trained without clipping or noise and has no epsilon.")
    return EXIT_OK
  print(format_table(result.rows))
  for line in result.problems:
    print(line)
  print(result.summary)
  return EXIT_OK if result.ok else EXIT_MISMATCH


if __name__ == "__main__":
  if sys.argv[1:] == [_WORKER_FLAG]:
    _worker()
  else:
    sys.exit(main(sys.argv[1:]))

"""Epsilons recomputed from ledger events with plain dp_accounting.

Events are rebuilt from their JSON (`to_named_tuple()` dicts; only classes of
`dp_accounting.dp_event`), then composed per site:
  * RDP: one `dp_accounting.rdp.RdpAccountant(orders, ADD_OR_REMOVE_ONE)`
    over the ledger's orders, each `TruncatedSubsampledGaussianDpEvent(D, q,
    B, sigma)` replaced by `PoissonSampledDpEvent(q, GaussianDpEvent(sigma))`
    with truncation probability P = binom.sf(B, D, q) per step (D is already
    the larger neighbour's size N + 1; times the SelfComposed count). With
    P_T the summed P: epsilon = compute_epsilon(orders, rdp, delta) if P_T ==
    0, else eps_hi = compute_epsilon(.., delta / 2), slack = (1 +
    e^min(eps_hi, 700)) * P_T, which must be <= delta / 2, and epsilon =
    compute_epsilon(.., delta - slack) (a coupling argument).
  * PLD: one `dp_accounting.pld.PLDAccountant(ADD_OR_REMOVE_ONE, interval)`
    composing one `ComposedDpEvent` of `SelfComposedDpEvent(base, total
    count)` per distinct base event (first-seen order; unhashable events
    kept as they are). PLD accounts truncated sampling exactly.

Cost: RDP about 0.1 s per distinct event; PLD about a second per distinct
Poisson event and about 5 s per distinct truncated event at interval 1e-4
(about 0.5 s at 1e-3). Both are cached per distinct input (pure functions).
With 32 or more distinct events, sites are recomputed in worker processes,
one per core (`recompute_sites(..., workers="auto")`).
"""

import functools
import logging
import math
import numbers
import os
import pathlib
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

from fedjax_seg.verifier import fields

LEDGER_FORMAT = "fedjax_seg.PrivacyLedger/2"
DEFAULT_PLD_INTERVAL = 1e-4
REL_TOL = fields.REL_TOL

_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
# The directory that holds the fedjax_seg package: a worker imports this
# module from there and nothing else of the project.
_ROOT = str(pathlib.Path(__file__).resolve().parents[2])
_WORKER_CODE = ("import sys; sys.path.insert(0, {root!r}); "
                "from fedjax_seg.verifier import epsilons; epsilons.worker()")


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
      raise fields.ReportError(
          f"{where}: not a dp_accounting event (module_name {module!r}, "
          f"expected {dp_event.__name__!r}).")
    cls = (getattr(dp_event, name, None)
           if isinstance(name, str) and not name.startswith("_") else None)
    if not (isinstance(cls, type) and issubclass(cls, dp_event.DpEvent) and
            cls.__module__ == dp_event.__name__):
      raise fields.ReportError(
          f"{where}: {name!r} is not a class of {dp_event.__name__}.")
    kwargs = {
        k: convert(v, f"{where}.{k}")
        for k, v in value.items()
        if k not in ("module_name", "class_name")
    }
    try:
      return cls(**kwargs)
    except (TypeError, ValueError) as e:
      raise fields.ReportError(f"{where}: cannot build {name}: {e}") from e

  if not (isinstance(data, Mapping) and "class_name" in data):
    raise fields.ReportError(
        f"{path}: not an event (an object with class_name).")
  return build(data, path)


def _event_fields(event: dp_event.DpEvent) -> list[str]:
  return [
      f for f in event.to_named_tuple()._fields
      if f not in ("module_name", "class_name")
  ]


def contains(event, cls) -> bool:
  if isinstance(event, cls):
    return True
  if isinstance(event, dp_event.DpEvent):
    return any(contains(getattr(event, f), cls) for f in _event_fields(event))
  if isinstance(event, (list, tuple)):
    return any(contains(e, cls) for e in event)
  return False


def diff(actual, expected, where: str) -> str | None:
  """First difference between an event and the planned one, or None."""
  if isinstance(expected, dp_event.DpEvent):
    if type(actual) is not type(expected):
      return (f"{where} is {type(actual).__name__}, the plan gives "
              f"{type(expected).__name__}")
    for f in _event_fields(expected):
      d = diff(getattr(actual, f), getattr(expected, f), f"{where}.{f}")
      if d:
        return d
    return None
  if isinstance(expected, bool) or not isinstance(expected, numbers.Real):
    return (None if actual == expected else
            (f"{where} is {actual!r}, the plan gives {expected!r}"))
  if not fields.kind_ok(actual, "number"):
    return f"{where} is {actual!r}, the plan gives {expected!r}"
  if isinstance(expected, numbers.Integral):
    same = actual == expected
  else:
    same = math.isclose(float(actual),
                        float(expected),
                        rel_tol=REL_TOL,
                        abs_tol=0.0)
  return (None if same else (
      f"{where.split('.')[-1]} is {actual!r}, the plan gives {expected!r}"))


def planned_event(sigma: float,
                  q: float,
                  steps: int,
                  dataset_size: int | None = None,
                  max_batch_size: int | None = None) -> dp_event.DpEvent:
  """What the configuration says the ledger must record for one round."""
  if steps == 0:
    return dp_event.NoOpDpEvent()
  if sigma == 0:
    return dp_event.NonPrivateDpEvent()
  if max_batch_size is not None and q < 1:
    step = dp_event.TruncatedSubsampledGaussianDpEvent(
        dataset_size=int(dataset_size) + 1,
        sampling_probability=float(q),
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
    p = float(
        stats.binom.sf(event.truncated_batch_size, event.dataset_size,
                       event.sampling_probability))
    return (dp_event.PoissonSampledDpEvent(
        event.sampling_probability,
        dp_event.GaussianDpEvent(event.noise_multiplier)), p)
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
    return float(
        rdp_privacy_accountant.compute_epsilon(orders, total, delta)[0])
  eps_hi = rdp_privacy_accountant.compute_epsilon(orders, total, delta / 2)[0]
  slack = (1.0 + math.exp(min(eps_hi, 700.0))) * p_trunc
  if not slack <= delta / 2:
    raise _Unaccountable(
        f"batch truncation is not negligible: summed truncation probability "
        f"{p_trunc:.3g} costs {slack:.3g} of delta={delta:g} (> delta / 2)")
  return float(
      rdp_privacy_accountant.compute_epsilon(orders, total, delta - slack)[0])


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
      [dp_event.SelfComposedDpEvent(base, n) for base, n in counts.items()] +
      unhashable)


def pld_epsilon(
    events: Sequence[dp_event.DpEvent],
    delta: float,
    value_discretization_interval: float = DEFAULT_PLD_INTERVAL) -> float:
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
        type(getattr(e, "event", e)).__name__
        for e in events
        if not pld.PLDAccountant(_ADD_REMOVE).supports(e)
    })
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


def recompute_epsilons(
    ledger: Mapping,
    delta: float,
    value_discretization_interval: float = DEFAULT_PLD_INTERVAL,
    workers: int | str = 1) -> dict:
  """{site: (RDP epsilon, PLD epsilon)} of a `PrivacyLedger.to_dict()` dict.

  At `delta` (not necessarily the ledger's). An epsilon that cannot be
  computed is given as the error message (a str). Raises ReportError if the
  ledger cannot be read.
  """
  sites, orders = parse_ledger(ledger, "ledger")
  return recompute_sites(sites, orders, delta, value_discretization_interval,
                         workers)


# Workers start in about a second; below this many distinct events (summed
# over distinct sites, about 0.3 s each), one process is faster.
_MIN_PARALLEL_EVENTS = 32
_RESULT_HEADER = b"fedjax_seg.verify/1\n"


def recompute_sites(sites: Mapping,
                    orders,
                    delta,
                    interval,
                    workers: int | str = 1) -> dict:
  """{site: _recompute_site(...)}: here (workers=1), in `workers` worker
  processes, or ("auto") one per core when the distinct sites hold at least
  `_MIN_PARALLEL_EVENTS` distinct events. Sites with equal events (every
  site of a site-level ledger) are computed once. The same figures either
  way.

  A worker is a fresh `python -I` that imports this module alone (so no
  other project code and not the caller's `__main__`), given the caller's
  sys.path and its sites' arguments by pickle on stdin; if any worker fails,
  everything is recomputed here.
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
    payloads = [
        pickle.dumps(list(sys.path)) + pickle.dumps(args[w::workers])
        for w in range(workers)
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, "-I", "-c",
             _WORKER_CODE.format(root=_ROOT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE) for _ in payloads
    ]
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
    logging.warning(
        "verifier workers failed (%s); recomputing in this "
        "process", e)
    return None


def worker() -> None:
  """A `recompute_sites` worker: sys.path and [args] on stdin, [figures]
  on stdout (fd 1 goes to stderr while it computes)."""
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  stream = sys.stdin.buffer
  sys.path[:0] = [p for p in pickle.load(stream) if p not in sys.path]
  chunk = pickle.load(stream)
  out.write(_RESULT_HEADER + pickle.dumps([_recompute_site(*a) for a in chunk]))
  out.close()


def parse_ledger(ledger: Mapping, path: str):
  """({site: [events]}, orders) of a ledger dict, or ReportError."""
  if not isinstance(ledger, Mapping):
    raise fields.ReportError(f"{path}: expected object.")
  fmt = fields.get(ledger, "format", path, "str")
  if fmt != LEDGER_FORMAT:
    raise fields.ReportError(
        f"{path}.format: {fmt!r}, this verifier reads {LEDGER_FORMAT!r} "
        "(earlier formats stored a different dataset_size in truncated "
        "events).")
  orders = fields.get(ledger, "orders", path, "list")
  if not orders or not all(
      fields.kind_ok(o, "number") and o >= 1 for o in orders):
    raise fields.ReportError(f"{path}.orders: must be a non-empty list of "
                             "numbers >= 1.")
  orders = [float(o) for o in orders]
  sites_field = fields.get(ledger, "sites", path, "object")
  sites = {}
  for site, entry in sites_field.items():
    where = f"{path}.sites.{site}"
    if not isinstance(entry, Mapping):
      raise fields.ReportError(f"{where}: expected object.")
    events = fields.get(entry, "events", where, "list")
    sites[str(site)] = [
        event_from_json(e, f"{where}.events[{i}]") for i, e in enumerate(events)
    ]
  if not sites:
    raise fields.ReportError(f"{path}.sites: no sites.")
  return sites, orders


def calibration_problem(label: str, sigma: float, at_sigma: float,
                        below: float, target: float, rounds: str,
                        minimality: float) -> str | None:
  """The problem line of a calibrated sigma, or None: its epsilon over
  `rounds` must meet `target`, and `minimality` x sigma's must not."""
  if at_sigma > target:
    return (f"{label}: sigma {sigma!r} over {rounds} reaches epsilon "
            f"{at_sigma:.6f} > --target_epsilon={target}")
  if below <= target:
    return (f"{label}: sigma {sigma!r} is not the calibrated one: "
            f"{minimality} of it also meets --target_epsilon={target} "
            f"(epsilon {below:.6f})")
  return None


def compare_events(events, want, label: str, problems: list) -> None:
  """Appends to `problems` where a ledger's `events` differ from the
  derived `want` (their number, then the first differing event)."""
  if len(events) != len(want):
    problems.append(f"{label}: {len(events)} events, the derived plan has "
                    f"{len(want)}")
  for i, (got, expected) in enumerate(zip(events, want)):
    d = diff(got, expected, "event")
    if d:
      problems.append(f"{label}: event {i}: {d} (derived from the config)")
      return  # One line per site is enough.

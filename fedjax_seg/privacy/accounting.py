"""Per-site privacy accounting with dp_accounting: the `PrivacyLedger`.

Each site k has its own record-level guarantee (epsilon_k, delta): its data are
only touched by its own DP-SGD steps, with its own sampling rate q_k = B / N_k
and noise multiplier sigma_k. The ledger keeps, per site, the list of
dp_accounting events (for reports, JSON and PLD) and the running RDP vector
(for online epsilons): the RDP of a composition is the sum of the RDPs, so a
round costs one RDP evaluation per distinct (sigma, q, steps), however many
rounds came before. The events themselves (their construction, truncation
and JSON form) are in `events.py`.
"""

import json
import math
from typing import Iterable, Mapping, Sequence

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np

from fedjax_seg.privacy import events as events_lib
from fedjax_seg.privacy import parallel
from fedjax_seg.privacy import rdp_vectorized
from fedjax_seg.privacy import units as units_lib

LEDGER_FORMAT = "fedjax_seg.PrivacyLedger/2"
ACCOUNTANTS = ("rdp",)
_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _gaussian_parts(event: dp_accounting.DpEvent, count: int = 1):
  """[(q, sigma, count)] if `event` composes only (Poisson-sampled) Gaussian
  steps (and no-ops), else None (then dp_accounting evaluates it)."""
  if isinstance(event, dp_accounting.NoOpDpEvent):
    return []
  if isinstance(event, dp_accounting.GaussianDpEvent):
    return [(1.0, event.noise_multiplier, count)]
  if (isinstance(event, dp_accounting.PoissonSampledDpEvent)
      and isinstance(event.event, dp_accounting.GaussianDpEvent)):
    return [(event.sampling_probability, event.event.noise_multiplier, count)]
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    if int(event.count) != event.count or event.count < 1:
      # dp_accounting refuses these too; a count of 0 would turn the inf
      # RDP of an order into nan (0 * inf), and epsilon into 0.
      raise ValueError(f"a SelfComposedDpEvent count must be an integer "
                       f">= 1, got {event.count}.")
    return _gaussian_parts(event.event, count * int(event.count))
  if isinstance(event, dp_accounting.ComposedDpEvent):
    parts = [_gaussian_parts(e, count) for e in event.events]
    if any(p is None for p in parts):
      return None
    return [t for p in parts for t in p]
  return None


def events_rdp(events: Sequence[dp_accounting.DpEvent],
               orders: Sequence[float]) -> np.ndarray:
  """[len(events), O] RDP of each (untruncated) event, in one vectorised pass.

  Events made of (Poisson-sampled) Gaussian steps are evaluated together by
  `rdp_vectorized` (float64, agrees with dp_accounting's `RdpAccountant` to
  about 1e-9 in epsilon; see tests/privacy/test_rdp_vectorized.py); any other
  event by dp_accounting.
  """
  orders = tuple(float(o) for o in orders)
  out = np.zeros((len(events), len(orders)))
  owner, qs, sigmas, counts = [], [], [], []
  for i, event in enumerate(events):
    parts = _gaussian_parts(event)
    if parts is None:
      out[i] = _uncached_dp_accounting_rdp(event, orders)
      continue
    for q, sigma, n in parts:
      owner.append(i)
      qs.append(q)
      sigmas.append(sigma)
      counts.append(n)
  if owner:
    for q, sigma in zip(qs, sigmas):
      events_lib.check_event_args(sigma, q, 0)
    rdp_each = rdp_vectorized.poisson_gaussian_rdp(
        np.asarray(qs), np.asarray(sigmas), orders)  # [P, O]
    counts = np.asarray(counts, np.float64)[:, None]  # All >= 1.
    np.add.at(out, np.asarray(owner), counts * rdp_each)
  return out


def _cached_rdp(events: Sequence[dp_accounting.DpEvent],
                orders: tuple[float, ...]) -> list[np.ndarray]:
  """RDP vectors (read-only) of `events`; the ones not seen before are
  evaluated together in one `events_rdp` pass. Sites record the same
  (sigma, q, steps) event round after round, so results are cached (bounded,
  oldest first out); unhashable events (a ComposedDpEvent holds a list) are
  evaluated every time."""
  keys, results, missing = [], [None] * len(events), []
  for i, event in enumerate(events):
    try:
      key = (event, orders)
      hit = _RDP_CACHE.get(key)
    except TypeError:
      key, hit = None, None
    keys.append(key)
    if hit is None:
      missing.append(i)
    results[i] = hit
  if missing:
    for i, vector in zip(missing,
                         events_rdp([events[i] for i in missing], orders)):
      vector.setflags(write=False)
      results[i] = vector
      if keys[i] is not None:
        if len(_RDP_CACHE) >= _RDP_CACHE_SIZE:
          _RDP_CACHE.pop(next(iter(_RDP_CACHE)))
        _RDP_CACHE[keys[i]] = vector
  return results


def _event_rdp(event: dp_accounting.DpEvent,
               orders: tuple[float, ...]) -> np.ndarray:
  """RDP vector of one event over `orders` (read-only array)."""
  return _cached_rdp([event], orders)[0]


def _uncached_dp_accounting_rdp(event, orders):
  accountant = rdp.RdpAccountant(list(orders), _ADD_REMOVE)
  if not accountant.supports(event):
    raise ValueError(f"the RDP accountant does not support {event}.")
  accountant.compose(event)
  return accountant.rdp


_RDP_CACHE: dict = {}
_RDP_CACHE_SIZE = 8192


class VectorizedRdpAccountant(dp_accounting.PrivacyAccountant):
  """A dp_accounting `PrivacyAccountant` with the RDP of (Poisson-sampled)
  Gaussian steps from `rdp_vectorized` (and dp_accounting's for anything
  else its `RdpAccountant` supports); add/remove-one neighbours.

  A drop-in for `dp_accounting.rdp.RdpAccountant` where many events are
  composed, e.g. in `dp_accounting.calibrate_dp_mechanism` with a per-round
  noise schedule.
  """

  def __init__(self, orders: Sequence[float] | None = None):
    super().__init__(_ADD_REMOVE)
    self._orders = tuple(float(o) for o in (
        rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS if orders is None
        else orders))
    self._rdp = np.zeros(len(self._orders))
    self._reference = rdp.RdpAccountant(list(self._orders), _ADD_REMOVE)

  def _maybe_compose(self, event, count, do_compose):
    """None on success, else dp_accounting's error details (its protocol)."""
    if _gaussian_parts(event) is None:
      error = self._reference._maybe_compose(event, count, False)  # pylint: disable=protected-access
      if error is not None:
        return error
    if do_compose:
      self._rdp = self._rdp + count * _cached_rdp([event], self._orders)[0]
    return None

  def get_epsilon(self, target_delta: float) -> float:
    rdp_vector = np.where(np.isnan(self._rdp), np.inf, self._rdp)
    return float(rdp.rdp_privacy_accountant.compute_epsilon(
        self._orders, rdp_vector, target_delta)[0])


def _pld_epsilon(events: Sequence[dp_accounting.DpEvent], delta: float,
                 value_discretization_interval: float) -> float:
  """PLD epsilon of composing `events` (grouped; 0 for none)."""
  if not events:
    return 0.0
  accountant = pld.PLDAccountant(_ADD_REMOVE, value_discretization_interval)
  accountant.compose(events_lib.grouped_composition(events))
  return float(accountant.get_epsilon(delta))


class PrivacyLedger:
  """Record-level (or site-level) DP accounting, one accountant per site.

  Formal guarantees:
    * Unit: `unit` is what one neighbouring dataset adds or removes: one
      example (2D slice), one patient (all its slices, clipped as a group) or,
      for DP-FedAvg, one site. Neighbouring relation: add/remove-one.
    * Sampling assumption: each recorded step Poisson-samples the units of the
      site (rate q = B / N_k; for site-level DP, q = expected sampled sites /
      all sites) and applies the Gaussian mechanism with noise multiplier
      sigma = noise std / L2 sensitivity. If the sample is truncated to a
      fixed batch (`max_batch_size`), the RDP figure is that of the
      untruncated mechanism at delta' = delta - (1 + e^eps_hi) * P_T, where
      P_T is the summed truncation probability (a coupling argument); the
      ledger raises if that slack exceeds delta / 2. PLD accounts truncation
      exactly (dp_accounting's TruncatedSubsampledGaussianDpEvent).
    * `epsilon` is the RDP bound (dp_accounting's RdpAccountant with the
      improved conversion of Canonne et al. 2020) for the ledger's delta;
      `epsilon_pld` is the tighter PLD figure for final reports. Both compose
      exactly the recorded events; epsilon never decreases as events are added.
    * Not covered: events that were never recorded (the caller must record
      every step that touched a site's data, and nothing for a site that did
      not train), data-dependent hyper-parameter tuning, JAX's
      non-cryptographic PRNG, floating-point attacks on the Gaussian sampler.

  Example:
    >>> ledger = PrivacyLedger(["a", "b"], delta=1e-5)
    >>> ledger.record("a", noise_multiplier=1.1, sampling_rate=256 / 60000,
    ...               steps=14062)
    >>> round(ledger.epsilon("a"), 4), ledger.epsilon("b")
    (2.5966, 0.0)
  """

  def __init__(
      self,
      site_names: Sequence[str],
      *,
      delta: float,
      unit: str = "example",
      accountant: str = "rdp",
      orders: Sequence[float] | None = None,
  ):
    site_names = [str(s) for s in site_names]
    if not site_names:
      raise ValueError("PrivacyLedger needs at least one site name.")
    if len(set(site_names)) != len(site_names):
      raise ValueError(f"site names must be unique, got {site_names}.")
    if not 0 < delta < 1:
      raise ValueError(f"delta must be in (0, 1), got {delta}.")
    if str(unit) not in units_lib.UNITS:
      raise ValueError(
          f"unit must be one of {units_lib.UNITS}, got {unit!r}.")
    if accountant not in ACCOUNTANTS:
      raise ValueError(
          f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}.")
    self.site_names = tuple(site_names)
    self.delta = float(delta)
    self.unit = str(unit)
    self.accountant = accountant
    self.orders = tuple(
        float(o) for o in (orders or rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS))
    self._events = {s: [] for s in site_names}
    self._rdp = {s: np.zeros(len(self.orders)) for s in site_names}
    self._truncation = {s: 0.0 for s in site_names}
    self._epsilon_cache: dict[str, tuple[tuple, float]] = {}

  # -- recording --------------------------------------------------------------

  def _check_site(self, site: str) -> str:
    site = str(site)
    if site not in self._events:
      raise KeyError(f"unknown site {site!r}; sites are {self.site_names}.")
    return site

  def record_event(self, site: str, event: dp_accounting.DpEvent) -> None:
    """Composes any RDP-supported dp_accounting event into `site`'s ledger."""
    site = self._check_site(site)
    untruncated, p_trunc = events_lib.poisson_equivalent(event)
    self._rdp[site] = self._rdp[site] + _event_rdp(untruncated, self.orders)
    self._truncation[site] += p_trunc
    self._events[site].append(event)

  def record_events(
      self, events: Mapping[str, dp_accounting.DpEvent]) -> None:
    """Composes one event into each named site's ledger, the RDP of all of
    them evaluated in one vectorised pass (a round of a per-round schedule:
    one new (sigma, q) per site)."""
    sites = [self._check_site(s) for s in events]
    untruncated = [events_lib.poisson_equivalent(events[s]) for s in events]
    vectors = _cached_rdp([e for e, _ in untruncated], self.orders)
    for site, event, (_, p_trunc), vector in zip(
        sites, events.values(), untruncated, vectors):
      self._rdp[site] = self._rdp[site] + vector
      self._truncation[site] += p_trunc
      self._events[site].append(event)

  def record(
      self,
      site: str,
      noise_multiplier: float,
      sampling_rate: float,
      steps: int,
      *,
      dataset_size: int | None = None,
      max_batch_size: int | None = None,
  ) -> None:
    """Records `steps` Poisson-sampled Gaussian steps of one site.

    Args:
      site: a name given at construction.
      noise_multiplier: sigma actually applied (read it back from
        `GaussianNoiseState`; for adaptive clipping, the accounted value from
        `AdaptiveClipping.accounted_noise_multiplier`).
      sampling_rate: q used for these steps.
      steps: how many steps.
      dataset_size, max_batch_size: give both if the Poisson sample was
        truncated to a fixed maximum batch.
    """
    self.record_event(site, events_lib.poisson_gaussian_event(
        noise_multiplier, sampling_rate, steps,
        dataset_size=dataset_size, max_batch_size=max_batch_size))

  def record_all(self, noise_multiplier: float, sampling_rate: float,
                 steps: int) -> None:
    """Records the same steps for every site (site-level DP-FedAvg rounds)."""
    for site in self.site_names:
      self.record(site, noise_multiplier, sampling_rate, steps)

  # -- reading ----------------------------------------------------------------

  def _epsilon_from_rdp(self, rdp_vector: np.ndarray, p_trunc: float,
                        site: str) -> float:
    # dp_accounting's conversion would read a nan order as epsilon 0.
    rdp_vector = np.where(np.isnan(rdp_vector), np.inf, rdp_vector)
    if p_trunc == 0.0:
      return float(rdp.rdp_privacy_accountant.compute_epsilon(
          self.orders, rdp_vector, self.delta)[0])
    eps_hi = rdp.rdp_privacy_accountant.compute_epsilon(
        self.orders, rdp_vector, self.delta / 2)[0]
    slack = (1.0 + math.exp(min(eps_hi, 700.0))) * p_trunc
    if not slack <= self.delta / 2:
      raise ValueError(
          f"site {site!r}: batch truncation is not negligible (summed "
          f"truncation probability {p_trunc:.3g} costs {slack:.3g} of delta="
          f"{self.delta:g}); raise the maximum batch size.")
    return float(rdp.rdp_privacy_accountant.compute_epsilon(
        self.orders, rdp_vector, self.delta - slack)[0])

  def epsilon(self, site: str) -> float:
    """RDP epsilon of `site` at the ledger's delta (0 if nothing recorded)."""
    site = self._check_site(site)
    # Events are only ever appended, so a site's epsilon is a function of
    # its event count (and delta, orders): computed once per count (a round
    # of a 10,000-site consortium changes a cohort's epsilons, not all).
    key = (len(self._events[site]), self.delta, self.orders)
    cached = self._epsilon_cache.get(site)
    if cached is None or cached[0] != key:
      cached = self._epsilon_cache[site] = (key, self._epsilon_from_rdp(
          self._rdp[site], self._truncation[site], site))
    return cached[1]

  def epsilons(self) -> dict[str, float]:
    """{site: RDP epsilon} for every site."""
    return {s: self.epsilon(s) for s in self.site_names}

  def max_epsilon(self) -> float:
    """The largest per-site epsilon: the guarantee every site gets."""
    return max(self.epsilons().values())

  def epsilon_pld(self, site: str,
                  value_discretization_interval: float = 1e-4) -> float:
    """PLD epsilon of `site` (tighter than RDP; slower: use for reports)."""
    site = self._check_site(site)
    return _pld_epsilon(self._events[site], self.delta,
                        value_discretization_interval)

  def epsilons_pld(self, value_discretization_interval: float = 1e-4,
                   workers: int | str = 1) -> dict[str, float]:
    """{site: PLD epsilon} for every site; `workers` > 1 or "auto" spreads
    the sites over worker processes (`parallel.process_map`; same figures).
    """
    items = [(self._events[s], self.delta, value_discretization_interval)
             for s in self.site_names]
    work = sum(len(events_lib.grouped_composition(e).events)
               for e, _, _ in items)
    return dict(zip(self.site_names, parallel.process_map(
        _pld_epsilon, items, work=work, workers=workers)))

  def events(self, site: str) -> list[dp_accounting.DpEvent]:
    """The recorded events of `site`, in order."""
    return list(self._events[self._check_site(site)])

  def rdp(self, site: str) -> np.ndarray:
    """A copy of `site`'s RDP vector over `self.orders`."""
    return self._rdp[self._check_site(site)].copy()

  def epsilon_if(self, site: str,
                 planned: dp_accounting.DpEvent | Iterable[
                     dp_accounting.DpEvent]) -> float:
    """The epsilon `site` would have after also composing `planned`."""
    site = self._check_site(site)
    if isinstance(planned, dp_accounting.DpEvent):
      planned = [planned]
    rdp_vector, p_trunc = self._rdp[site], self._truncation[site]
    for event in planned:
      untruncated, p = events_lib.poisson_equivalent(event)
      rdp_vector = rdp_vector + _event_rdp(untruncated, self.orders)
      p_trunc += p
    return self._epsilon_from_rdp(rdp_vector, p_trunc, site)

  def would_exceed(self, site: str, budget: float,
                   planned: dp_accounting.DpEvent | Iterable[
                       dp_accounting.DpEvent]) -> bool:
    """True if composing `planned` would take `site` above epsilon `budget`."""
    return self.epsilon_if(site, planned) > budget

  # -- serialisation ----------------------------------------------------------

  def to_dict(self) -> dict:
    """A JSON-ready dict; events are dp_accounting named tuples as dicts."""
    return {
        "format": LEDGER_FORMAT,
        "delta": self.delta,
        "unit": self.unit,
        "accountant": self.accountant,
        "neighboring_relation": "ADD_OR_REMOVE_ONE",
        "orders": list(self.orders),
        "sites": {
            s: {
                "events": [events_lib.event_to_dict(e)
                           for e in self._events[s]],
                "epsilon": self.epsilon(s),
            }
            for s in self.site_names
        },
    }

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=1)

  @classmethod
  def from_dict(cls, data: Mapping) -> "PrivacyLedger":
    """Rebuilds a ledger by re-composing every stored event."""
    if data.get("format") != LEDGER_FORMAT:
      raise ValueError(
          f"not a PrivacyLedger dump: format {data.get('format')!r}, expected "
          f"{LEDGER_FORMAT!r}.")
    ledger = cls(list(data["sites"]), delta=data["delta"], unit=data["unit"],
                 accountant=data["accountant"], orders=data["orders"])
    for site, entry in data["sites"].items():
      for event in entry["events"]:
        ledger.record_event(site, events_lib.event_from_dict(event))
    return ledger

  @classmethod
  def from_json(cls, text: str) -> "PrivacyLedger":
    return cls.from_dict(json.loads(text))

  def __eq__(self, other) -> bool:
    if not isinstance(other, PrivacyLedger):
      return NotImplemented
    return (self.site_names == other.site_names and self.delta == other.delta
            and self.unit == other.unit and self.orders == other.orders
            and self._events == other._events)

  def __repr__(self) -> str:
    eps = ", ".join(f"{s}={e:.3f}" for s, e in self.epsilons().items())
    return f"PrivacyLedger(unit={self.unit}, delta={self.delta:g}, eps: {eps})"

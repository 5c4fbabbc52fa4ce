"""The dp_accounting events a site's DP-SGD releases, and their algebra.

`poisson_gaussian_event` builds the event of a run of Poisson-sampled (or
truncated-Poisson) Gaussian steps; `truncation_probability` and
`poisson_equivalent` relate truncated sampling to plain Poisson sampling
(for RDP); `grouped_composition` counts equal events together (for PLD);
`event_to_dict` / `event_from_dict` are their JSON form, which ledgers,
checkpoints and reports store. `PrivacyLedger` (accounting.py) composes them
per site.
"""

import collections
import math
from typing import Mapping, Sequence

import dp_accounting
from dp_accounting import dp_event
from scipy import stats


def poisson_gaussian_event(
    noise_multiplier: float,
    sampling_rate: float,
    steps: int,
    *,
    dataset_size: int | None = None,
    max_batch_size: int | None = None,
) -> dp_accounting.DpEvent:
  """The dp_accounting event of `steps` Poisson-sampled Gaussian steps.

  Args:
    noise_multiplier: sigma (noise std / L2 sensitivity), >= 0. 0 means no
      noise: a `NonPrivateDpEvent` (epsilon = inf).
    sampling_rate: Poisson sampling probability q in [0, 1]; 1 means the whole
      dataset each step (plain `GaussianDpEvent`).
    steps: number of steps (>= 0; 0 gives a `NoOpDpEvent`).
    dataset_size: N, the site's number of units, with `max_batch_size`: the
      sample is truncated to at most `max_batch_size` units, giving
      `TruncatedSubsampledGaussianDpEvent`. The event is built for the larger
      of the two neighbouring datasets, N + 1 units (dp_accounting's
      `dataset_size` is the size of the dataset that holds the differing unit,
      and the truncation tail grows with it), so its `dataset_size` is N + 1.
    max_batch_size: see `dataset_size`.
  """
  check_event_args(noise_multiplier, sampling_rate, steps)
  if (dataset_size is None) != (max_batch_size is None):
    raise ValueError("give both dataset_size and max_batch_size, or neither.")
  if steps == 0:
    return dp_accounting.NoOpDpEvent()
  if noise_multiplier == 0:
    return dp_accounting.NonPrivateDpEvent()
  if max_batch_size is not None and sampling_rate < 1:
    if dataset_size < 1 or max_batch_size < 1:
      raise ValueError(
          f"dataset_size ({dataset_size}) and max_batch_size "
          f"({max_batch_size}) must be >= 1."
      )
    step = dp_accounting.TruncatedSubsampledGaussianDpEvent(
        # The neighbouring dataset that holds the differing unit: N + 1.
        dataset_size=int(dataset_size) + 1,
        sampling_probability=float(sampling_rate),
        truncated_batch_size=int(max_batch_size),
        noise_multiplier=float(noise_multiplier),
    )
  elif sampling_rate < 1:
    step = dp_accounting.PoissonSampledDpEvent(
        float(sampling_rate), dp_accounting.GaussianDpEvent(
            float(noise_multiplier))
    )
  else:
    step = dp_accounting.GaussianDpEvent(float(noise_multiplier))
  return dp_accounting.SelfComposedDpEvent(step, int(steps))


def check_event_args(noise_multiplier, sampling_rate, steps):
  """Raises ValueError unless sigma >= 0 is finite, q is in [0, 1] and
  steps is an integer >= 0."""
  if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
    raise ValueError(
        f"noise_multiplier must be finite and >= 0, got {noise_multiplier}."
    )
  if not 0 <= sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}.")
  if int(steps) != steps or steps < 0:
    raise ValueError(f"steps must be an integer >= 0, got {steps}.")


def truncation_probability(
    dataset_size: int, sampling_rate: float, max_batch_size: int
) -> float:
  """P[a Poisson(q) sample of N+1 units has more than `max_batch_size`].

  The probability, per step, that truncating the sample to a fixed maximum
  batch changes anything, for the larger of two neighbouring datasets
  (N + 1 units; the tail is increasing in N).
  """
  return float(stats.binom.sf(max_batch_size, dataset_size + 1, sampling_rate))


def poisson_equivalent(
    event: dp_accounting.DpEvent,
) -> tuple[dp_accounting.DpEvent, float]:
  """Replaces truncated-sampling steps by untruncated ones for RDP.

  Returns the untruncated event and the summed truncation probability P_T of
  all its steps (coupling: the truncated and untruncated mechanisms differ
  with probability at most P_T on any dataset).
  """
  if isinstance(event, dp_accounting.TruncatedSubsampledGaussianDpEvent):
    untruncated = dp_accounting.PoissonSampledDpEvent(
        event.sampling_probability,
        dp_accounting.GaussianDpEvent(event.noise_multiplier),
    )
    # The event's dataset_size is already the larger neighbour's (N + 1).
    return untruncated, truncation_probability(
        event.dataset_size - 1, event.sampling_probability,
        event.truncated_batch_size)
  if isinstance(event, dp_accounting.SelfComposedDpEvent):
    inner, p = poisson_equivalent(event.event)
    return dp_accounting.SelfComposedDpEvent(inner, event.count), p * event.count
  if isinstance(event, dp_accounting.ComposedDpEvent):
    parts = [poisson_equivalent(e) for e in event.events]
    return (dp_accounting.ComposedDpEvent([e for e, _ in parts]),
            sum(p for _, p in parts))
  return event, 0.0


def event_to_dict(event: dp_accounting.DpEvent) -> dict:
  """A JSON-ready dict of `event.to_named_tuple()` (field names kept)."""

  def convert(value):
    if isinstance(value, dp_event.DpEventNamedTuple):
      return {f: convert(getattr(value, f)) for f in value._fields}
    if isinstance(value, (list, tuple)):
      return [convert(v) for v in value]
    return value

  return convert(event.to_named_tuple())


def event_from_dict(data: Mapping) -> dp_accounting.DpEvent:
  """Inverse of `event_to_dict`, through `DpEvent.from_named_tuple`.

  Only classes of `dp_accounting.dp_event` are accepted (the JSON may come from
  anywhere; it must not name a module to import).
  """

  def convert(value):
    if isinstance(value, Mapping) and "class_name" in value:
      if value.get("module_name") != "dp_accounting.dp_event":
        raise ValueError(
            f"not a dp_accounting event: module {value.get('module_name')!r}."
        )
      fields = list(value)
      wrapper = collections.namedtuple(
          f"_{value['class_name']}NamedTupleWrapper", fields)
      return wrapper(**{k: convert(v) for k, v in value.items()})
    if isinstance(value, list):
      return [convert(v) for v in value]
    return value

  return dp_accounting.DpEvent.from_named_tuple(convert(dict(data)))


def grouped_composition(
    events: Sequence[dp_accounting.DpEvent]) -> dp_accounting.DpEvent:
  """The composition of `events` with equal events counted together.

  Composition is commutative, so `[SelfComposed(e, 2), SelfComposed(e, 2),
  e']` equals `Composed([SelfComposed(e, 4), e'])`; a PLD accountant then
  builds one distribution per distinct event and self-composes it (fast),
  instead of one per round.
  """
  grouped: dict = {}
  unhashable = []
  for event in events:
    base, count = ((event.event, event.count) if isinstance(
        event, dp_accounting.SelfComposedDpEvent) else (event, 1))
    try:
      grouped[base] = grouped.get(base, 0) + count
    except TypeError:  # Unhashable (e.g. a ComposedDpEvent): keep as is.
      unhashable.append(event)
  return dp_accounting.ComposedDpEvent(
      [dp_accounting.SelfComposedDpEvent(base, n)
       for base, n in grouped.items()] + unhashable)

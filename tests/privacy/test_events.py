"""Tests for fedjax_seg.privacy.events: the events a site releases, alone."""

import json

import dp_accounting
from dp_accounting import rdp
import pytest
from scipy import stats

from fedjax_seg.privacy import events

_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


def _rdp_epsilon(event, delta=1e-5):
  accountant = rdp.RdpAccountant(neighboring_relation=_ADD_REMOVE)
  accountant.compose(event)
  return accountant.get_epsilon(delta)


def test_each_setting_gives_its_dp_accounting_event():
  assert isinstance(events.poisson_gaussian_event(1.0, 0.1, 0),
                    dp_accounting.NoOpDpEvent)
  assert isinstance(events.poisson_gaussian_event(0.0, 0.1, 3),
                    dp_accounting.NonPrivateDpEvent)
  whole = events.poisson_gaussian_event(1.5, 1.0, 4)
  assert whole == dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(1.5), 4)
  sampled = events.poisson_gaussian_event(1.5, 0.25, 4)
  assert sampled == dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(
          0.25, dp_accounting.GaussianDpEvent(1.5)), 4)
  # Truncated sampling, built for the larger neighbour (N + 1 units).
  truncated = events.poisson_gaussian_event(1.5, 0.25, 4, dataset_size=40,
                                            max_batch_size=20)
  assert truncated == dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=41, sampling_probability=0.25, truncated_batch_size=20,
          noise_multiplier=1.5), 4)
  # With the whole dataset each step there is nothing to truncate.
  assert events.poisson_gaussian_event(
      1.5, 1.0, 4, dataset_size=40, max_batch_size=20) == whole


def test_bad_arguments_name_the_problem():
  for args, match in [((-1.0, 0.1, 1), "noise_multiplier"),
                      ((float("nan"), 0.1, 1), "noise_multiplier"),
                      ((1.0, 1.5, 1), "sampling_rate"),
                      ((1.0, 0.1, 2.5), "steps"),
                      ((1.0, 0.1, -1), "steps")]:
    with pytest.raises(ValueError, match=match):
      events.poisson_gaussian_event(*args)
  with pytest.raises(ValueError, match="both"):
    events.poisson_gaussian_event(1.0, 0.1, 1, dataset_size=10)
  with pytest.raises(ValueError, match=">= 1"):
    events.poisson_gaussian_event(1.0, 0.1, 1, dataset_size=0,
                                  max_batch_size=4)


def test_truncation_probability_is_the_binomial_tail_of_n_plus_one():
  for n, q, b in [(50, 0.2, 16), (1000, 0.032, 40), (10, 0.5, 10)]:
    assert events.truncation_probability(n, q, b) == pytest.approx(
        stats.binom.sf(b, n + 1, q), rel=1e-12)
  assert events.truncation_probability(10, 0.5, 11) == 0.0


def test_poisson_equivalent_drops_truncation_and_sums_its_probability():
  n, q, b = 50, 0.2, 16
  one = events.poisson_gaussian_event(0.8, q, 3, dataset_size=n,
                                      max_batch_size=b)
  plain = events.poisson_gaussian_event(1.1, 0.1, 2)
  untruncated, p = events.poisson_equivalent(
      dp_accounting.ComposedDpEvent([one, plain, one]))
  assert untruncated == dp_accounting.ComposedDpEvent(
      [events.poisson_gaussian_event(0.8, q, 3), plain,
       events.poisson_gaussian_event(0.8, q, 3)])
  assert p == pytest.approx(6 * stats.binom.sf(b, n + 1, q), rel=1e-12)
  assert events.poisson_equivalent(plain) == (plain, 0.0)


def test_grouped_composition_counts_equal_events_and_keeps_the_figure():
  a = events.poisson_gaussian_event(1.0, 0.05, 2)
  b = events.poisson_gaussian_event(1.3, 0.05, 3)
  nested = dp_accounting.ComposedDpEvent([b])  # Unhashable: kept as is.
  sequence = [a, a, b, a, nested]
  grouped = events.grouped_composition(sequence)
  assert grouped.events[:2] == [
      dp_accounting.SelfComposedDpEvent(a.event, 6),
      dp_accounting.SelfComposedDpEvent(b.event, 3)]
  assert grouped.events[2:] == [nested]
  assert _rdp_epsilon(grouped) == pytest.approx(
      _rdp_epsilon(dp_accounting.ComposedDpEvent(sequence)), rel=1e-12)


def test_json_round_trip_of_every_form_and_foreign_modules_refused():
  forms = [
      events.poisson_gaussian_event(1.0, 0.1, 0),
      events.poisson_gaussian_event(0.0, 0.1, 3),
      events.poisson_gaussian_event(1.5, 1.0, 4),
      events.poisson_gaussian_event(1.5, 0.25, 4),
      events.poisson_gaussian_event(1.5, 0.25, 4, dataset_size=40,
                                    max_batch_size=20),
  ]
  forms.append(dp_accounting.ComposedDpEvent(forms[2:]))
  for event in forms:
    data = json.loads(json.dumps(events.event_to_dict(event)))
    assert events.event_from_dict(data) == event
  data = events.event_to_dict(forms[3])
  data["event"]["module_name"] = "os"
  with pytest.raises(ValueError, match="not a dp_accounting event"):
    events.event_from_dict(data)

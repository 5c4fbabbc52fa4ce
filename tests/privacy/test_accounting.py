"""Tests for fedjax_seg.privacy.accounting: PrivacyLedger against dp_accounting."""

import collections
import json

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest
from scipy import stats

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import events as events_lib

MNIST = dict(noise_multiplier=1.1, sampling_rate=256 / 60000, steps=14062)


def _plain_rdp_epsilon(events, delta):
  acc = rdp.RdpAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  for e in events:
    acc.compose(e)
  return acc.get_epsilon(delta)


def test_golden_tf_privacy_mnist_rdp_and_pld():
  ledger = accounting.PrivacyLedger(["mnist"], delta=1e-5)
  ledger.record("mnist", **MNIST)
  assert ledger.epsilon("mnist") == pytest.approx(2.5966, abs=5e-5)
  assert ledger.epsilon_pld("mnist") == pytest.approx(2.3817, abs=5e-4)


def test_golden_dp_accounting_rdp_vector():
  # dp_accounting's own test: q=0.01, sigma=2.5, 50 steps.
  orders = [1.5, 2.5, 5, 50, 100, np.inf]
  ledger = accounting.PrivacyLedger(["s"], delta=1e-5, orders=orders)
  ledger.record("s", noise_multiplier=2.5, sampling_rate=0.01, steps=50)
  expected = [6.70579741e-04, 1.08548710e-03, 2.18075656e-03, 2.38460375e-02,
              1.67416308e02, np.inf]
  np.testing.assert_allclose(ledger.rdp("s"), expected, rtol=1e-6)


record = st.tuples(st.floats(0.5, 5.0), st.floats(0.001, 1.0),
                   st.integers(1, 200))


@settings(max_examples=10)
@given(per_site=st.lists(st.lists(record, min_size=1, max_size=4),
                         min_size=1, max_size=3))
def test_ledger_equals_plain_dp_accounting_and_never_decreases(per_site):
  names = [f"site{i}" for i in range(len(per_site))]
  ledger = accounting.PrivacyLedger(names, delta=1e-6)
  for name, records in zip(names, per_site):
    previous = 0.0
    events = []
    for sigma, q, steps in records:
      ledger.record(name, sigma, q, steps)
      events.append(dp_accounting.SelfComposedDpEvent(
          dp_accounting.PoissonSampledDpEvent(
              q, dp_accounting.GaussianDpEvent(sigma)) if q < 1 else
          dp_accounting.GaussianDpEvent(sigma), steps))
      eps = ledger.epsilon(name)
      assert eps >= previous
      previous = eps
    assert eps == pytest.approx(_plain_rdp_epsilon(events, 1e-6), rel=1e-9)
  assert ledger.max_epsilon() == max(ledger.epsilons().values())


def test_cached_epsilons_follow_every_new_event():
  # epsilon is cached per event count: reading, recording (one site, or a
  # round's events at once) and reading again gives the fresh figures.
  ledger = accounting.PrivacyLedger(["a", "b", "c"], delta=1e-5)
  event = events_lib.poisson_gaussian_event(1.0, 0.1, 5)
  for _ in range(3):
    before = ledger.epsilons()
    ledger.record_events({"a": event, "b": event})
    ledger.record("a", 1.2, 0.05, 3)
    fresh = accounting.PrivacyLedger.from_dict(ledger.to_dict())
    assert ledger.epsilons() == fresh.epsilons()
    assert ledger.epsilon("a") > before["a"] and ledger.epsilon("b") > \
        before["b"]
  assert ledger.epsilon("c") == 0.0


def test_epsilon_is_zero_before_any_event_and_inf_without_noise():
  ledger = accounting.PrivacyLedger(["a", "b"], delta=1e-5)
  assert ledger.epsilons() == {"a": 0.0, "b": 0.0}
  ledger.record("a", noise_multiplier=0.0, sampling_rate=0.1, steps=1)
  assert ledger.epsilon("a") == np.inf
  ledger.record("b", noise_multiplier=1.0, sampling_rate=0.1, steps=0)
  assert ledger.epsilon("b") == 0.0


def test_json_round_trip_and_plain_reader():
  ledger = accounting.PrivacyLedger(["a", "b"], delta=1e-5, unit="patient")
  ledger.record("a", 1.2, 0.05, 30)
  ledger.record("a", 0.9, 0.05, 10)
  ledger.record("b", 2.0, 1.0, 5)
  text = ledger.to_json()
  back = accounting.PrivacyLedger.from_json(text)
  assert back == ledger
  assert back.epsilons() == ledger.epsilons()
  assert back.unit == "patient"

  # A reader with nothing but dp_accounting recomputes the same figures.
  data = json.loads(text)

  def to_named_tuple(value):
    if isinstance(value, dict):
      cls = collections.namedtuple("T", list(value))
      return cls(**{k: to_named_tuple(v) for k, v in value.items()})
    if isinstance(value, list):
      return [to_named_tuple(v) for v in value]
    return value

  for site, entry in data["sites"].items():
    events = [dp_accounting.DpEvent.from_named_tuple(to_named_tuple(e))
              for e in entry["events"]]
    assert _plain_rdp_epsilon(events, data["delta"]) == pytest.approx(
        ledger.epsilon(site), rel=1e-12)
    assert entry["epsilon"] == ledger.epsilon(site)


def test_from_json_refuses_foreign_modules_and_formats():
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record("a", 1.0, 0.1, 1)
  data = ledger.to_dict()
  data["sites"]["a"]["events"][0]["module_name"] = "os"
  with pytest.raises(ValueError, match="not a dp_accounting event"):
    accounting.PrivacyLedger.from_dict(data)
  with pytest.raises(ValueError, match="format"):
    accounting.PrivacyLedger.from_dict({"format": "other"})


def test_resumed_ledger_continues_the_same_accountant():
  full = accounting.PrivacyLedger(["a"], delta=1e-5)
  for r in range(6):
    full.record("a", 1.0 + 0.1 * r, 0.02, 10)
  first = accounting.PrivacyLedger(["a"], delta=1e-5)
  for r in range(3):
    first.record("a", 1.0 + 0.1 * r, 0.02, 10)
  resumed = accounting.PrivacyLedger.from_json(first.to_json())
  for r in range(3, 6):
    resumed.record("a", 1.0 + 0.1 * r, 0.02, 10)
  assert resumed == full
  assert resumed.epsilon("a") == pytest.approx(full.epsilon("a"), rel=1e-12)


def test_would_exceed_plans_without_recording():
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record("a", 1.0, 0.05, 100)
  now = ledger.epsilon("a")
  plan = events_lib.poisson_gaussian_event(1.0, 0.05, 100)
  after = ledger.epsilon_if("a", plan)
  assert after > now
  assert ledger.would_exceed("a", budget=(now + after) / 2, planned=plan)
  assert not ledger.would_exceed("a", budget=after * 1.001, planned=plan)
  assert ledger.epsilon("a") == now  # Planning recorded nothing.
  ledger.record_event("a", plan)
  assert ledger.epsilon("a") == pytest.approx(after, rel=1e-12)


def test_truncation_is_accounted():
  # A max batch far in the tail: same epsilon (to 1e-6) as plain Poisson.
  n, q = 1000, 0.032
  p = events_lib.truncation_probability(n, q, max_batch_size=100)
  assert 0 < p < 1e-20
  plain = accounting.PrivacyLedger(["a"], delta=1e-5)
  plain.record("a", 1.0, q, 200)
  truncated = accounting.PrivacyLedger(["a"], delta=1e-5)
  truncated.record("a", 1.0, q, 200, dataset_size=n, max_batch_size=100)
  assert truncated.epsilon("a") == pytest.approx(plain.epsilon("a"), rel=1e-6)
  assert truncated.epsilon("a") >= plain.epsilon("a")
  # PLD accounts the truncated mechanism exactly, and it is not worse.
  assert truncated.epsilon_pld("a") <= plain.epsilon_pld("a") + 1e-3
  # A max batch near the mean is refused: truncation is not negligible.
  tight = accounting.PrivacyLedger(["a"], delta=1e-5)
  tight.record("a", 1.0, q, 200, dataset_size=n, max_batch_size=40)
  with pytest.raises(ValueError, match="truncation is not negligible"):
    tight.epsilon("a")


def test_site_level_records_every_site():
  ledger = accounting.PrivacyLedger(["a", "b", "c"], delta=1e-5, unit="site")
  ledger.record_all(noise_multiplier=1.0, sampling_rate=3 / 10, steps=20)
  eps = ledger.epsilons()
  assert len(set(eps.values())) == 1 and eps["a"] > 0


def test_bad_inputs_name_the_problem():
  with pytest.raises(ValueError, match="delta"):
    accounting.PrivacyLedger(["a"], delta=1.0)
  with pytest.raises(ValueError, match="unique"):
    accounting.PrivacyLedger(["a", "a"], delta=1e-5)
  with pytest.raises(ValueError, match="unit"):
    accounting.PrivacyLedger(["a"], delta=1e-5, unit="slice")
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  with pytest.raises(KeyError, match="unknown site"):
    ledger.record("b", 1.0, 0.1, 1)
  with pytest.raises(ValueError, match="noise_multiplier"):
    ledger.record("a", -1.0, 0.1, 1)
  with pytest.raises(ValueError, match="sampling_rate"):
    ledger.record("a", 1.0, 1.5, 1)
  with pytest.raises(ValueError, match="steps"):
    ledger.record("a", 1.0, 0.1, 1.5)


def test_pld_agrees_with_plain_pld_accountant():
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record("a", 1.5, 0.01, 300)
  ledger.record("a", 0.9, 0.01, 100)
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  for e in ledger.events("a"):
    acc.compose(e)
  assert ledger.epsilon_pld("a") == pytest.approx(acc.get_epsilon(1e-5),
                                                  rel=1e-9)
  assert ledger.epsilon_pld("a") < ledger.epsilon("a")


@pytest.mark.slow
def test_pld_groups_repeated_events_without_changing_the_figure():
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  for _ in range(20):  # One record per round, as the runner does.
    ledger.record("a", 1.0, 0.05, 2, dataset_size=200, max_batch_size=40)
  ledger.record("a", 1.3, 0.05, 3)
  grouped = events_lib.grouped_composition(ledger.events("a"))
  assert len(grouped.events) == 2
  acc = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
  for e in ledger.events("a")[-1:] + [dp_accounting.SelfComposedDpEvent(
      ledger.events("a")[0].event, 40)]:
    acc.compose(e)
  assert ledger.epsilon_pld("a") == pytest.approx(acc.get_epsilon(1e-5),
                                                  rel=1e-6)


@pytest.mark.slow
def test_truncated_event_is_built_for_the_larger_neighbour():
  """dp_accounting's truncated PLD takes the size of the dataset holding the
  differing unit; under add/remove-one the worst case is N + 1."""
  n, q, b = 50, 0.2, 16
  event = events_lib.poisson_gaussian_event(0.8, q, 3, dataset_size=n,
                                            max_batch_size=b)
  assert event.event.dataset_size == n + 1
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record("a", 0.8, q, 3, dataset_size=n, max_batch_size=b)
  direct = pld.PLDAccountant(dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
                             1e-4)
  direct.compose(dp_accounting.SelfComposedDpEvent(
      dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=n + 1, sampling_probability=q, truncated_batch_size=b,
          noise_multiplier=0.8), 3))
  assert ledger.epsilon_pld("a") == pytest.approx(direct.get_epsilon(1e-5),
                                                  rel=1e-9)
  # The RDP coupling uses the same neighbour: P[Binomial(N + 1, q) > B].
  untruncated, p_trunc = events_lib.poisson_equivalent(event)
  assert p_trunc == pytest.approx(3 * stats.binom.sf(b, n + 1, q), rel=1e-12)
  assert isinstance(untruncated.event, dp_accounting.PoissonSampledDpEvent)

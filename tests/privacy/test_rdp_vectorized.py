"""The vectorised RDP against dp_accounting's RdpAccountant."""

import logging

import dp_accounting
from dp_accounting import rdp
import numpy as np
import pytest

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import events as events_lib
from fedjax_seg.privacy import calibration
from fedjax_seg.privacy import rdp_vectorized

DEFAULT_ORDERS = np.array(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS, float)
# Fractional orders are the slow part of dp_accounting's series; this grid
# keeps some (and the integer orders up to 256) so 1,000 schedules run fast.
SMALL_ORDERS = np.array([1.5, 2, 2.5, 3, 4, 5, 6, 8, 10, 12,
                         16, 20, 24, 32, 48, 64, 128, 256], float)
_ADD_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE


@pytest.fixture(autouse=True)
def _quiet_dp_accounting():
  # dp_accounting logs a warning for every fractional order whose series does
  # not converge (both sides then exclude that order).
  logger = logging.getLogger("absl")
  level = logger.level
  logger.setLevel(logging.ERROR)
  yield
  logger.setLevel(level)


def random_schedules(rng, count):
  """Heterogeneous schedules: 1-4 events of (q, sigma, steps) each, with q
  log-uniform in [1e-4, 1] (some exactly 1), sigma log-uniform in [0.3, 50],
  steps from 1 to 10,000."""
  schedules = []
  for _ in range(count):
    n = int(rng.integers(1, 5))
    q = np.exp(rng.uniform(np.log(1e-4), 0.0, n))
    q[rng.random(n) < 0.05] = 1.0
    sigma = np.exp(rng.uniform(np.log(0.3), np.log(50.0), n))
    steps = rng.integers(1, 10_001, n)
    schedules.append((q, sigma, steps))
  return schedules


def reference_epsilon(q, sigma, steps, orders, delta):
  acc = rdp.RdpAccountant(list(orders), _ADD_REMOVE)
  for qi, si, ni in zip(q, sigma, steps):
    step = (dp_accounting.GaussianDpEvent(si) if qi == 1.0 else
            dp_accounting.PoissonSampledDpEvent(
                qi, dp_accounting.GaussianDpEvent(si)))
    acc.compose(dp_accounting.SelfComposedDpEvent(step, int(ni)))
  return acc.get_epsilon(delta)


def vectorised_epsilons(schedules, orders, delta):
  width = max(len(s[0]) for s in schedules)
  pad = lambda x, v: np.pad(np.asarray(x, float), (0, width - len(x)),
                            constant_values=v)
  q = np.stack([pad(s[0], 0.5) for s in schedules])
  sigma = np.stack([pad(s[1], 1.0) for s in schedules])
  steps = np.stack([pad(s[2], 0) for s in schedules])  # 0: padding.
  total = rdp_vectorized.composed_rdp(q, sigma, steps, orders)  # [N, O]
  return np.array([rdp.rdp_privacy_accountant.compute_epsilon(
      orders, r, delta)[0] for r in total])


def assert_same_epsilons(ours, reference):
  reference = np.asarray(reference)
  both_inf = np.isinf(ours) & np.isinf(reference)
  assert np.array_equal(np.isinf(ours), np.isinf(reference))
  rel = np.abs(ours - reference) / np.maximum(np.abs(reference), 1e-300)
  assert np.max(np.where(both_inf, 0.0, rel)) < 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("part", range(4))
def test_one_thousand_random_schedules_match_dp_accounting(part):
  # 1,000 schedules in four parts of 250 (so that test workers share them).
  schedules = random_schedules(np.random.default_rng(0), 1000)[
      250 * part:250 * (part + 1)]
  ours = vectorised_epsilons(schedules, SMALL_ORDERS, 1e-5)
  reference = [reference_epsilon(*s, SMALL_ORDERS, 1e-5) for s in schedules]
  assert_same_epsilons(ours, reference)


def test_random_schedules_match_at_the_default_orders():
  rng = np.random.default_rng(1)
  schedules = random_schedules(rng, 25)
  ours = vectorised_epsilons(schedules, DEFAULT_ORDERS, 1e-5)
  reference = [reference_epsilon(*s, DEFAULT_ORDERS, 1e-5) for s in schedules]
  assert_same_epsilons(ours, reference)


def test_rdp_vectors_match_including_orders_that_do_not_converge():
  # sigma 0.72 at q 0.18: dp_accounting's fractional series stops at 1000
  # terms without converging for alpha <= 1.7 and excludes those orders.
  q, sigma = np.array([0.183406, 0.01, 1e-4]), np.array([0.719623, 1.0, 40.0])
  ours = rdp_vectorized.poisson_gaussian_rdp(q, sigma, DEFAULT_ORDERS)
  for k in range(3):
    ref = rdp.rdp_privacy_accountant._compute_rdp_poisson_subsampled_gaussian(  # pylint: disable=protected-access
        q[k], sigma[k], DEFAULT_ORDERS)
    np.testing.assert_array_equal(np.isinf(ours[k]), np.isinf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(ours[k][finite], ref[finite], rtol=1e-4,
                               atol=1e-15)
  assert np.isinf(ours[0, 0]) and np.isfinite(ours[0, -1])


def test_special_cases():
  orders = np.array([1.5, 2.0, 10.0])
  out = rdp_vectorized.poisson_gaussian_rdp([0.0, 1.0, 0.5], [1.0, 2.0, 0.0],
                                            orders)
  np.testing.assert_array_equal(out[0], 0.0)  # Never sampled.
  np.testing.assert_allclose(out[1], orders / 8.0)  # alpha / (2 sigma^2).
  assert np.all(np.isinf(out[2]))  # No noise.
  with pytest.raises(ValueError, match="sampling rates"):
    rdp_vectorized.poisson_gaussian_rdp(1.5, 1.0, orders)
  with pytest.raises(ValueError, match="noise multipliers"):
    rdp_vectorized.poisson_gaussian_rdp(0.5, -1.0, orders)


def test_stable_where_a_is_one_plus_tiny():
  # Small q, large sigma: A_alpha - 1 ~ q^2 alpha (alpha - 1) / (2 sigma^2).
  q, sigma, alpha = 1e-4, 50.0, 2.0
  got = rdp_vectorized.poisson_gaussian_rdp(q, sigma, [alpha])[0]
  exact = np.log1p(q * q * np.expm1(1.0 / sigma ** 2))  # alpha = 2, closed form.
  assert got == pytest.approx(exact, rel=1e-12)


def test_composition_is_monotone_and_zero_counts_add_nothing():
  q = np.array([[0.1, 0.2]])
  sigma = np.array([[1.0, 0.0]])  # The sigma-0 event is never composed.
  one = rdp_vectorized.composed_rdp(q, sigma, [[10, 0]], SMALL_ORDERS)
  more = rdp_vectorized.composed_rdp(q, sigma, [[11, 0]], SMALL_ORDERS)
  assert not np.any(np.isnan(one)) and np.isfinite(one).sum() >= 15
  assert np.all(more >= one)


def test_ledger_batch_record_equals_one_by_one():
  names = [f"s{k}" for k in range(5)]
  batch = accounting.PrivacyLedger(names, delta=1e-5)
  single = accounting.PrivacyLedger(names, delta=1e-5)
  for r in range(3):
    events = {n: events_lib.poisson_gaussian_event(
        1.3 * 0.9 ** r + 0.01 * k, 0.05 * (k + 1), 2, dataset_size=40 * (k + 1),
        max_batch_size=40 * (k + 1)) for k, n in enumerate(names)}
    batch.record_events(events)
    for n, e in events.items():
      single.record_event(n, e)
  assert batch == single
  for n in names:
    assert batch.epsilon(n) == single.epsilon(n)


def test_ledger_epsilon_matches_dp_accounting():
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  for r in range(20):
    ledger.record("a", 1.2 * 0.97 ** r, 0.02, 5)
  ref = rdp.RdpAccountant(neighboring_relation=_ADD_REMOVE)
  for event in ledger.events("a"):
    ref.compose(event)
  assert ledger.epsilon("a") == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_accountant_calibrates_like_dp_accounting():
  event = lambda s: dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(
          s)), 200)
  ours = dp_accounting.calibrate_dp_mechanism(
      accounting.VectorizedRdpAccountant, event, 4.0, 1e-5,
      bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
      tol=1e-6)
  ref = dp_accounting.calibrate_dp_mechanism(
      lambda: rdp.RdpAccountant(neighboring_relation=_ADD_REMOVE), event, 4.0,
      1e-5, bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
      tol=1e-6)
  assert ours == pytest.approx(ref, abs=2e-6)
  # The library's calibration uses it.
  assert calibration.calibrate_noise_multiplier(4.0, 1e-5, 0.05, 200) == (
      pytest.approx(ref, abs=2e-5))


def test_accountant_refuses_what_rdp_does_not_support():
  acc = accounting.VectorizedRdpAccountant()
  assert acc.supports(dp_accounting.GaussianDpEvent(1.0))
  assert acc.compose(dp_accounting.NonPrivateDpEvent()).get_epsilon(
      1e-5) == np.inf
  assert not acc.supports(dp_accounting.UnsupportedDpEvent())
  with pytest.raises(dp_accounting.UnsupportedEventError):
    acc.compose(dp_accounting.UnsupportedDpEvent())


@pytest.mark.parametrize("count", [0, -3, 2.5])
def test_counts_below_one_are_refused(count):
  # A count of 0 would make an inf order nan (0 * inf) and epsilon 0.
  step = dp_accounting.PoissonSampledDpEvent(0.1,
                                             dp_accounting.GaussianDpEvent(1.0))
  event = dp_accounting.SelfComposedDpEvent(step, count)
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record("a", 1.0, 0.1, 100)
  before = ledger.epsilon("a")
  with pytest.raises(ValueError, match="count"):
    ledger.record_event("a", event)
  with pytest.raises(ValueError, match="count"):
    ledger.epsilon_if("a", event)
  assert ledger.epsilon("a") == before

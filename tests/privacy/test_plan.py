"""Tests for fedjax_seg.privacy.plan: the noise plan from plain numbers."""



import numpy as np
import pytest

from fedjax_seg import privacy
from fedjax_seg.privacy import plan as plan_lib
from fedjax_seg.privacy import schedules

NAMES = ("small", "large", "held_out")
UNITS = np.array([40, 400, 100])


def _plan(**kwargs):
  args = dict(site_names=NAMES, units=UNITS, batch_size=8, local_steps=2,
              rounds=6, delta=1e-5, target_epsilon=4.0,
              training_sites=np.array([True, True, False]))
  args.update(kwargs)
  return plan_lib.plan_noise(**args)


def test_calibrated_sigmas_meet_the_target_in_the_ledger_per_site():
  plan = _plan()
  assert plan.base_sigma[0] > plan.base_sigma[1]  # The small site needs more.
  np.testing.assert_array_equal(plan.sampling_rates, np.minimum(1, 8 / UNITS))
  ledger, site_ledger = plan.new_ledgers()
  everyone = np.ones(3, bool)
  for r in range(6):
    plan.charge(ledger, site_ledger, r, everyone)
  for k, name in enumerate(NAMES):
    eps = ledger.epsilon(name)
    assert 0.99 * 4.0 <= eps <= 4.0, (name, eps)
    # One event per round, what a device applies (float32).
    assert len(ledger.events(name)) == 6
  assert plan.recorded_sigma.dtype == np.float64
  np.testing.assert_array_equal(
      plan.recorded_sigma, np.vectorize(plan_lib.f32)(plan.accounted_sigma))


def test_a_schedule_and_windows_shape_each_sites_rounds():
  shape = schedules.named_shape("linear", 6, end_factor=0.5)
  values = schedules.evaluate(shape, 6)
  windows = np.array([[0, 6], [2, 6], [0, 6]])  # "large" joins at round 3.
  plan = _plan(schedule_shape=shape, windows=windows)
  np.testing.assert_allclose(plan.accounted_sigma[:, 0],
                             values * plan.base_sigma[0])
  ledger, site_ledger = plan.new_ledgers()
  for r in range(2, 6):
    plan.charge(ledger, site_ledger, r, np.array([False, True, False]))
  # Calibrated for its own four rounds, it ends at the target too.
  assert 0.99 * 4.0 <= ledger.epsilon("large") <= 4.0


def test_site_level_dp_charges_every_training_site_every_round():
  plan = _plan(use_site_level=True, site_noise_multiplier=1.5,
               site_sampling_rate=0.5)
  part = np.array([True, False, False])  # The sampled set stays hidden.
  np.testing.assert_array_equal(plan.charged_sites(part),
                                [True, True, False])
  ledger, site_ledger = plan.new_ledgers()
  charged = plan.charge(ledger, site_ledger, 0, part)
  assert list(charged) == [0, 1]
  assert [len(site_ledger.events(s)) for s in NAMES] == [1, 1, 0]
  assert site_ledger.events("small")[0] == privacy.poisson_gaussian_event(
      plan_lib.f32(1.5), 0.5, 1)


def test_budget_stop_and_applied_noise_checks():
  plan = _plan(target_epsilon=None, noise_multiplier=1.0)
  ledger, site_ledger = plan.new_ledgers()
  part = np.ones(3, bool)
  assert plan.budget_stop(ledger, site_ledger, 0, part, None) is None
  would = ledger.epsilon_if("small", plan.record_level_event(0, 0))
  reason = plan.budget_stop(ledger, site_ledger, 0, part, would * 0.999)
  assert reason.startswith("budget: round 1 would take site 'small'")
  assert plan.budget_stop(ledger, site_ledger, 0, part, would * 1.001) is None
  good = dict(noise_multiplier=np.float32(plan.applied_sigma[0]),
              steps=np.full(3, 2), sampling_rate=plan.sampling_rates)
  plan.check_applied(0, part, **good)
  with pytest.raises(AssertionError, match="site small"):
    plan.check_applied(0, part, **dict(good, steps=np.array([1, 2, 2])))


def test_prior_events_are_composed_first_and_the_calibration_aims_at_the_total():
  alone = _plan()
  spent = alone.record_level_event(0, 0)
  prior = {"small": [spent] * 3}
  plan = _plan(prior_events=prior)
  assert plan.base_sigma[0] > alone.base_sigma[0]
  assert plan.base_sigma[1] == alone.base_sigma[1]
  ledger, _ = plan.new_ledgers()
  assert ledger.events("small") == [spent] * 3
  assert plan.prior_epsilon_at_least(ledger.epsilon("small")) == (
      "small", ledger.epsilon("small"))
  with pytest.raises(ValueError, match="site 'small'"):
    _plan(prior_events={"small": [spent] * 400})


def test_a_changed_plan_is_detected_for_the_rounds_both_planned():
  plan = _plan(target_epsilon=None, noise_multiplier=1.0)
  longer = _plan(target_epsilon=None, noise_multiplier=1.0,
                 rounds=9)
  assert longer.same_planned_noise(plan.to_meta())
  louder = _plan(target_epsilon=None, noise_multiplier=1.1)
  assert not louder.same_planned_noise(plan.to_meta())


def test_adaptive_clipping_accounts_the_count_release():
  adaptive = plan_lib.AdaptiveSettings(mode="geometric", target_quantile=0.5,
                                       learning_rate=0.2)
  plan = _plan(adaptive=adaptive)
  # The gradient noise is raised to pay for the count; the pair is
  # accounted at the planned sigma.
  assert np.all(plan.applied_sigma > plan.accounted_sigma)
  np.testing.assert_allclose(plan.recorded_sigma, plan.accounted_sigma,
                             rtol=1e-6)
  assert plan.adaptive.count_noise_multiplier == plan_lib.f32(
      plan.adaptive.count_noise_multiplier)


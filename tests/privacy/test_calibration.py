"""Tests for fedjax_seg.privacy.calibration."""

import dp_accounting
import numpy as np
import pytest

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import calibration
from fedjax_seg.privacy import events
from fedjax_seg.privacy import schedules


@pytest.mark.parametrize("target,q,steps", [(1.0, 0.01, 1000), (8.0, 0.1, 300),
                                            (3.0, 1.0, 20)])
def test_constant_sigma_hits_target_within_one_percent(target, q, steps):
  sigma = calibration.calibrate_noise_multiplier(target, 1e-5, q, steps)
  ledger = accounting.PrivacyLedger(["s"], delta=1e-5)
  ledger.record("s", sigma, q, steps)
  assert ledger.epsilon("s") <= target * 1.0001
  assert ledger.epsilon("s") == pytest.approx(target, rel=0.01)


def test_schedule_scale_hits_target_and_matches_ledger_of_applied_sigmas():
  shape = schedules.per_round(
      schedules.linear_schedule(1.5, 1.0, transition_steps=10), 5)
  steps = 50
  scale = calibration.calibrate_noise_multiplier(2.0, 1e-5, 0.05, steps,
                                                 schedule=shape)
  ledger = accounting.PrivacyLedger(["s"], delta=1e-5)
  applied = schedules.evaluate(schedules.scaled(shape, scale), steps)
  for sigma in applied:  # One record per step, as a run would do.
    ledger.record("s", float(sigma), 0.05, 1)
  assert ledger.epsilon("s") == pytest.approx(2.0, rel=0.01)
  event = calibration.schedule_event(scale, 0.05, steps, shape)
  assert ledger.epsilon_if("s", []) == pytest.approx(
      accounting.PrivacyLedger(["t"], delta=1e-5).epsilon_if("t", event),
      rel=1e-6)


@pytest.mark.slow
def test_pld_calibration_needs_less_noise_than_rdp():
  args = (2.0, 1e-5, 0.02, 500)
  rdp_sigma = calibration.calibrate_noise_multiplier(*args)
  pld_sigma = calibration.calibrate_noise_multiplier(*args, accountant="pld")
  assert pld_sigma < rdp_sigma
  ledger = accounting.PrivacyLedger(["s"], delta=1e-5)
  ledger.record("s", pld_sigma, 0.02, 500)
  assert ledger.epsilon_pld("s") == pytest.approx(2.0, rel=0.01)


def test_site_adaptive_noise_brings_every_site_to_the_same_epsilon():
  sizes = {"tiny": 80, "mid": 400, "big": 3000}
  sigmas = calibration.calibrate_site_noise_multipliers(
      3.0, 1e-5, site_sizes=sizes, batch_size=16, steps=200)
  assert sigmas["tiny"] > sigmas["mid"] > sigmas["big"]
  ledger = accounting.PrivacyLedger(list(sizes), delta=1e-5)
  for site, n in sizes.items():
    ledger.record(site, sigmas[site], 16 / n, 200)
  for eps in ledger.epsilons().values():
    assert eps == pytest.approx(3.0, rel=0.01)


def test_bad_targets_are_refused():
  with pytest.raises(ValueError, match="target_epsilon"):
    calibration.calibrate_noise_multiplier(0.0, 1e-5, 0.1, 10)
  with pytest.raises(ValueError, match="sampling_rate"):
    calibration.calibrate_noise_multiplier(1.0, 1e-5, 0.0, 10)
  with pytest.raises(ValueError, match="schedule"):
    calibration.calibrate_noise_multiplier(
        1.0, 1e-5, 0.1, 10, schedule=schedules.linear_schedule(1.0, 0.0, 5))


def test_site_calibration_with_truncation_meets_the_target_in_the_ledger():
  """With a truncated batch the calibrated sigma is checked against exactly
  the events a ledger records (float32 sigmas, truncation slack)."""
  sizes = {"small": 12, "large": 300}
  rounds, local_steps, batch, b_max = 5, 2, 4, 24
  shape = schedules.linear_schedule(1.0, 0.5, rounds - 1)
  sigmas = calibration.calibrate_site_noise_multipliers(
      8.0, 1e-5, site_sizes=sizes, batch_size=batch,
      steps=rounds * local_steps,
      schedule=schedules.per_round(shape, local_steps),
      max_batch_size=b_max, steps_per_event=local_steps)
  for site, n in sizes.items():
    ledger = accounting.PrivacyLedger([site], delta=1e-5)
    for r in range(rounds):
      ledger.record(site, float(np.float32(sigmas[site] * float(shape(r)))),
                    batch / n, local_steps, dataset_size=n,
                    max_batch_size=b_max)
    assert 0.99 * 8.0 <= ledger.epsilon(site) <= 8.0
  events = calibration.planned_events(
      1.0, 0.5, 4, schedule=schedules.per_round(shape, 2), steps_per_event=2,
      dataset_size=10, max_batch_size=8)
  assert len(events) == 2
  assert events[0].event.noise_multiplier == 1.0
  assert events[1].event.noise_multiplier == pytest.approx(
      float(shape(1)), rel=1e-7)
  with pytest.raises(ValueError, match="changes within the event"):
    calibration.planned_events(1.0, 0.5, 4, schedule=shape, steps_per_event=2)


def test_sites_with_composed_prior_events_calibrate_once_after_them():
  # A composed prior event holds a list (unhashable): sites with the same
  # size, batch and prior still share one calibration.
  spent = dp_accounting.ComposedDpEvent([
      events.poisson_gaussian_event(2.0, 0.1, 10),
      events.poisson_gaussian_event(3.0, 0.1, 10)])
  sigmas = calibration.calibrate_site_noise_multipliers(
      4.0, 1e-5, site_sizes={"a": 100, "b": 100, "c": 100}, batch_size=10,
      steps=30, max_batch_size=40,
      prior_events={"a": [spent], "b": [spent]})
  assert sigmas["a"] == sigmas["b"] > sigmas["c"]  # The prior costs noise.
  ledger = accounting.PrivacyLedger(["a"], delta=1e-5)
  ledger.record_event("a", spent)
  for event in calibration.planned_events(
      sigmas["a"], 0.1, 30, dataset_size=100, max_batch_size=40):
    ledger.record_event("a", event)
  assert 0.99 * 4.0 <= ledger.epsilon("a") <= 4.0

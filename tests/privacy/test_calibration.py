"""Tests for fedjax_seg.privacy.calibration."""

import pytest

from fedjax_seg.privacy import accounting
from fedjax_seg.privacy import calibration
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

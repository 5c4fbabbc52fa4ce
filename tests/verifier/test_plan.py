"""The verifier re-derives the plan from the config and site sizes: a ledger
forged consistently with the report's own plan and claims still fails."""

import copy
import dataclasses

import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import loop
from fedjax_seg.run import setup as setup_lib
from fedjax_seg import privacy
from fedjax_seg import verifier
from fedjax_seg.verifier import plan
from tests.run import tiny
from tests.verifier.forge import reclaimed as _reclaimed

TINY = tiny.config(rounds=3, eval_every=3, checkpoint_every=3, noise_seed=0,
                   privacy=C.PrivacyConfig(noise_schedule="cosine"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
  """A run at target epsilon 8 with a cosine schedule (a sigma per round)."""
  return loop.train_and_evaluate(
      TINY, tmp_path_factory.mktemp("verifier") / "run")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
  """Fixed sigma, 3 sites sampled per round."""
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(target_epsilon=None,
                                    noise_multiplier=1.2),
      federated=dataclasses.replace(TINY.federated, sites_per_round=3))
  return loop.train_and_evaluate(
      config, tmp_path_factory.mktemp("verifier") / "cohorts")


def _problems(report):
  result = verifier.verify_report(report)
  assert result.rederived
  return result.problems


@pytest.mark.slow
def test_honest_runs_verify_with_the_plan_rederived(calibrated, cohorts):
  for report in (calibrated, cohorts):
    assert report["privacy"]["verified"]["ok"] is True
    assert report["privacy"]["verified"]["plan_rederived"] is True
    assert _problems(report) == []
  sigmas = calibrated["privacy"]["plan"]["accounted_sigma_per_round"]
  assert len({round(v, 6) for v in next(iter(sigmas.values()))}) == 3


@pytest.mark.slow
def test_a_round_dropped_from_plan_and_ledger_fails(calibrated):
  forged = copy.deepcopy(calibrated)
  site = next(iter(forged["sites"]))
  forged["privacy"]["ledger"]["sites"][site]["events"].pop(1)
  forged["privacy"]["plan"]["rounds_trained_per_site"][site].pop(1)
  problems = _problems(_reclaimed(forged))
  assert any(f"site {site!r}" in p and "derived" in p for p in problems)
  # The report's own plan agrees with the forged ledger: without the
  # config only the derivation could have told.
  del forged["config"]
  assert verifier.verify_report(_reclaimed(forged), rederive=False).ok
  assert any("no config" in p for p in verifier.verify_report(
      _reclaimed(forged)).problems)


@pytest.mark.slow
def test_a_sigma_changed_in_plan_and_ledger_fails(calibrated):
  forged = copy.deepcopy(calibrated)
  site = next(iter(forged["sites"]))
  event = forged["privacy"]["ledger"]["sites"][site]["events"][2]["event"]
  event["noise_multiplier"] *= 0.8
  forged["privacy"]["plan"]["accounted_sigma_per_round"][site][2] = (
      event["noise_multiplier"])
  problems = _problems(_reclaimed(forged))
  assert any(f"site {site!r}" in p and "accounted_sigma_per_round" in p
             for p in problems)
  assert any("event 2" in p and "derived from the config" in p
             for p in problems)


@pytest.mark.slow
def test_a_base_sigma_not_the_calibrated_one_fails(calibrated):
  # Every sigma of one site scaled together, consistently everywhere: the
  # schedule holds, the target is met (more noise), but the calibration
  # would not have chosen it; 20% less misses the target.
  site = next(iter(calibrated["sites"]))
  for factor, message in ((1.2, "is not the calibrated one"),
                          (0.8, "> --target_epsilon")):
    forged = copy.deepcopy(calibrated)
    p = forged["privacy"]
    p["noise_multiplier_per_site"][site] *= factor
    sigmas = p["plan"]["accounted_sigma_per_round"][site]
    for r, event in enumerate(p["ledger"]["sites"][site]["events"]):
      value = float(np.float32(sigmas[r] * factor))
      event["event"]["noise_multiplier"] = sigmas[r] = value
    problems = _problems(_reclaimed(forged))
    assert any(message in line for line in problems), (factor, problems)


@pytest.mark.slow
def test_published_participants_must_match_the_ledger(cohorts):
  assert all(len(row["participants"]) == 3 for row in cohorts["history"])
  forged = copy.deepcopy(cohorts)
  row = forged["history"][1]
  idle = next(s for s in forged["sites"] if s not in row["participants"])
  row["participants"][0] = idle
  assert any("ledger privacy.ledger" in p for p in _problems(forged))
  forged["history"][1]["participants"].append("not_a_site")
  assert any("not in the federation" in p or "participants" in p
             for p in _problems(forged))


@pytest.mark.slow
def test_a_sampled_round_with_an_extra_site_fails(cohorts):
  forged = copy.deepcopy(cohorts)
  row = forged["history"][0]
  extra = next(s for s in forged["sites"] if s not in row["participants"])
  row["participants"].append(extra)
  assert any("--sites_per_round gives 3" in p for p in _problems(forged))


@pytest.mark.slow
def test_the_header_must_be_the_configs(calibrated):
  # Relabelled reports: a config that says --nodp (which would skip the
  # derivation), another delta or unit than the config's.
  for change, field in ((lambda c: c["privacy"].update(enabled=False),
                         "privacy.enabled"),
                        (lambda c: c["privacy"].update(delta=1e-2),
                         "privacy.delta"),
                        (lambda c: c["privacy"].update(unit="example"),
                         "privacy.unit")):
    forged = copy.deepcopy(calibrated)
    change(forged["config"])
    assert any(field in p for p in _problems(forged)), field


@pytest.mark.slow
def test_a_budget_stop_must_be_justified(cohorts):
  # Rounds dropped everywhere and the stop blamed on a budget there is not.
  forged = copy.deepcopy(cohorts)
  last = forged["history"].pop()
  forged["rounds_completed"] -= 1
  forged["stopped_reason"] = "budget: round 3 would take a site past it"
  for site in last["participants"]:
    forged["privacy"]["ledger"]["sites"][site]["events"].pop()
    forged["privacy"]["plan"]["rounds_trained_per_site"][site].pop()
  problems = _problems(_reclaimed(forged))
  assert any("stopped by the budget" in p for p in problems), problems
  forged["stopped_reason"] = "tired"
  assert any("unknown stopped_reason" in p for p in _problems(forged))


@pytest.mark.slow
def test_the_derived_schedule_is_the_devices_over_many_rounds(calibrated):
  # float32 like the device (a float32 decay rate drifts from its float64
  # value by 2e-8 per round, 1e-6 after 50 rounds), within the few units in
  # the last place of 1 that the device's own cos and pow may differ by.
  base = plan.read_setting(calibrated["config"])
  for name in plan.SCHEDULES:
    for end in (0.5, 0.01):
      setting = dataclasses.replace(base, schedule=name, rounds=1000,
                                    end_factor=end)
      privacy_config = C.PrivacyConfig(noise_schedule=name,
                                       schedule_end_factor=end)
      want = privacy.schedules.evaluate(
          setup_lib.named_shape(privacy_config, 1000), 1000)
      got = plan.round_shape(setting).astype(np.float64)
      assert np.all(np.abs(got - want) <= 1e-6 * want + plan.SHAPE_ATOL), (
          name, end, np.max(np.abs(got - want)))


@pytest.mark.slow
def test_held_out_sites_with_cohorts_verify(tmp_path):
  # The cohort is drawn among all sites, held-out ones then dropped: fewer
  # sites than --sites_per_round may train, and that is the honest plan.
  config = dataclasses.replace(
      TINY, data=dataclasses.replace(TINY.data, held_out_sites=(
          "ct_scanner_a", "mri_t2_3t", "xray_film")),
      federated=dataclasses.replace(TINY.federated, sites_per_round=3))
  report = loop.train_and_evaluate(config, tmp_path)
  assert report["privacy"]["verified"]["ok"] is True
  assert min(len(row["participants"]) for row in report["history"]) <= 3


@pytest.mark.slow
def test_schedules_follow_optax(calibrated):
  import optax  # pylint: disable=g-import-not-at-top
  base = plan.read_setting(calibrated["config"])
  r = np.arange(7)
  want = {
      "constant": np.ones(7),
      "linear": np.asarray(optax.linear_schedule(1.0, 0.5, 6)(r)),
      "exponential": 0.98 ** r,
      "cosine": np.asarray(optax.cosine_decay_schedule(1.0, 6, 0.5)(r)),
      "step": np.asarray(optax.piecewise_constant_schedule(
          1.0, {3: 0.5})(r))}
  for name, values in want.items():
    setting = dataclasses.replace(base, schedule=name, rounds=7)
    np.testing.assert_allclose(plan.round_shape(setting), values, rtol=1e-6)


def test_the_recorded_source_must_be_the_configs_directory_by_whole_names():
  assert plan.same_directory("/runs/pre", "pre")
  assert plan.same_directory("/runs/pre", "runs/pre/")
  assert plan.same_directory("/home/me/runs/pre", "../runs/pre")
  assert plan.same_directory("/runs/pre", "/runs/pre")
  assert not plan.same_directory("/runs/xpre", "pre")  # Not a suffix match.
  assert not plan.same_directory("/runs/pre", "/other/pre")
  assert not plan.same_directory("/runs/pre", "old/pre")

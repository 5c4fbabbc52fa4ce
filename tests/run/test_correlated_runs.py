"""Runs with correlated noise (--noise_mechanism=banded|blt): resume, the
report's mechanism section, the verifier's re-derivation, refusals."""

import copy
import dataclasses

import pytest

from fedjax_seg import verifier
from fedjax_seg.run import artifacts
from fedjax_seg.run import config as C
from fedjax_seg.run import config_flags
from fedjax_seg.run import loop
from fedjax_seg.run import sweep
from tests.run import tiny
from tests.verifier.forge import reclaimed as _reclaimed


def _config(mechanism, rounds=4, **privacy):
  """The tiny run with 4 to 22 patients per site, 2 local steps (a stream
  of 2 x rounds steps per site), batches of 2 patients, at target epsilon
  4."""
  config = tiny.config(
      rounds=rounds, eval_every=rounds, checkpoint_every=1, noise_seed=0,
      privacy=C.PrivacyConfig(target_epsilon=4.0, noise_mechanism=mechanism,
                              mf_bands=2, blt_max_buffers=2, **privacy))
  return dataclasses.replace(
      config, data=dataclasses.replace(config.data, patients_scale=0.25),
      federated=dataclasses.replace(config.federated, local_steps=2,
                                    batch_size=2))


BANDED = _config("banded")


@pytest.fixture(scope="module")
def banded(tmp_path_factory):
  return loop.train_and_evaluate(
      BANDED, tmp_path_factory.mktemp("correlated") / "banded")


@pytest.mark.slow
def test_banded_run_verifies_and_reports_its_mechanism(banded):
  privacy = banded["privacy"]
  assert privacy["verified"]["ok"] is True
  assert privacy["verified"]["plan_rederived"] is True
  mech = privacy["noise_mechanism"]
  assert mech["kind"] == "banded"
  report_sites = banded["sites"]
  for site, strategy in mech["strategy_per_site"].items():
    # b_k = min(--mf_bands, N_k // B) bands.
    assert len(strategy["coefs"]) == mech["cycles_per_site"][site] == min(
        2, report_sites[site]["train_units"] // 2)
  assert mech["state_copies_of_parameters_per_site"] == 1
  for site, eps in privacy["epsilon_per_site"].items():
    assert 0.98 * 4.0 <= eps <= 4.0
    # The fresh noise and DP-SGD's noise at the same target, both public.
    assert mech["noise_multiplier_per_site"][site] > 0
    assert mech["independent_noise_multiplier_per_site"][site] > 0
    assert mech["model_noise_vs_independent_per_site"][site] > 0
  # Group 0 of 2 trains in one of each round's 2 steps.
  events = privacy["ledger"]["sites"][next(iter(privacy["ledger"]["sites"]))][
      "events"]
  assert [e["count"] for e in events] == [1, 1, 1, 1]


@pytest.mark.slow
def test_banded_run_killed_and_resumed_is_bit_identical(banded, tmp_path):
  killed = dataclasses.replace(BANDED, stop_after_rounds=2)
  partial = loop.train_and_evaluate(killed, tmp_path / "resumed")
  assert partial["rounds_completed"] == 2
  resumed = loop.train_and_evaluate(BANDED, tmp_path / "resumed")
  # The noise stream of every site continued from its checkpointed state.
  assert resumed["final_params_sha256"] == banded["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == banded["privacy"]["ledger"]
  assert (tmp_path / "resumed" / artifacts.REPORT).exists()
  # Resuming with another strategy (fewer bands) is refused: the rerun
  # rounds would reuse the noise keys under another C.
  killed = dataclasses.replace(BANDED, stop_after_rounds=2)
  loop.train_and_evaluate(killed, tmp_path / "other")
  other = dataclasses.replace(BANDED, privacy=dataclasses.replace(
      BANDED.privacy, mf_bands=1))
  with pytest.raises(C.ConfigError, match="other settings"):
    loop.train_and_evaluate(other, tmp_path / "other")


@pytest.mark.slow
def test_a_forged_strategy_fails_the_verifier(banded):
  # Scaling C up would raise the sensitivity: its norm must stay <= 1.
  forged = copy.deepcopy(banded)
  strategy = forged["privacy"]["plan"]["noise_mechanism"][
      "strategy_per_site"][0]
  strategy["coefs"] = [1.2 * c for c in strategy["coefs"]]
  problems = verifier.verify_report(_reclaimed(forged)).problems
  assert any("norm" in p for p in problems), problems
  # More groups (fewer participations) than the config gives.
  forged = copy.deepcopy(banded)
  forged["privacy"]["plan"]["noise_mechanism"]["cycles"][0] += 1
  problems = verifier.verify_report(_reclaimed(forged)).problems
  assert any("cycles" in p for p in problems), problems
  # A ledger that charges DP-SGD's event instead of the cyclic group's.
  forged = copy.deepcopy(banded)
  site = next(iter(forged["sites"]))
  event = forged["privacy"]["ledger"]["sites"][site]["events"][0]
  event["event"]["sampling_probability"] /= 2
  problems = verifier.verify_report(_reclaimed(forged)).problems
  assert any(f"site {site!r}" in p for p in problems), problems
  # A config the runner refuses (adaptive clipping: a count release and a
  # moving clip norm the events leave out).
  forged = copy.deepcopy(banded)
  forged["config"]["privacy"]["adaptive_clipping"] = "geometric"
  problems = verifier.verify_report(_reclaimed(forged)).problems
  assert any("--adaptive_clipping=off" in p for p in problems), problems


@pytest.mark.slow
def test_blt_run_verifies(tmp_path):
  report = loop.train_and_evaluate(_config("blt", rounds=3), tmp_path / "b")
  privacy = report["privacy"]
  assert privacy["verified"]["ok"] is True
  assert privacy["verified"]["plan_rederived"] is True
  mech = privacy["noise_mechanism"]
  assert mech["kind"] == "blt"
  assert 1 <= mech["state_copies_of_parameters_per_site"] <= 2
  for site, eps in privacy["epsilon_per_site"].items():
    assert 0.98 * 4.0 <= eps <= 4.0
    # N_k // B groups, never more than the stream's 3 x 2 steps.
    assert mech["cycles_per_site"][site] == min(max(
        1, report["sites"][site]["train_units"] // 2), 6)


@pytest.mark.parametrize("privacy, federated, flag", [
    (dict(noise_schedule="cosine"), {}, "--noise_schedule"),
    (dict(adaptive_clipping="geometric"), {}, "--adaptive_clipping"),
    (dict(audit=True), {}, "--audit"),
    (dict(enabled=False), {}, "--dp"),
    ({}, dict(sites_per_round=2), "--sites_per_round"),
    ({}, dict(dropout_rate=0.1), "--dropout_rate"),
    (dict(site_level=True, site_sampling_rate=0.5), {},
     "--site_sampling_rate"),
])
def test_settings_correlated_noise_cannot_account_are_refused(
    privacy, federated, flag):
  with pytest.raises(C.ConfigError, match=flag):
    config = _config("banded", **privacy)
    dataclasses.replace(config, federated=dataclasses.replace(
        config.federated, **federated))


@pytest.mark.slow
def test_mechanisms_sweep_side_by_side_and_verify(tmp_path):
  base = config_flags.config_from_values(dict(
      image_size=16, num_slices=2, patients_scale=0.25, widths=[4],
      rounds=2, eval_every=2, checkpoint_every=2, local_steps=2, batch_size=2,
      noise_seed=0, target_epsilon=4.0, mf_bands=2))
  grid = sweep.parse_sweep_flags(["noise_mechanism:independent,banded"])
  members = sweep.build_members(base, grid)
  summary = sweep.run_sweep(members, tmp_path, member_backend="loop")
  result = verifier.verify_sweep(tmp_path)
  assert result.ok, result.problems
  kinds = [m["overrides"]["noise_mechanism"] for m in summary["members"]]
  assert kinds == ["independent", "banded"]
  assert (tmp_path / "frontier.png").stat().st_size > 0

"""Runs with correlated noise at the server (--unit=site, --noise_mechanism=
banded|blt): groups of sites, the report, the verifier, kill and resume."""

import copy
import dataclasses

import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg import verifier
from fedjax_seg.run import config as C
from fedjax_seg.run import loop
from fedjax_seg.run import round as round_lib
from fedjax_seg.run import setup as setup_lib
from tests.run import tiny
from tests.verifier.forge import reclaimed as _reclaimed


def _config(mechanism, q=0.5, rounds=4):
  """The tiny run (8 sites) under site-level DP at site epsilon 8."""
  return tiny.config(
      rounds=rounds, eval_every=rounds, checkpoint_every=1, noise_seed=0,
      privacy=C.PrivacyConfig(unit="site", noise_mechanism=mechanism,
                              site_sampling_rate=q, site_target_epsilon=8.0,
                              mf_bands=2, blt_max_buffers=1))


BANDED = _config("banded")


@pytest.fixture(scope="module")
def banded_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("server") / "banded"
  return workdir, loop.train_and_evaluate(BANDED, workdir)


@pytest.fixture(scope="module")
def banded(banded_run):
  return banded_run[1]


@pytest.mark.slow
def test_server_banded_run_verifies_and_reports(banded):
  privacy = banded["privacy"]
  assert privacy["verified"]["ok"] is True, privacy["verified"]
  mech = privacy["noise_mechanism"]
  assert mech["at"] == "server" and mech["kind"] == "banded"
  # q = 0.5: 2 groups of sites, each trained in full every other round.
  assert mech["cycles"] == 2 and mech["group_sampling_rate"] == 1.0
  assert len(mech["strategy"]["coefs"]) == 2
  assert 0 < mech["model_noise_vs_independent"] < 1
  for eps in privacy["epsilon_per_site"].values():
    assert 0.99 * 8.0 <= eps <= 8.0
  events = privacy["ledger"]["sites"]["ct_scanner_a"]["events"]
  # Group 0 trains in rounds 0 and 2: one event each, none in 1 and 3.
  assert [e.get("count", 0) for e in events] == [1, 0, 1, 0]
  # Which sites trained stays unpublished under site-level DP.
  assert all("participants" not in row for row in banded["history"])


@pytest.mark.slow
def test_only_the_rounds_group_of_sites_trains(tmp_path):
  run, _ = setup_lib.setup(BANDED, tmp_path / "groups")
  groups = fed.server_groups(run.root, 8, 2)
  for r in range(4):
    part = round_lib.participants(run, r)
    # The group trains in full (rate min(1, q b) = 1); no other site.
    np.testing.assert_array_equal(part, groups == r % 2)


@pytest.mark.slow
def test_server_run_killed_and_resumed_is_bit_identical(banded, tmp_path):
  killed = dataclasses.replace(BANDED, stop_after_rounds=2)
  assert loop.train_and_evaluate(killed, tmp_path / "r")[
      "rounds_completed"] == 2
  resumed = loop.train_and_evaluate(BANDED, tmp_path / "r")
  # The server's noise stream continued from its checkpointed state.
  assert resumed["final_params_sha256"] == banded["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == banded["privacy"]["ledger"]
  other = dataclasses.replace(BANDED, privacy=dataclasses.replace(
      BANDED.privacy, noise_mechanism="independent"))
  loop.train_and_evaluate(killed, tmp_path / "o")
  with pytest.raises(C.ConfigError, match="other settings"):
    loop.train_and_evaluate(other, tmp_path / "o")


@pytest.mark.slow
def test_a_forged_server_stream_fails_the_verifier(banded):
  plan_path = ("privacy", "plan", "noise_mechanism")

  def forged(edit):
    report = copy.deepcopy(banded)
    mech = report
    for key in plan_path:
      mech = mech[key]
    edit(report, mech)
    return verifier.verify_report(_reclaimed(report)).problems

  # A larger C raises the sensitivity: its norm must stay <= 1.
  problems = forged(lambda r, m: m["strategy_per_site"][0].update(
      coefs=[1.3 * c for c in m["strategy_per_site"][0]["coefs"]]))
  assert any("norm" in p for p in problems), problems
  # More groups (fewer participations) than q gives.
  problems = forged(lambda r, m: m.update(cycles=[3]))
  assert any("cycles" in p for p in problems), problems
  # A ledger that charges a sampled event where the group trains in full.
  problems = forged(lambda r, m: r["privacy"]["ledger"]["sites"][
      "ct_scanner_a"]["events"][0]["event"].update(noise_multiplier=9.0))
  assert any("ct_scanner_a" in p for p in problems), problems
  # A z above the calibrated one is not what --site_target_epsilon gives.
  problems = forged(lambda r, m: r["privacy"]["plan"].update(
      noise_multiplier=2 * r["privacy"]["plan"]["noise_multiplier"]))
  assert any("not the calibrated one" in p for p in problems), problems


@pytest.mark.slow
def test_server_blt_and_independent_calibrated_runs_verify(tmp_path):
  for mechanism, q in (("blt", 0.34), ("independent", 0.5)):
    report = loop.train_and_evaluate(_config(mechanism, q, rounds=3),
                                     tmp_path / mechanism)
    privacy = report["privacy"]
    assert privacy["verified"]["ok"] is True, privacy["verified"]
    for eps in privacy["epsilon_per_site"].values():
      assert 0.99 * 8.0 <= eps <= 8.0
  assert privacy.get("noise_mechanism") is None  # Independent DP-FedAvg.


@pytest.mark.slow
def test_a_composed_run_calibrates_z_after_the_sources_spending(banded_run,
                                                               tmp_path):
  source_dir, source = banded_run
  config = dataclasses.replace(
      BANDED, model=dataclasses.replace(BANDED.model,
                                        init_from=str(source_dir)),
      privacy=dataclasses.replace(BANDED.privacy, site_target_epsilon=12.0),
      noise_seed=1)
  report = loop.train_and_evaluate(config, tmp_path / "composed")
  privacy = report["privacy"]
  assert privacy["verified"]["ok"] is True, privacy["verified"]
  for site, eps in privacy["epsilon_per_site"].items():
    # The source's 8 and this run's rounds: 12 in all, not 12 more.
    assert 0.99 * 12.0 <= eps <= 12.0
    assert privacy["ledger"]["sites"][site]["events"][:4] == (
        source["privacy"]["ledger"]["sites"][site]["events"])

"""Tests for fedjax_seg.run.scenarios: data that change over rounds, sites that
join and leave, and their accounting in a run."""

import dataclasses

import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import loop
from fedjax_seg.run import scenarios

SCENARIO = C.DataConfig(
    image_size=16, num_slices=2, patients_scale=0.0625,
    scanner_changes=("ct_scanner_a:2:ct_low_dose",),
    intensity_drift=("ct_scanner_b:0.1:0.05",),
    site_joins=("mri_t1_1p5t:3",), site_leaves=("xray_film:3",))
RUN = C.ExperimentConfig(
    data=SCENARIO, model=C.ModelConfig(widths=(4,)),
    federated=C.FederatedConfig(rounds=4, local_steps=1, batch_size=2,
                                learning_rate=0.5, ema_decay=0.0),
    eval_every=1, checkpoint_every=4)
NAMES = ("ct_scanner_a", "ct_scanner_b", "ct_low_dose", "mri_t1_1p5t",
         "mri_t2_3t", "mri_t1_lowfield", "xray_digital", "xray_film")
MODALITIES = ("CT",) * 3 + ("MRI",) * 3 + ("XRAY",) * 2


def test_flags_are_checked_naming_the_flag():
  with pytest.raises(C.ConfigError, match="--site_joins: entry 'a:x'"):
    C.DataConfig(site_joins=("a:x",))
  with pytest.raises(C.ConfigError, match="--scanner_changes: entry"):
    C.DataConfig(scanner_changes=("ct_scanner_a:2",))
  with pytest.raises(C.ConfigError, match="--intensity_drift: .*number"):
    C.DataConfig(intensity_drift=("ct_scanner_a:fast",))
  with pytest.raises(C.ConfigError, match="--num_sites"):
    C.DataConfig(num_sites=100, site_joins=("site00001:2",))
  with pytest.raises(C.ConfigError, match="site-level DP"):
    C.ExperimentConfig(data=C.DataConfig(site_joins=("ct_scanner_a:2",)),
                       privacy=C.PrivacyConfig(unit="site"))

  def build(**flags):
    return scenarios.Scenario.build(dataclasses.replace(C.DataConfig(),
                                                        **flags),
                                    NAMES, MODALITIES, rounds=4)

  with pytest.raises(C.ConfigError, match="unknown site 'nowhere'"):
    build(site_joins=("nowhere:2",))
  with pytest.raises(C.ConfigError, match="past --rounds=4"):
    build(site_leaves=("xray_film:5",))
  with pytest.raises(C.ConfigError, match="is a MRI scanner"):
    build(scanner_changes=("ct_scanner_a:2:mri_t2_3t",))
  with pytest.raises(C.ConfigError, match="leave before"):
    build(site_joins=("xray_film:3",), site_leaves=("xray_film:2",))
  with pytest.raises(C.ConfigError, match="no site is in the federation"):
    scenarios.Scenario.build(
        dataclasses.replace(C.DataConfig(), site_joins=("a:3",),
                            site_leaves=("b:2",)), ("a", "b"), ("CT", "CT"),
        rounds=3)


@pytest.mark.slow
def test_membership_and_data_change_as_configured(tmp_path):
  sim = loop.Simulation(RUN, tmp_path)
  scenario, run = sim.run.data.scenario, sim.run
  k = {name: i for i, name in enumerate(NAMES)}
  np.testing.assert_array_equal(scenario.active[:, k["mri_t1_1p5t"]],
                                [False, False, True, True])
  np.testing.assert_array_equal(scenario.active[:, k["xray_film"]],
                                [True, True, False, False])
  np.testing.assert_array_equal(scenario.active_windows()[k["xray_film"]],
                                [0, 2])
  images = [np.asarray(run.data.training_at(r).examples["image"])
            for r in range(4)]
  labels = [np.asarray(run.data.training_at(r).examples["label"])
            for r in range(4)]
  a, b = k["ct_scanner_a"], k["ct_scanner_b"]
  # ct_scanner_a: the same patients, re-acquired by the low-dose scanner
  # from round 2 (index 1) on.
  assert np.array_equal(images[0][a], run.data.scenario_data["train"].base.image[a])
  assert not np.allclose(images[1][a], images[0][a])
  np.testing.assert_array_equal(images[1][a], images[3][a])
  replaced = run.data.scenario_data["train"].replaced
  np.testing.assert_array_equal(images[1][a], replaced.image[a])
  np.testing.assert_array_equal(labels[1][a], replaced.label[a])
  # ct_scanner_b: x (1 + 0.1 r) + 0.05 r on its real slices; padding 0.
  base = run.data.scenario_data["train"].base.image[b]
  real = run.data.scenario_data["train"].base.mask[b]
  for r in range(4):
    want = base * np.float32(1 + 0.1 * r)
    want[real] += np.float32(0.05 * r)
    np.testing.assert_allclose(images[r][b], want, rtol=1e-6, atol=1e-7)
    assert not images[r][b][~real].any()
  # Every other site sees the same data in every round.
  for s in set(range(len(NAMES))) - {a, b}:
    for r in range(1, 4):
      np.testing.assert_array_equal(images[r][s], images[0][s])
  # A round whose only member is a held-out site is refused.
  idle = dataclasses.replace(
      RUN, data=C.DataConfig(
          image_size=16, num_slices=2, patients_scale=0.0625,
          held_out_sites=("xray_film",),
          site_joins=tuple(f"{n}:2" for n in NAMES if n != "xray_film")))
  with pytest.raises(C.ConfigError, match="no training site is in the "
                     "federation in round 1"):
    loop.Simulation(idle, tmp_path / "idle")
  # Validation follows the sites' data too.
  val = run.data.scenario_data["val"]
  assert not np.allclose(val.at(0).image[a], val.at(1).image[a])


@pytest.mark.slow
def test_a_joining_site_is_never_charged_before_it_joins(tmp_path):
  report = loop.train_and_evaluate(RUN, tmp_path / "run")
  charged = report["privacy"]["plan"]["rounds_trained_per_site"]
  # 0-based rounds: mri_t1_1p5t joins at round 3, xray_film leaves at 3.
  assert charged["mri_t1_1p5t"] == [2, 3]
  assert charged["xray_film"] == [0, 1]
  assert charged["ct_scanner_a"] == [0, 1, 2, 3]
  for row in report["history"]:
    if row["round"] < 3:
      assert "mri_t1_1p5t" not in row["participants"]
      assert row["epsilon"]["mri_t1_1p5t"] == 0.0
    else:
      assert "xray_film" not in row["participants"]
  # Each site's noise is calibrated for its own rounds: every site ends at
  # the target, the two-round sites too (calibrated for four rounds, they
  # would end far below it).
  for site, eps in report["privacy"]["epsilon_per_site"].items():
    assert 0.98 * 8.0 <= eps <= 8.0, (site, eps)
  assert report["privacy"]["verified"]["ok"] is True
  events = {(e["site"], e["round"]): e for e in report["scenario"]["events"]}
  change = events["ct_scanner_a", 2]
  assert change["change"] == "scanner replaced by ct_low_dose"
  assert change["evaluated_rounds"] == [1, 2]
  assert change["val_dice_before"] is not None
  assert report["scenario"]["membership"]["mri_t1_1p5t"] == {
      "first_round": 3, "last_round": 4}
  assert (tmp_path / "run" / "dice_per_site.png").stat().st_size > 0

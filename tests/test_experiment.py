"""Tests for fedjax_seg.experiment: resume, budget stop, non-private runs."""

import dataclasses
import json

import pytest

from fedjax_seg import config as C
from fedjax_seg import experiment

TINY = C.ExperimentConfig(
    data=C.DataConfig(image_size=16, num_slices=2, patients_scale=0.25),
    model=C.ModelConfig(widths=(4,)),
    federated=C.FederatedConfig(rounds=4, local_steps=1, batch_size=4),
    eval_every=2, checkpoint_every=1)


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
  full = experiment.train_and_evaluate(TINY, tmp_path / "full")
  # Site-adaptive noise: every site ends at (just under) the target epsilon.
  for eps in full["privacy"]["epsilon_per_site"].values():
    assert 0.98 * 8.0 <= eps <= 8.0
  killed = dataclasses.replace(TINY, stop_after_rounds=2)
  partial = experiment.train_and_evaluate(killed, tmp_path / "resumed")
  assert partial == {"rounds_completed": 2, "stopped_reason": "interrupted"}
  assert not (tmp_path / "resumed" / experiment.REPORT).exists()
  resumed = experiment.train_and_evaluate(TINY, tmp_path / "resumed")
  assert resumed["final_params_sha256"] == full["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == full["privacy"]["ledger"]
  assert resumed["privacy"]["epsilon_per_site"] == \
      full["privacy"]["epsilon_per_site"]
  assert resumed["metrics"]["dice_per_site"] == full["metrics"]["dice_per_site"]
  # Resuming with other privacy settings is refused.
  other = dataclasses.replace(TINY, privacy=C.PrivacyConfig(
      noise_multiplier=2.0))
  with pytest.raises(C.ConfigError, match="other settings"):
    experiment.train_and_evaluate(other, tmp_path / "resumed")


def test_budget_stop_happens_before_the_round_that_would_exceed(tmp_path):
  fixed_noise = C.PrivacyConfig(target_epsilon=None, noise_multiplier=1.0)
  probe = experiment.train_and_evaluate(
      dataclasses.replace(TINY, privacy=fixed_noise,
                          federated=dataclasses.replace(TINY.federated,
                                                        rounds=2)),
      tmp_path / "probe")
  budget = probe["privacy"]["epsilon_max"] * 1.001  # Room for 2 rounds only.
  config = dataclasses.replace(TINY, privacy=dataclasses.replace(
      fixed_noise, epsilon_budget=budget))
  report = experiment.train_and_evaluate(config, tmp_path / "budget")
  assert report["rounds_completed"] == 2
  assert report["stopped_reason"].startswith("budget: round 3 would take site")
  assert report["privacy"]["epsilon_max"] <= budget
  rows = (tmp_path / "budget" / experiment.ROUNDS_CSV).read_text().splitlines()
  assert len(rows) == 1 + 2


def test_non_private_run_is_marked(tmp_path):
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(enabled=False),
      federated=dataclasses.replace(TINY.federated, rounds=1))
  report = experiment.train_and_evaluate(config, tmp_path / "nodp")
  assert report["privacy"]["enabled"] is False
  assert "NOT PRIVATE" in report["privacy"]["warning"]
  assert report["privacy"]["epsilon_max"] is None
  saved = json.loads((tmp_path / "nodp" / experiment.REPORT).read_text())
  assert saved["privacy"]["enabled"] is False


def test_config_validation_names_the_flag():
  with pytest.raises(C.ConfigError, match="--noise_multiplier"):
    C.PrivacyConfig(noise_multiplier=-0.5)
  with pytest.raises(C.ConfigError, match="--delta"):
    C.PrivacyConfig(delta=1.0)
  with pytest.raises(C.ConfigError, match="--data_dir"):
    C.DataConfig(dataset="msd_liver")
  with pytest.raises(C.ConfigError, match="--norm"):
    C.ModelConfig(norm="batch")
  with pytest.raises(C.ConfigError, match="--backend"):
    C.PerformanceConfig(backend="gpu")


def test_unet3d_on_patient_volumes(tmp_path):
  config = dataclasses.replace(
      TINY, data=C.DataConfig(image_size=16, num_slices=4,
                              patients_scale=0.25, volumes=True),
      federated=dataclasses.replace(TINY.federated, rounds=1, batch_size=2))
  report = experiment.train_and_evaluate(config, tmp_path / "3d")
  assert report["rounds_completed"] == 1
  dice = report["metrics"]["dice_per_modality"]
  assert dice["XRAY"] is None  # X-ray projections are 2D: no volumes.
  assert 0.0 <= dice["CT"] <= 1.0 and 0.0 <= dice["MRI"] <= 1.0
  assert 0 < report["privacy"]["epsilon_max"] <= 8.0
  with pytest.raises(C.ConfigError, match="--volumes"):
    C.DataConfig(dataset="msd_liver", data_dir="/x", volumes=True)


@pytest.mark.parametrize("mode", ["geometric", "percentile"])
def test_adaptive_clipping_with_site_adaptive_noise(tmp_path, mode):
  """Every site's (gradient, count) pair is accounted at its target sigma."""
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(adaptive_clipping=mode, l2_clip_norm=0.1),
      federated=dataclasses.replace(TINY.federated, rounds=2))
  report = experiment.train_and_evaluate(config, tmp_path / mode)
  sigmas = report["privacy"]["noise_multiplier_per_site"].values()
  assert max(sigmas) > 1.2 * min(sigmas)  # Heterogeneous sites.
  for eps in report["privacy"]["epsilon_per_site"].values():
    assert 0.98 * 8.0 <= eps <= 8.0

"""Tests for the run loop (fedjax_seg.run.loop and its setup, state and
report): resume, budget stop, non-private runs."""

import dataclasses
import json

import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import artifacts
from fedjax_seg.run import loop
from fedjax_seg.run import report as report_lib
from fedjax_seg.run import setup as setup_lib
from fedjax_seg.run import state as state_lib
from fedjax_seg import privacy
from tests.run import tiny

TINY = tiny.config(rounds=4, eval_every=2, checkpoint_every=1, noise_seed=0)


TIMING = {"wall_seconds", "device_seconds", "host_seconds",
          "evaluation_seconds"}


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_identical(tmp_path):
  full = loop.train_and_evaluate(TINY, tmp_path / "full")
  # Site-adaptive noise: every site ends at (just under) the target epsilon.
  for eps in full["privacy"]["epsilon_per_site"].values():
    assert 0.98 * 8.0 <= eps <= 8.0
  killed = dataclasses.replace(TINY, stop_after_rounds=2)
  partial = loop.train_and_evaluate(killed, tmp_path / "resumed")
  assert partial == {"rounds_completed": 2, "stopped_reason": "interrupted"}
  assert not (tmp_path / "resumed" / artifacts.REPORT).exists()
  resumed = loop.train_and_evaluate(TINY, tmp_path / "resumed")
  assert resumed["final_params_sha256"] == full["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == full["privacy"]["ledger"]
  assert resumed["privacy"]["epsilon_per_site"] == \
      full["privacy"]["epsilon_per_site"]
  assert resumed["metrics"]["dice_per_site"] == full["metrics"]["dice_per_site"]
  # Resuming with other privacy settings is refused.
  other = dataclasses.replace(TINY, privacy=C.PrivacyConfig(
      noise_multiplier=2.0))
  with pytest.raises(C.ConfigError, match="other settings"):
    loop.train_and_evaluate(other, tmp_path / "resumed")
  # So is --rounds when the calibration (hence every round's sigma) depends
  # on it: the resumed run would end above the target epsilon.
  longer = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, rounds=6))
  with pytest.raises(C.ConfigError, match="--rounds"):
    loop.train_and_evaluate(longer, tmp_path / "resumed")
  shorter = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, rounds=1))
  with pytest.raises(C.ConfigError, match="--rounds=1: the checkpoint"):
    loop.train_and_evaluate(shorter, tmp_path / "resumed")
  # Diagnostics written by an earlier part of a resumed run stay marked.
  assert not report_lib.diagnostics_released(TINY, full["history"])
  marked = full["history"] + [{report_lib.NOT_COVERED_KEY: {}}]
  assert report_lib.diagnostics_released(TINY, marked)
  # Every output holds only covered, public or held-out values by default.
  rows = (tmp_path / "full" / artifacts.ROUNDS_CSV).read_text()
  assert "loss" not in rows and "clipped_fraction" not in rows
  assert rows.splitlines()[0].count("epsilon_per_patient_") == 8
  for row in full["history"]:
    assert set(row) <= {"round", "epsilon", "sigma", "clip",
                        "participants", "val_dice_mean"} | TIMING
    assert row["wall_seconds"] >= row["device_seconds"] + row[
        "evaluation_seconds"]
  assert rows.splitlines()[0].startswith(
      "round,wall_seconds,device_seconds,host_seconds,evaluation_seconds,")
  assumptions = full["privacy"]["assumptions"]
  assert assumptions["unit"] == "patient" and "seed" in assumptions["secret"]
  assert any("held-out" in s for s in assumptions["not_covered"])
  assert "twice epsilon" in assumptions["site_sizes"]
  assert full["privacy"]["verified"]["ok"] is True


@pytest.mark.slow
def test_budget_stop_happens_before_the_round_that_would_exceed(tmp_path):
  fixed_noise = C.PrivacyConfig(target_epsilon=None, noise_multiplier=1.0)
  probe = loop.train_and_evaluate(
      dataclasses.replace(TINY, privacy=fixed_noise,
                          federated=dataclasses.replace(TINY.federated,
                                                        rounds=2)),
      tmp_path / "probe")
  budget = probe["privacy"]["epsilon_max"] * 1.001  # Room for 2 rounds only.
  config = dataclasses.replace(TINY, privacy=dataclasses.replace(
      fixed_noise, epsilon_budget=budget))
  report = loop.train_and_evaluate(config, tmp_path / "budget")
  assert report["rounds_completed"] == 2
  assert report["stopped_reason"].startswith("budget: round 3 would take site")
  assert report["privacy"]["epsilon_max"] <= budget
  rows = (tmp_path / "budget" / artifacts.ROUNDS_CSV).read_text().splitlines()
  assert len(rows) == 1 + 2
  # With a fixed sigma and a constant schedule the planned noise of the done
  # rounds does not depend on --rounds: a finished run can be extended, and
  # the resumed run continues the same ledger.
  more = loop.train_and_evaluate(
      dataclasses.replace(TINY, privacy=fixed_noise,
                          federated=dataclasses.replace(TINY.federated,
                                                        rounds=3)),
      tmp_path / "probe")
  assert more["rounds_completed"] == 3 and more["privacy"]["verified"]["ok"]
  for site, entry in more["privacy"]["ledger"]["sites"].items():
    assert len(entry["events"]) == 3
    assert entry["events"][:2] == probe["privacy"]["ledger"]["sites"][site][
        "events"]
  assert more["privacy"]["epsilon_max"] > probe["privacy"]["epsilon_max"]


def _site_level_event_epsilon(z, q, rounds):
  ledger = privacy.PrivacyLedger(["s"], delta=1e-5, unit="site")
  ledger.record("s", float(np.float32(z)), q, 1)
  for _ in range(rounds - 1):
    ledger.record("s", float(np.float32(z)), q, 1)
  return ledger.epsilon("s")


@pytest.mark.slow
def test_site_level_budget_stop_checks_every_site_it_charges(tmp_path):
  """Under site-level DP every site is charged every round, sampled or not:
  the issue's reproduction ends at epsilon 0 (round 1 alone would cost 4.59),
  not 4.59 for every site."""
  config = dataclasses.replace(TINY, privacy=C.PrivacyConfig(
      unit="site", site_sampling_rate=0.3, site_noise_multiplier=0.8,
      epsilon_budget=2.0), federated=dataclasses.replace(TINY.federated,
                                                         rounds=3))
  report = loop.train_and_evaluate(config, tmp_path / "repro")
  assert report["rounds_completed"] == 0
  assert "site-level epsilon per site" in report["stopped_reason"]
  assert all(e <= 2.0 for e in report["privacy"]["epsilon_per_site"].values())


@pytest.mark.slow
def test_record_and_site_level_budgets_are_both_checked(tmp_path):
  """With both mechanisms, the tighter ledger stops the run; the record-level
  ledger charges every training site every round (the sampled set of sites
  must stay hidden), and nothing written names the sampled sites."""
  one, two = (_site_level_event_epsilon(2.0, 0.5, r) for r in (1, 2))
  config = dataclasses.replace(TINY, privacy=C.PrivacyConfig(
      target_epsilon=None, noise_multiplier=20.0, site_level=True,
      site_sampling_rate=0.5, site_noise_multiplier=2.0,
      epsilon_budget=(one + two) / 2), federated=dataclasses.replace(
          TINY.federated, rounds=3))
  report = loop.train_and_evaluate(config, tmp_path / "both")
  assert report["rounds_completed"] == 1
  assert "site-level" in report["stopped_reason"]
  privacy_section = report["privacy"]
  assert privacy_section["site_level"]["epsilon_max"] == pytest.approx(one)
  for entry in privacy_section["ledger"]["sites"].values():
    assert len(entry["events"]) == 1
  assert privacy_section["verified"]["ok"], privacy_section["verified"]
  assert all("participants" not in row for row in report["history"])
  header = (tmp_path / "both" / artifacts.ROUNDS_CSV).read_text().split(
      "\n")[0]
  assert "sites_trained" not in header


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["geometric"])
def test_site_level_adaptive_clipping_is_wired_and_accounted(tmp_path, mode):
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(unit="site", adaptive_clipping=mode,
                                    site_clip_norm=0.05,
                                    site_noise_multiplier=1.5,
                                    site_sampling_rate=0.75),
      federated=dataclasses.replace(TINY.federated, rounds=2),
      release_training_diagnostics=True)
  report = loop.train_and_evaluate(config, tmp_path / "adaptive")
  clips = [row["site_level_clip"] for row in report["history"]]
  assert clips[0] == pytest.approx(0.05) and clips[1] != clips[0]
  # The (update, count) pair is accounted at the site noise multiplier.
  event = report["privacy"]["ledger"]["sites"]["ct_scanner_a"]["events"][0]
  z = event["event"]["event"]["noise_multiplier"]
  assert z == pytest.approx(1.5, rel=1e-5)
  assert report["privacy"]["verified"]["ok"]
  # The diagnostics are there, and marked, only because the flag asks.
  assert "NOT COVERED" in report["training_diagnostics"]["warning"]
  row = report["history"][0]
  assert "participants" not in row
  assert {"train_loss", "participants"} <= set(
      row[report_lib.NOT_COVERED_KEY])
  header = (tmp_path / "adaptive" / artifacts.ROUNDS_CSV).read_text().split(
      "\n")[0]
  assert "train_loss [NOT COVERED BY THE GUARANTEE]" in header
  with pytest.raises(C.ConfigError, match="--adaptive_clipping"):
    C.PrivacyConfig(site_level=True, adaptive_clipping=mode)


@pytest.mark.slow
def test_non_private_run_is_marked(tmp_path):
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(enabled=False),
      federated=dataclasses.replace(TINY.federated, rounds=1))
  report = loop.train_and_evaluate(config, tmp_path / "nodp")
  assert report["privacy"]["enabled"] is False
  assert "NOT PRIVATE" in report["privacy"]["warning"]
  assert report["privacy"]["epsilon_max"] is None
  saved = json.loads((tmp_path / "nodp" / artifacts.REPORT).read_text())
  assert saved["privacy"]["enabled"] is False


@pytest.mark.slow
def test_a_batch_larger_than_every_site_is_refused_before_writing(tmp_path):
  config = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, batch_size=1000))
  with pytest.raises(C.ConfigError, match="--batch_size=1000"):
    loop.train_and_evaluate(config, tmp_path / "big")
  assert not (tmp_path / "big").exists()


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
  with pytest.raises(C.ConfigError, match="--algorithm"):
    C.ExperimentConfig(privacy=C.PrivacyConfig(unit="site"),
                       federated=C.FederatedConfig(algorithm="fedbn"))
  with pytest.raises(C.ConfigError, match="--site_noise_multiplier"):
    C.PrivacyConfig(unit="site", adaptive_clipping="geometric",
                    site_noise_multiplier=0.0)


@pytest.mark.slow
def test_unet3d_on_patient_volumes(tmp_path):
  config = dataclasses.replace(
      TINY, data=C.DataConfig(image_size=16, num_slices=4,
                              patients_scale=0.0625, volumes=True),
      federated=dataclasses.replace(TINY.federated, rounds=1, batch_size=2))
  report = loop.train_and_evaluate(config, tmp_path / "3d")
  assert report["rounds_completed"] == 1
  dice = report["metrics"]["dice_per_modality"]
  assert dice["XRAY"] is None  # X-ray projections are 2D: no volumes.
  assert 0.0 <= dice["CT"] <= 1.0 and 0.0 <= dice["MRI"] <= 1.0
  assert 0 < report["privacy"]["epsilon_max"] <= 8.0
  with pytest.raises(C.ConfigError, match="--volumes"):
    C.DataConfig(dataset="msd_liver", data_dir="/x", volumes=True)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["geometric", "percentile"])
def test_adaptive_clipping_with_site_adaptive_noise(tmp_path, mode):
  """Every site's (gradient, count) pair is accounted at its target sigma."""
  config = dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(adaptive_clipping=mode, l2_clip_norm=0.1),
      federated=dataclasses.replace(TINY.federated, rounds=2))
  report = loop.train_and_evaluate(config, tmp_path / mode)
  sigmas = report["privacy"]["noise_multiplier_per_site"].values()
  assert max(sigmas) > 1.2 * min(sigmas)  # Heterogeneous sites.
  for eps in report["privacy"]["epsilon_per_site"].values():
    assert 0.98 * 8.0 <= eps <= 8.0


def _levers(**federated):
  """TINY with fixed noise (no calibration), so that round 1 is the same
  whatever the number of rounds."""
  return dataclasses.replace(
      TINY, privacy=C.PrivacyConfig(target_epsilon=None, noise_multiplier=1.0),
      federated=dataclasses.replace(TINY.federated, **federated))


@pytest.mark.slow
def test_ema_is_the_debiased_average_of_the_released_models_and_resumes(
    tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  one = loop.Simulation(_levers(rounds=1), tmp_path / "one")
  part = one.begin_round()
  one.end_round(part, *one.run_round(part))
  p1 = one.state.server_state.params
  ema = _levers(rounds=2, ema_decay=0.5)
  killed = dataclasses.replace(ema, stop_after_rounds=1)
  assert loop.train_and_evaluate(killed, tmp_path / "ema")[
      "stopped_reason"] == "interrupted"
  report = loop.train_and_evaluate(ema, tmp_path / "ema")  # resumed
  assert "EMA" in report["metrics"]["evaluated_model"]
  sim = loop.Simulation(ema, tmp_path / "ema")
  p2 = sim.state.server_state.params
  # Zeros, then 0.5 p1, then 0.25 p1 + 0.5 p2, debiased by 1 - 0.5^2.
  want = jax.tree.map(lambda a, b: (a + 2 * b) / 3, p1, p2)
  got = state_lib.evaluated_params(ema, sim.state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert report["evaluated_params_sha256"] == artifacts.params_digest(got)
  assert report["final_params_sha256"] == artifacts.params_digest(p2)
  assert report["final_params_sha256"] != report["evaluated_params_sha256"]


@pytest.mark.slow
def test_augmult_with_no_transform_is_the_plain_run_and_costs_no_epsilon(
    tmp_path):
  import jax  # pylint: disable=g-import-not-at-top

  def one_round(name, **federated):
    sim = loop.Simulation(_levers(rounds=1, **federated),
                                tmp_path / name)
    part = sim.begin_round()
    sim.end_round(part, *sim.run_round(part))
    return sim.state

  plain = one_round("plain")
  same = one_round("same", augmult=1, augmentations=())
  for a, b in zip(jax.tree.leaves(same.server_state.params),
                  jax.tree.leaves(plain.server_state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  augmented = one_round("augmented", augmult=2)
  assert augmented.ledger.to_dict() == plain.ledger.to_dict()
  assert artifacts.params_digest(augmented.server_state.params) != \
      artifacts.params_digest(plain.server_state.params)
  with pytest.raises(C.ConfigError, match="augmult"):
    dataclasses.replace(_levers(augmult=2), data=C.DataConfig(volumes=True))


def test_a_checkpoint_from_before_a_new_field_compares_with_its_value_then():
  stored = TINY.to_dict()
  for field in ("augmult", "augmentations", "augment_by_modality",
                "ema_decay"):
    del stored["federated"][field]
  assert state_lib.comparable(stored) == state_lib.comparable(
      TINY.to_dict())
  changed = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, ema_decay=0.5))
  assert state_lib.comparable(stored) != state_lib.comparable(
      changed.to_dict())
  # A checkpoint from before --ema_decay ran without EMA, whatever today's
  # default is.
  today = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, ema_decay=C.FederatedConfig().ema_decay))
  assert today.federated.ema_decay != 0
  assert state_lib.comparable(stored) != state_lib.comparable(
      today.to_dict())


@pytest.mark.slow
def test_init_from_a_public_run_and_refusing_a_private_one(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  # Other patients of the built-in generator (another data seed): public.
  pretrain = dataclasses.replace(_levers(rounds=1), privacy=C.PrivacyConfig(
      enabled=False), data=dataclasses.replace(TINY.data, data_seed=1))
  loop.train_and_evaluate(pretrain, tmp_path / "public")
  source = loop.Simulation(pretrain, tmp_path / "public")
  tuned = dataclasses.replace(_levers(rounds=1), model=dataclasses.replace(
      TINY.model, init_from=str(tmp_path / "public")))
  sim = loop.Simulation(tuned, tmp_path / "tuned")
  for a, b in zip(jax.tree.leaves(sim.initial_params),
                  jax.tree.leaves(source.state.server_state.params)):
    np.testing.assert_array_equal(a, b)
  assumptions = report_lib.assumptions(tuned, sim.run.plan, False)
  assert any("initial model" in line and "without DP" in line
             for line in assumptions["public"])
  # A non-private run on a prepared dataset is not public: refused, unless
  # stated public.
  private = tmp_path / "private"
  private.mkdir()
  report = {"config": dataclasses.replace(
      pretrain, data=C.DataConfig(dataset="hospital_scans",
                                  data_dir=str(tmp_path))).to_dict(),
            "rounds_completed": 1}
  (private / artifacts.REPORT).write_text(json.dumps(report))
  refused = dataclasses.replace(tuned, model=dataclasses.replace(
      TINY.model, init_from=str(private)))
  with pytest.raises(C.ConfigError, match="init_from_public"):
    loop.Simulation(refused, tmp_path / "refused")
  with pytest.raises(C.ConfigError, match="no report.json"):
    loop.Simulation(dataclasses.replace(tuned, model=dataclasses.replace(
        TINY.model, init_from=str(tmp_path / "nothing"))), tmp_path / "x")


@pytest.mark.slow
def test_trainable_groups_only_train_and_clip_those(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_seg import models  # pylint: disable=g-import-not-at-top
  from fedjax_seg.segmentation import task as segmentation_task  # pylint: disable=g-import-not-at-top
  from fedjax_seg.federated import client as client_lib  # pylint: disable=g-import-not-at-top
  config = dataclasses.replace(_levers(rounds=1), model=dataclasses.replace(
      TINY.model, trainable=("head", "norm")))
  sim = loop.Simulation(config, tmp_path / "run")
  part = sim.begin_round()
  sim.end_round(part, *sim.run_round(part))
  mask = models.trainable_mask(sim.initial_params, ("head", "norm"))
  moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)),
                       sim.state.server_state.params, sim.initial_params)
  assert jax.tree.leaves(moved) == jax.tree.leaves(mask)
  assert any(jax.tree.leaves(mask)) and not all(jax.tree.leaves(mask))
  # The clipped per-unit gradient lives on the trained leaves only: all of
  # C goes to them, the frozen ones get exactly 0.
  loss = client_lib._frozen_outside(
      segmentation_task.example_loss(sim.run.model), mask)
  batch = jax.tree.map(lambda x: x[0, :2], {
      "image": sim.run.data.test.image, "label": sim.run.data.test.label})
  clipped, stats = jax.jit(privacy.clipped_grad(loss, l2_clip_norm=1e-4))(
      sim.initial_params, batch)
  assert int(stats.num_clipped) == 2
  for m, g in zip(jax.tree.leaves(mask), jax.tree.leaves(clipped)):
    if not m:
      assert not np.any(np.asarray(g))
  with pytest.raises(C.ConfigError, match="trainable"):
    C.ModelConfig(trainable=("bottleneck",))


@pytest.mark.slow
@pytest.mark.parametrize("unit,trainable", [("patient", ()),
                                            ("example", ("decoder", "head"))])
def test_layer_per_example_gradients_give_the_vmap_run(tmp_path, unit,
                                                       trainable):
  base = dataclasses.replace(
      TINY, model=C.ModelConfig(widths=(4, 4), trainable=trainable),
      privacy=C.PrivacyConfig(unit=unit),
      federated=dataclasses.replace(TINY.federated, rounds=1),
      eval_every=1, checkpoint_every=1)
  runs = {}
  # Ghost norms clip single slices: the example unit only.
  hows = ("vmap", "layers") + (("ghost",) if unit == "example" else ())
  for how in hows:
    config = dataclasses.replace(base, performance=C.PerformanceConfig(
        per_example_grads=how))
    runs[how] = loop.train_and_evaluate(config, tmp_path / how)
  _same_run(runs)


def _same_run(runs: dict) -> None:
  vmap = runs["vmap"]
  for how, other in runs.items():
    # A performance flag: the ledger and every epsilon are the same ...
    assert other["privacy"]["ledger"] == vmap["privacy"]["ledger"], how
    assert other["privacy"]["epsilon_per_site"] == \
        vmap["privacy"]["epsilon_per_site"], how
    # ... and the model the same up to float rounding of the gradients.
    got = other["metrics"]["dice_per_site"]
    for site, dice in vmap["metrics"]["dice_per_site"].items():
      np.testing.assert_allclose(np.array(got[site], float),
                                 np.array(dice, float), atol=1e-3,
                                 err_msg=f"{how} {site}")


@pytest.mark.slow
def test_ghost_norms_give_the_vmap_run(tmp_path):
  # Widths 4, 8, 64 at 16x16: the 4x4 level's 8->64 and 64->64
  # convolutions take ghost norms (layer_gradients.ghost_is_cheaper).
  from fedjax_seg.privacy import layer_gradients  # pylint: disable=g-import-not-at-top
  assert layer_gradients.ghost_is_cheaper(16, 8 * 9, 64)
  assert not layer_gradients.ghost_is_cheaper(16 * 16, 9, 4)
  base = dataclasses.replace(
      TINY, model=C.ModelConfig(widths=(4, 8, 64)),
      privacy=C.PrivacyConfig(unit="example"),
      federated=dataclasses.replace(TINY.federated, rounds=1),
      eval_every=1, checkpoint_every=1)
  _same_run({how: loop.train_and_evaluate(
      dataclasses.replace(base, performance=C.PerformanceConfig(
          per_example_grads=how)), tmp_path / how)
             for how in ("vmap", "ghost")})
  # The engine's rule, checked once (at setup, before anything is written).
  patients = dataclasses.replace(base, privacy=C.PrivacyConfig(unit="patient"),
                                 performance=C.PerformanceConfig(
                                     per_example_grads="ghost"))
  with pytest.raises(C.ConfigError, match="--per_example_grads='ghost' clips "
                                          "single slices"):
    loop.Simulation(patients, tmp_path / "patients")
  assert not (tmp_path / "patients").exists()


@pytest.mark.slow
def test_per_example_gradient_paths_are_refused_where_they_do_not_apply(
    tmp_path):
  # With augmentation multiplicity a unit's loss averages its copies: the
  # task offers no layer-wise path. Without chunks there is none either.
  # The engine refuses at setup, naming the flag, before anything is
  # written.
  for name, config in (
      ("augmult", dataclasses.replace(
          TINY, federated=dataclasses.replace(TINY.federated, augmult=2),
          performance=C.PerformanceConfig(per_example_grads="layers"))),
      ("chunks", dataclasses.replace(
          TINY, performance=C.PerformanceConfig(per_example_grads="layers",
                                                chunk_size=None)))):
    with pytest.raises(C.ConfigError, match="--per_example_grads"):
      loop.Simulation(config, tmp_path / name)
    assert not (tmp_path / name).exists()


def test_chunk_size_zero_is_picked_by_image_size():
  # On CPU (the tests' platform): 4 slices per chunk, 2 for large slices.
  assert setup_lib.resolve_chunk_size(0, (32, 32)) == 4
  assert setup_lib.resolve_chunk_size(0, (64, 64)) == 4
  assert setup_lib.resolve_chunk_size(0, (128, 128)) == 2
  assert setup_lib.resolve_chunk_size(0, (8, 32, 32)) == 4  # 3D volumes.
  assert setup_lib.resolve_chunk_size(3, (128, 128)) == 3
  assert setup_lib.resolve_chunk_size(None, (128, 128)) is None
  assert C.PerformanceConfig().chunk_size == 0
  with pytest.raises(C.ConfigError, match="--chunk_size"):
    C.PerformanceConfig(chunk_size=-1)

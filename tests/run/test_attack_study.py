"""The attack study over a real (tiny) run: targets are held-out slices,
keys are fresh, sigma and epsilon are the run's."""

import itertools

import jax
import numpy as np
import pytest

from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_flags
from fedjax_seg.run import data as data_lib
from fedjax_seg.run import loop
from fedjax_seg import privacy
from fedjax_seg.attacks import gradient_inversion
from fedjax_seg.run import attack_study as study
from fedjax_seg.data import sites as sites_lib

TINY = dict(image_size=16, num_slices=2, patients_scale=0.0625, widths=(4,),
            rounds=2, local_steps=1, batch_size=4, eval_every=2,
            target_epsilon="none", noise_multiplier=1.5)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The same tiny run at unit patient and at unit example."""
  out = {}
  for unit in ("patient", "example"):
    config = config_flags.config_from_values(dict(TINY, unit=unit))
    workdir = tmp_path_factory.mktemp(unit)
    out[unit] = (config, workdir,
                 loop.train_and_evaluate(config, workdir))
  return out


@pytest.mark.slow
def test_study_attacks_held_out_slices_at_the_runs_noise(runs):
  config, workdir, report = runs["patient"]
  splits = data_lib.load(config.data, config.data_seed)
  train = sites_lib.stack_sites(splits["train"])
  sim = loop.Simulation(config, workdir, splits=splits)
  sites = ("ct_scanner_a", "mri_t1_1p5t")  # 2 and 1 test patients
  study_config = study.StudyConfig(
      sites=sites, targets=2, batch_sizes=(2,),
      inversion=gradient_inversion.InversionConfig(
          iterations=3, restarts=1))
  results, images = study.run_study(sim, study_config, train)
  entries = results["attacks"]
  assert len(entries) == 2 * 2 * 3  # sites x rounds x settings
  names = list(sim.run.plan.site_names)
  assert results["study"]["data_range_per_site"] == {
      "ct_scanner_a": (0.0, 1.0), "mri_t1_1p5t": study.Z_SCORED_RANGE}
  for e in entries:
    site = e["site"]
    assert len(e["targets"]) == (2 if site == "ct_scanner_a" else 1)
    assert all(len(t["ssim"]) == e["batch_size"] for t in e["targets"])
    assert -1 <= e["ssim"]["min"] <= e["ssim"]["mean"] <= e["ssim"]["max"]
    if e["setting"] == "nodp":
      assert e["epsilon"] is None and e["noise_multiplier"] == 0.0
      continue
    r = e["round_index"]
    assert r == (0 if e["round"] == "first" else 1)
    # The run's sigma and clip norm of that round and site.
    assert e["noise_multiplier"] == pytest.approx(
        report["history"][r]["sigma"][site])
    assert e["l2_clip_norm"] == config.privacy.l2_clip_norm
  # Epsilon of each DP setting: the run's own unit is the report's figure;
  # the other unit is what the same run at that unit reports.
  example_report = runs["example"][2]
  for site in sites:
    eps = {e["setting"]: e["epsilon"] for e in entries
           if e["epsilon"] and e["site"] == site}
    assert eps["patient"] == report["privacy"]["epsilon_per_site"][site]
    assert eps["example"] == pytest.approx(
        example_report["privacy"]["epsilon_per_site"][site], rel=1e-9)
  # Targets are held-out test slices: the images shown are test images,
  # none of them a training image.
  test = sim.run.data.test
  for (name, batch_size), grid in images.items():
    k = names.index(name)
    targets = results["targets"][name][str(batch_size)]
    for target in targets:
      p = target["test_patient"]
      assert int(test.group_mask[k, p].sum()) >= batch_size
    assert grid["true"].shape == (len(targets) * batch_size, 16, 16, 1)
    train_images = train.image[k][train.mask[k]]
    for image in grid["true"]:
      assert not any(np.array_equal(image, t) for t in train_images)
    assert {c for c in grid if c != "true"} == set(
        itertools.product(study.ROUNDS, ("nodp", "example", "patient")))
  paths = study.write_grids(workdir, results, images)
  assert sorted(p.name for p in paths) == [
      "attack_ct_scanner_a_b2.png", "attack_mri_t1_1p5t_b2.png"]
  assert all(p.stat().st_size > 0 for p in paths)


def test_attack_keys_are_distinct_and_not_training_keys():
  root = jax.random.key(0)
  keys = set()
  grid = itertools.product(range(3), study.ROUNDS, range(3), range(3),
                           (1, 4), ("nodp", "example", "patient"))
  for r, label, site, target, b, setting in grid:
    for key in study.attack_keys(root, round_index=r, round_label=label,
                                 site=site, target=target, batch_size=b,
                                 setting=setting):
      keys.add(tuple(np.asarray(jax.random.key_data(key)).ravel()))
  assert len(keys) == 3 * 2 * 3 * 3 * 2 * 3 * 2
  training = {tuple(np.asarray(jax.random.key_data(privacy.derive_key(
      root, round_index=r, site=s, step=t, purpose=p))).ravel())
              for r, s, t, p in itertools.product(range(3), range(3),
                                                  range(3), privacy.Purpose)}
  assert not keys & training


def test_targets_are_the_most_foreground_windows():
  config = config_flags.config_from_values(dict(TINY, num_slices=6))
  test = sites_lib.stack_sites(
      data_lib.load(config.data, config.data_seed)["test"])
  targets = study.select_targets(test, 0, 3, 10)
  assert 1 <= len(targets) <= int(test.num_patients[0])
  fg = lambda t: int((test.label[0, list(t.positions)] > 0).sum())
  counts = [fg(t) for t in targets]
  assert counts == sorted(counts, reverse=True)
  for t in targets:
    assert np.all(np.diff(t.slice_index) == 1)  # consecutive slices
    assert np.all(test.patient[0, list(t.positions)]
                  == test.patient[0, t.positions[0]])
  with pytest.raises(config_lib.ConfigError, match="attack_settings"):
    study.StudyConfig(settings=("record",))

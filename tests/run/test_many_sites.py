"""Tests for fedjax_seg.run.many_sites: runs over a consortium (--num_sites)."""

import csv
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import artifacts
from fedjax_seg.run import loop
from fedjax_seg.run import many_sites
from fedjax_seg.run import plots
from fedjax_seg.data import consortium as consortium_lib

SITES = 80  # More than PER_SITE_OUTPUTS_MAX: distributions, sites.csv.
CONSORTIUM = C.ExperimentConfig(
    data=C.DataConfig(image_size=16, num_slices=2, patients_scale=0.25,
                      num_sites=SITES, eval_sites=4, test_sites=6),
    model=C.ModelConfig(widths=(4,)),
    federated=C.FederatedConfig(rounds=3, local_steps=1, batch_size=2,
                                learning_rate=0.5, ema_decay=0.0,
                                sites_per_round=3),
    eval_every=3, checkpoint_every=3, noise_seed=0)


@pytest.mark.slow
def test_a_consortium_run_trains_and_charges_only_its_cohorts(tmp_path):
  report = loop.train_and_evaluate(CONSORTIUM, tmp_path)
  privacy = report["privacy"]
  assert privacy["verified"]["ok"] is True
  eps = privacy["epsilon_per_site"]
  assert len(eps) == SITES
  trained = set()
  for row in report["history"]:
    assert len(row["participants"]) == 3
    # Per-site values only for the round's cohort; the distribution for all.
    assert set(row["epsilon"]) == set(row["participants"])
    assert row["epsilon_max"] >= max(row["epsilon"].values()) > 0
    trained |= set(row["participants"])
  charged = {s for s, r in privacy["plan"]["rounds_trained_per_site"].items()
             if r}
  assert charged == trained
  assert all(eps[s] > 0 for s in trained)
  assert all(eps[s] == 0 for s in set(eps) - trained)
  assert report["history"][-1]["epsilon_max"] == max(eps.values())
  # Evaluation: the fixed validation sample, and the test sample.
  assert len(report["metrics"]["validation_history"][0]["dice_per_site"]) == 4
  assert len(report["metrics"]["dice_per_site"]) == 6
  assert report["metrics"]["sites_evaluated"].startswith("6 of 80 sites")
  summary = report["sites_summary"]
  assert summary["num_sites"] == SITES
  assert summary["sites_charged"] == len(trained)
  assert summary["epsilon"]["count"] == SITES
  assert sum(summary["epsilon"]["counts"]) == SITES
  assert summary["epsilon_charged_sites"]["count"] == len(trained)
  assert summary["epsilon_charged_sites"]["max"] == max(eps.values())
  # Readable at any N: no per-site columns, one row per site in sites.csv.
  header = (tmp_path / artifacts.ROUNDS_CSV).read_text().splitlines()[0]
  assert "epsilon_per_patient_max" in header and "site00" not in header
  rows = list(csv.DictReader(io.StringIO(
      (tmp_path / artifacts.SITES_CSV).read_text())))
  assert len(rows) == SITES
  by_name = {r["site"]: r for r in rows}
  for s in eps:
    assert float(by_name[s]["epsilon_per_patient"]) == pytest.approx(eps[s])
  for name in plots.PLOTS:
    assert (tmp_path / name).stat().st_size > 0


@pytest.mark.slow
def test_a_resumed_consortium_run_continues_the_same_run(tmp_path):
  # Few sites: per-site outputs, over the validation and test samples.
  small = dataclasses.replace(
      CONSORTIUM, data=dataclasses.replace(CONSORTIUM.data, num_sites=6,
                                           eval_sites=2, test_sites=3),
      federated=dataclasses.replace(CONSORTIUM.federated, rounds=2,
                                    sites_per_round=2),
      eval_every=1, checkpoint_every=1)
  full = loop.train_and_evaluate(small, tmp_path / "full")
  killed = dataclasses.replace(small, stop_after_rounds=1)
  loop.train_and_evaluate(killed, tmp_path / "resumed")
  resumed = loop.train_and_evaluate(small, tmp_path / "resumed")
  assert resumed["final_params_sha256"] == full["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == full["privacy"]["ledger"]
  assert resumed["privacy"]["verified"]["ok"] is True
  assert "sites_summary" not in full
  assert len(full["metrics"]["dice_per_site"]) == 3
  header = (tmp_path / "full" / artifacts.ROUNDS_CSV).read_text()
  assert header.count("epsilon_per_patient_site0") == 6
  for name in plots.PLOTS:
    assert (tmp_path / "full" / name).stat().st_size > 0


@pytest.mark.slow
def test_site_level_dp_over_a_consortium_hides_the_cohorts(tmp_path):
  # Record- and site-level DP over 80 sites, Poisson-sampled: every training
  # site is charged every round, and no output names the sampled sites.
  config = dataclasses.replace(
      CONSORTIUM,
      privacy=C.PrivacyConfig(site_level=True, site_noise_multiplier=1.0,
                              site_sampling_rate=0.05),
      federated=dataclasses.replace(CONSORTIUM.federated, rounds=2,
                                    sites_per_round=0),
      eval_every=2, checkpoint_every=2)
  report = loop.train_and_evaluate(config, tmp_path)
  assert report["privacy"]["verified"]["ok"] is True
  assert report["privacy"]["site_level"]["epsilon_max"] > 0
  for row in report["history"]:
    assert "participants" not in row and row["epsilon"] == {}
    assert row["sigma_max"] > 0
  summary = report["sites_summary"]
  assert summary["sites_charged"] == SITES
  assert summary["rounds_charged"]["min"] == 2
  assert "participants" not in (tmp_path / artifacts.ROUNDS_CSV).read_text()


def test_cohort_slots():
  assert many_sites.cohort_slots(100, 10, None) == 10
  assert many_sites.cohort_slots(6, 10, None) == 6
  assert many_sites.cohort_slots(20, 0, None) == 20
  # Poisson: a multiple of 8 above the mean, fixed by (N, q) alone.
  slots = many_sites.cohort_slots(10_000, 0, 0.001)
  assert slots % 8 == 0 and slots >= 10 + 6 * np.sqrt(10)
  with pytest.raises(C.ConfigError, match="--sites_per_round"):
    many_sites.cohort_slots(100, 0, None)


def test_validation_and_test_samples_are_fixed_and_seeded():
  a = many_sites.eval_sample(1000, 32, seed=0)
  np.testing.assert_array_equal(a, many_sites.eval_sample(1000, 32, seed=0))
  assert len(set(a.tolist())) == 32 and np.all(np.diff(a) > 0)
  assert not np.array_equal(a, many_sites.eval_sample(1000, 32, seed=1))
  assert not np.array_equal(a, many_sites.test_sample(1000, 32, seed=0))
  np.testing.assert_array_equal(many_sites.test_sample(20, 1000, seed=0),
                                np.arange(20))


def test_cohort_inputs_have_fixed_shapes_and_scatter_back():
  consortium = consortium_lib.Consortium(num_sites=30, image_size=16,
                                         num_slices=2, patients_scale=0.25)
  source = many_sites.CohortSource(consortium, slots=4)
  states = {"c": jnp.arange(30.0)}
  configs = {"q": jnp.linspace(0, 1, 30)}
  shapes = None
  for cohort in ([3, 7, 21], [0, 29, 5, 11], []):
    data, st, cfg, part, ids = source.round_inputs(np.array(cohort, int),
                                                   states, configs)
    got = jax.tree.map(jnp.shape, data)
    assert shapes is None or got == shapes
    shapes = got
    assert part.tolist() == [True] * len(cohort) + [False] * (4 - len(cohort))
    assert ids[:len(cohort)].tolist() == cohort and (ids[len(cohort):] >= 30
                                                     ).all()
    np.testing.assert_array_equal(st["c"][:len(cohort)], cohort)
    np.testing.assert_allclose(cfg["q"][:len(cohort)],
                               np.linspace(0, 1, 30)[cohort])
  # A larger cohort widens the slots (one more shape, never a truncation).
  data, *_ , part, ids = source.round_inputs(np.arange(5), states, configs)
  assert source.slots == 8 and part.sum() == 5 and len(ids) == 8
  new_states, metrics = many_sites.CohortSource.scatter(
      states, {"c": jnp.full((8,), -1.0)}, np.array([2, 9]),
      {"loss": np.array([5.0, 6.0, 7.0])}, 30)
  assert np.asarray(new_states["c"])[[2, 9]].tolist() == [-1, -1]
  assert np.asarray(new_states["c"]).sum() == np.arange(30).sum() - 11 - 2
  assert metrics["loss"].shape == (30,) and metrics["loss"][9] == 6.0
  assert metrics["loss"].sum() == 11.0


def test_consortium_settings_are_checked():
  with pytest.raises(C.ConfigError, match="--num_sites"):
    C.DataConfig(num_sites=0)
  with pytest.raises(C.ConfigError, match="--num_sites"):
    C.DataConfig(num_sites=10, volumes=True)
  with pytest.raises(C.ConfigError, match="--eval_sites"):
    C.DataConfig(num_sites=10, eval_sites=0)


@pytest.fixture(scope="module")
def prepared_sites(tmp_path_factory):
  """A prepared dataset of 10 hospitals with 5 patients each."""
  from fedjax_seg.data import nifti  # pylint: disable=g-import-not-at-top
  from fedjax_seg.data import prepare  # pylint: disable=g-import-not-at-top
  from tests.data import fixtures  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("prepared_sites")
  cases = fixtures.write_csv(root / "cases",
                             sites=[f"hospital_{k}" for k in range(10)],
                             patients_per_site=5)
  prepare.prepare_dataset(cases, root / "data", "ten_hospitals",
                          nifti.PreprocessConfig(image_size=(16, 16)),
                          class_names=["background", "organ", "lesion"])
  return root / "data"


@pytest.mark.slow
def test_streamed_sites_are_the_in_memory_sites(prepared_sites):
  from fedjax_seg.data import sites as sites_lib  # pylint: disable=g-import-not-at-top
  streamed = consortium_lib.PreparedConsortium("ten_hospitals",
                                               prepared_sites, seed=3)
  splits = sites_lib.load_splits("ten_hospitals", prepared_sites, seed=3)
  for split in ("train", "val", "test"):
    whole = sites_lib.stack_sites(splits[split])
    counts = streamed.counts(split)
    np.testing.assert_array_equal(counts["num_examples"], whole.num_examples)
    np.testing.assert_array_equal(counts["num_patients"], whole.num_patients)
    ids = [7, 2, 5]
    part = streamed.site_arrays(ids, split)
    assert part.site_names == tuple(whole.site_names[k] for k in ids)
    for j, k in enumerate(ids):
      n = int(whole.num_examples[k])
      np.testing.assert_array_equal(part.image[j, :n], whole.image[k, :n])
      np.testing.assert_array_equal(part.label[j, :n], whole.label[k, :n])
      np.testing.assert_array_equal(part.slice_index[j, :n],
                                    whole.slice_index[k, :n])
  m, p, l = streamed.capacity()
  train = sites_lib.stack_sites(splits["train"])
  assert (m, p) == (train.image.shape[1], int(train.num_patients.max()))
  assert streamed.site_arrays([1], "train", fixed_capacity=True).image.shape[
      1] == m


@pytest.mark.slow
def test_a_streamed_run_is_the_in_memory_run(prepared_sites, tmp_path):
  base = C.ExperimentConfig(
      data=C.DataConfig(dataset="ten_hospitals", data_dir=str(prepared_sites),
                        eval_sites=32, test_sites=32),
      model=C.ModelConfig(widths=(4,)),
      federated=C.FederatedConfig(rounds=2, local_steps=1, batch_size=2,
                                  learning_rate=0.5, ema_decay=0.0,
                                  sites_per_round=3),
      eval_every=2, checkpoint_every=2, noise_seed=0)
  memory = loop.train_and_evaluate(base, tmp_path / "memory")
  streamed = loop.train_and_evaluate(
      dataclasses.replace(base, data=dataclasses.replace(
          base.data, stream_sites=True)), tmp_path / "streamed")
  assert [r["participants"] for r in streamed["history"]] == [
      r["participants"] for r in memory["history"]]
  assert streamed["privacy"]["ledger"] == memory["privacy"]["ledger"]
  for site, dice in memory["metrics"]["dice_per_site"].items():
    if dice is None:
      assert streamed["metrics"]["dice_per_site"][site] is None
    else:
      assert streamed["metrics"]["dice_per_site"][site] == pytest.approx(
          dice, abs=1e-4), site
  with pytest.raises(C.ConfigError, match="--stream_sites"):
    C.DataConfig(stream_sites=True)  # The built-in data: --num_sites.

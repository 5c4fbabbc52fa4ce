"""--init_from: a DP source on this run's patients is composed into its
ledger; other patients and public data are not; the rest is refused."""

import dataclasses
import json

import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import artifacts
from fedjax_seg.run import init_source
from fedjax_seg.run import loop
from fedjax_seg import privacy
from fedjax_seg import verifier
from tests.run import tiny

TINY = tiny.config(rounds=2, eval_every=2, checkpoint_every=2,
                   privacy=C.PrivacyConfig(target_epsilon=4.0))


def _from(config, source, **model):
  return dataclasses.replace(config, model=dataclasses.replace(
      config.model, init_from=str(source), **model))


def test_a_source_from_another_preparation_needs_a_stated_relation():
  """Reports name the dataset's preparation by its random id; a DP source
  trained on another preparation of this dataset is not composed blindly."""
  prepared = dataclasses.replace(
      TINY, data=dataclasses.replace(TINY.data, dataset="hosp",
                                     data_dir="data"))
  source = dataclasses.replace(prepared, noise_seed=7)
  flag = "--init_from=a"
  assert init_source._relation(prepared, source, flag, "1f", "1f") == (
      "composed")
  with pytest.raises(C.ConfigError, match=f"{flag}: dataset 'hosp' was "
                     "prepared again since that run"):
    init_source._relation(prepared, source, flag, "1f", "2e")
  disjoint = _from(prepared, "a", init_from_disjoint=True)
  assert init_source._relation(disjoint, source, flag, "1f", "2e") == (
      "disjoint")


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
  """Run A: epsilon 4 per patient on the built-in data."""
  workdir = tmp_path_factory.mktemp("init") / "a"
  return workdir, loop.train_and_evaluate(TINY, workdir)


@pytest.mark.slow
def test_a_dp_run_on_the_same_patients_is_composed(source_run, tmp_path):
  a_dir, a = source_run
  at_8 = dataclasses.replace(TINY, privacy=dataclasses.replace(
      TINY.privacy, target_epsilon=8.0))
  b = loop.train_and_evaluate(_from(at_8, a_dir), tmp_path / "b")
  a_ledger = privacy.PrivacyLedger.from_dict(a["privacy"]["ledger"])
  b_ledger = privacy.PrivacyLedger.from_dict(b["privacy"]["ledger"])
  for site in a_ledger.site_names:
    assert b_ledger.events(site)[:2] == a_ledger.events(site)
    assert len(b_ledger.events(site)) == 4
  assert b["privacy"]["composed_from"]["events_per_site"] == {
      s: 2 for s in a_ledger.site_names}
  # B's calibration aims at the total: more noise than B alone at 8.
  alone = loop.Simulation(at_8, tmp_path / "alone").run.plan
  b_sigma = b["privacy"]["noise_multiplier_per_site"]
  for k, site in enumerate(alone.site_names):
    assert b_sigma[site] > alone.noise.base_sigma[k] * 1.05, site
  # The composed epsilon, at most the target, verified.
  assert 0.98 * 8 <= b["privacy"]["epsilon_max"] <= 8.0
  assert b["privacy"]["verified"]["ok"] is True
  assert verifier.verify_report(b).ok
  assert any("composed into this run's ledgers" in line
             for line in b["privacy"]["assumptions"]["public"])
  # The budget stop counts A's events: B's first round would already take
  # a site past a budget of A's epsilon.
  budget = dataclasses.replace(at_8, privacy=dataclasses.replace(
      at_8.privacy, target_epsilon=None, noise_multiplier=1.0,
      epsilon_budget=a["privacy"]["epsilon_max"] * 1.001))
  stopped = loop.train_and_evaluate(_from(budget, a_dir),
                                          tmp_path / "budget")
  assert stopped["rounds_completed"] == 0
  assert stopped["stopped_reason"].startswith("budget: round 1")
  # A target A already spent is refused, naming the flags.
  spent = dataclasses.replace(TINY, privacy=dataclasses.replace(
      TINY.privacy, target_epsilon=3.0))
  with pytest.raises(C.ConfigError, match="--init_from/--target_epsilon"):
    loop.Simulation(_from(spent, a_dir), tmp_path / "spent")


@pytest.mark.slow
def test_a_source_with_the_same_noise_seed_is_refused(tmp_path):
  # Both runs would add the same Gaussian draws.
  seeded = dataclasses.replace(TINY, noise_seed=4, federated=dataclasses.replace(
      TINY.federated, rounds=1))
  loop.train_and_evaluate(seeded, tmp_path / "a")
  with pytest.raises(C.ConfigError, match="--noise_seed=4: .*same seed"):
    loop.Simulation(_from(seeded, tmp_path / "a"), tmp_path / "b")
  other = dataclasses.replace(_from(seeded, tmp_path / "a"), noise_seed=5)
  sim = loop.Simulation(other, tmp_path / "c")
  assert sim.run.plan.init_source.relation == "composed"
  # The source's workdir is only read: no secret or checkpoint written.
  assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()
                ) == ["1"]


@pytest.mark.slow
def test_other_patients_are_not_composed_and_the_unknown_is_refused(
    source_run, tmp_path):
  a_dir, a = source_run
  # The built-in data with another data seed: other patients.
  other = dataclasses.replace(_from(TINY, a_dir), data=dataclasses.replace(
      TINY.data, data_seed=1))
  sim = loop.Simulation(other, tmp_path / "other")
  assert sim.run.plan.init_source.relation == "disjoint"
  assert all(not sim.state.ledger.events(s) for s in sim.run.plan.site_names)
  line = sim.run.plan.init_source.assumption()
  assert "another data seed" in line and "not accounted here" in line
  # Stating the same patients disjoint is refused.
  with pytest.raises(C.ConfigError, match="--init_from_disjoint.*this run's"):
    loop.Simulation(_from(TINY, a_dir, init_from_disjoint=True),
                          tmp_path / "same")
  # A DP run on another (prepared) dataset: unknown relation, refused
  # unless stated.
  prepared = tmp_path / "prepared"
  prepared.mkdir()
  report = json.loads((a_dir / artifacts.REPORT).read_text())
  report["config"]["data"].update(dataset="hospital_scans",
                                  data_dir=str(tmp_path))
  (prepared / artifacts.REPORT).write_text(json.dumps(report))
  with pytest.raises(C.ConfigError, match="cannot be established"):
    loop.Simulation(_from(TINY, prepared), tmp_path / "unknown")
  # A non-private run on this run's patients is refused.
  nodp = tmp_path / "nodp"
  nodp.mkdir()
  report = json.loads((a_dir / artifacts.REPORT).read_text())
  report["config"]["privacy"]["enabled"] = False
  (nodp / artifacts.REPORT).write_text(json.dumps(report))
  with pytest.raises(C.ConfigError, match="WITHOUT DP on this run's"):
    loop.Simulation(_from(TINY, nodp), tmp_path / "nodp_run")
  # This run's patients cannot be stated public, and a site-level epsilon
  # cannot cover a source that protected them per patient only.
  with pytest.raises(C.ConfigError, match="--init_from_public: .*this run's"):
    loop.Simulation(_from(TINY, a_dir, init_from_public=True),
                          tmp_path / "public")
  site_level = dataclasses.replace(_from(TINY, a_dir), privacy=dataclasses.replace(
      TINY.privacy, site_level=True))
  with pytest.raises(C.ConfigError, match="--site_level: that run protected"):
    loop.Simulation(site_level, tmp_path / "site_level")
  # A budget the source already spent is refused before anything runs.
  spent = dataclasses.replace(_from(TINY, a_dir), privacy=dataclasses.replace(
      TINY.privacy, target_epsilon=None, epsilon_budget=1.0))
  with pytest.raises(C.ConfigError, match="--epsilon_budget=1.0: the "
                                          "--init_from run already spent"):
    loop.Simulation(spent, tmp_path / "spent_budget")
  # Another unit cannot be composed.
  slices = dataclasses.replace(_from(TINY, a_dir), privacy=dataclasses.replace(
      TINY.privacy, unit="example"))
  with pytest.raises(C.ConfigError, match="per patient, this run's per "
                                          "example"):
    loop.Simulation(slices, tmp_path / "slices")

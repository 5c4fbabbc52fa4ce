"""A run's data: its splits, as its sites see them round by round.

`load` reads the built-in synthetic data or a prepared dataset and splits
each site's patients into train / val / test (`--split_fractions`, by
patient, seeded by the data seed); `RunData` holds what the run keeps: the
training data in the engine's layout, the validation and test arrays, and,
with --num_sites or --stream_sites, the source of each round's cohort
instead of every site; with a scenario that changes the data (scanner
changes, drift), each split as the sites see it in a given round.
"""

import dataclasses
import pathlib

import numpy as np

from fedjax_seg.data import consortium as consortium_lib
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.data import synthetic
from fedjax_seg.privacy import correlated_plan
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_syntax
from fedjax_seg.run import many_sites
from fedjax_seg.run import scenarios as scenarios_lib
from fedjax_seg.segmentation import task as segmentation_task


def synthetic_config(config: config_lib.DataConfig,
                     seed: int) -> synthetic.SyntheticConfig:
  """The built-in generator's settings for `config`."""
  return synthetic.SyntheticConfig(
      image_size=config.image_size, num_slices=config.num_slices,
      patients_scale=config.patients_scale, seed=seed)


def load(config: config_lib.DataConfig, seed: int,
         synthetic_override: synthetic.SyntheticConfig | None = None):
  """{"train", "val", "test"}: SliceDatasets split by patient (for the
  built-in data, of `synthetic_override` when given)."""
  if config.dataset == "synthetic":
    make = synthetic.generate_volumes if config.volumes else synthetic.generate
    data = make(synthetic_override or synthetic_config(config, seed))
    return sites_lib.split_by_patient(data, config.split_fractions, seed)
  check_prepared(config)
  return sites_lib.load_splits(config.dataset, config.data_dir,
                               config.split_fractions, seed)


def check_prepared(config: config_lib.DataConfig) -> None:
  """Raises ConfigError naming --dataset if it is not in --data_dir."""
  path = pathlib.Path(config.data_dir) / config.dataset
  if not path.is_dir():
    raise config_lib.ConfigError(
        f"--dataset: {config.dataset!r} not found in --data_dir="
        f"{config.data_dir} (prepare it with python -m data_prep.prepare).")


@dataclasses.dataclass
class RunData:
  """The data a run holds.

  Attributes:
    train: the training split's arrays (with cohorts: site 0's only, for
      shapes and vocabularies).
    counts: per-site unit counts and names (all sites, also with cohorts).
    site_data: the training split in the engine's layout (None with
      cohorts).
    val, test: validation (held-out patients; with cohorts the validation
      sample's sites) and test arrays (None with cohorts: evaluated a block
      of sites at a time).
    cohorts: with --num_sites / --stream_sites, where each round's cohort
      comes from; val_ids, test_ids: the consortium ids of the validation
      and test samples.
    scenario: data and membership that change over rounds, or None.
    scenario_data: {split: ScenarioData} when the scenario changes the
      data.
  """

  train: sites_lib.SiteArrays
  counts: object
  site_data: object
  val: sites_lib.SiteArrays
  test: sites_lib.SiteArrays | None
  cohorts: many_sites.CohortSource | None = None
  val_ids: np.ndarray | None = None
  test_ids: np.ndarray | None = None
  scenario: scenarios_lib.Scenario | None = None
  scenario_data: dict | None = None

  def training_at(self, round_index: int):
    """The engine's training data as the sites hold it in a round."""
    if self.scenario_data is None:
      return self.site_data
    return segmentation_task.site_data(self.scenario_data["train"].at(
        round_index))

  def split_at(self, split: str, round_index: int):
    """Validation or test arrays as of round `round_index` (0-based)."""
    if self.scenario_data is None:
      return self.val if split == "val" else self.test
    return self.scenario_data[split].at(round_index)


def prepare(config: config_lib.ExperimentConfig, splits=None) -> RunData:
  """The run's data (`splits`: preloaded `load(...)`, e.g. a sweep's)."""
  d, p = config.data, config.privacy
  seed = config.data_seed
  if d.cohorts:
    if d.num_sites is not None:
      consortium = consortium_lib.Consortium(
          num_sites=d.num_sites, image_size=d.image_size,
          num_slices=d.num_slices, patients_scale=d.patients_scale,
          seed=seed, split_fractions=d.split_fractions)
    else:  # --stream_sites: a prepared dataset's sites, read on demand.
      check_prepared(d)
      consortium = consortium_lib.PreparedConsortium(
          d.dataset, d.data_dir, d.split_fractions, seed)
    n = consortium.num_sites
    val_ids = many_sites.eval_sample(n, d.eval_sites, seed)
    return RunData(
        train=consortium.site_arrays([0], "train"),
        counts=many_sites.site_counts(consortium), site_data=None,
        val=consortium.site_arrays(val_ids, "val"), test=None,
        cohorts=many_sites.CohortSource(consortium, many_sites.cohort_slots(
            n, config.federated.sites_per_round,
            _site_round_rate(config) if p.use_site_level else None)),
        val_ids=val_ids, test_ids=many_sites.test_sample(n, d.test_sites,
                                                         seed))
  if splits is None:
    splits = load(d, seed)
  train = sites_lib.stack_sites(splits["train"])
  val = sites_lib.stack_sites(splits["val"])
  test = sites_lib.stack_sites(splits["test"])
  scenario = scenario_data = None
  if config_syntax.any_scenario(d):
    scenario = scenarios_lib.Scenario.build(
        d, train.site_names, train.site_modalities, config.federated.rounds)
  if scenario is not None and scenario.has_data_changes:
    replaced = {}
    if any(scenario.new_profile):
      other = load(d, seed, scenario.replaced_config(synthetic_config(d,
                                                                      seed)))
      replaced = {split: sites_lib.stack_sites(other[split])
                  for split in ("train", "val", "test")}
    scenario_data = {
        split: scenarios_lib.ScenarioData(scenario, arrays,
                                          replaced.get(split))
        for split, arrays in (("train", train), ("val", val),
                              ("test", test))}
  return RunData(train=train, counts=train,
                 site_data=segmentation_task.site_data(train), val=val,
                 test=test, scenario=scenario, scenario_data=scenario_data)


def _site_round_rate(config) -> float:
  """The chance a site trains in a round under site-level DP: q, or with
  correlated noise at the server the rate of its cyclic groups (a BLT
  round trains a whole group, about K / b sites)."""
  p = config.privacy
  if p.record_level or p.noise_mechanism == "independent":
    return p.site_sampling_rate
  return correlated_plan.server_round_rate(
      p.noise_mechanism, p.site_sampling_rate, p.mf_bands,
      config.federated.rounds)

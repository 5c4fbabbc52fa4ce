"""What `--init_from` starts from, and what that costs this run's patients.

A run may start from another run's evaluated model. Its privacy cost depends
on whose data trained that model (the relation):

  * "public": the source trained on data that are public here: the built-in
    synthetic data when this run trains on another dataset, or a dataset
    stated public with --init_from_public. Nothing to account.
  * "disjoint": the source trained under DP on other patients than this
    run's: the built-in data drawn with another --data_seed (other patients
    from the generator), or a dataset stated disjoint with
    --init_from_disjoint. Its cost is those patients', not accounted here.
  * "composed": the source trained under DP on this run's patients (the same
    dataset; for the built-in data, the same data seed). The released model
    is then a function of both runs, and its privacy loss is their
    composition: the source's ledger events of each site are composed into
    this run's ledger before round 1, calibration aims at the total, the
    budget stop counts them, and the report and verifier show the composed
    epsilon.

Refused, naming the flag: a source trained WITHOUT DP on data that are not
public (this run's patients or another private dataset), a composed source
with another privacy unit, and a DP source on another dataset whose relation
is not stated.
"""

import dataclasses
import hashlib
import json
import pathlib

from fedjax_seg.run import artifacts
from fedjax_seg.run import config as config_lib
from fedjax_seg import privacy

RELATIONS = ("public", "disjoint", "composed")


@dataclasses.dataclass(frozen=True)
class InitSource:
  """The --init_from run, read from its report.json.

  Attributes:
    workdir: the source run's directory (absolute).
    config: its configuration.
    report_sha256: sha256 of its report.json as read.
    relation: one of RELATIONS (module docstring).
    dp: whether the source trained under DP.
    epsilon_max, epsilon_label: its largest epsilon and label (DP only).
    params_sha256: its evaluated model's digest.
    prior_events: with relation "composed", {site: [events]} of the source's
      main ledger for the sites this run has (composed into this run's main
      ledger); else {}.
    prior_site_level_events: the same for the site-level ledger, when this
      run keeps one besides a record-level main ledger; else {}.
    composes_site_level: whether `prior_site_level_events` were composed
      (this run has both ledgers and the source composed).
  """

  workdir: str
  config: config_lib.ExperimentConfig
  report_sha256: str
  relation: str
  dp: bool
  epsilon_max: float | None
  epsilon_label: str | None
  params_sha256: str | None
  prior_events: dict
  prior_site_level_events: dict
  composes_site_level: bool = False

  def assumption(self) -> str:
    """The report's sentence on the initial model (privacy.assumptions)."""
    d = self.config.data
    what = (f"the initial model: the evaluated model of {self.workdir} "
            f"(dataset {d.dataset!r}, data seed {self.config.data_seed}, "
            f"params sha256 {self.params_sha256})")
    if not self.dp:
      stated = ("; public as stated by --init_from_public"
                if d.dataset != "synthetic" else "")
      return f"{what}, trained without DP on public data{stated}"
    spent = f"{self.epsilon_label} max {self.epsilon_max}"
    if self.relation == "composed":
      return (f"{what}, trained under DP ({spent}) on this run's patients: "
              "its ledger events are composed into this run's ledgers, so "
              "every epsilon here covers both runs")
    why = ("stated public by --init_from_public" if self.relation == "public"
           and d.dataset != "synthetic" else
           "the built-in data, public" if self.relation == "public" else
           "other patients of the built-in generator (another data seed)"
           if d.dataset == "synthetic" else
           "other patients, as stated by --init_from_disjoint")
    return (f"{what}, trained under DP ({spent}) on {why}; its privacy cost "
            "is those patients', not accounted here")

  def report_section(self, site_level: bool = False) -> dict | None:
    """`composed_from` of the report's main ledger section (or, with
    `site_level`, of its site-level section beside a record-level main
    ledger): where the ledger's first events come from (none for a site the
    source does not have); None unless composed."""
    if self.relation != "composed" or (site_level
                                       and not self.composes_site_level):
      return None
    prior = self.prior_site_level_events if site_level else self.prior_events
    return {"workdir": self.workdir, "report_sha256": self.report_sha256,
            "events_per_site": {s: len(e) for s, e in prior.items()}}


def main_unit(config: config_lib.ExperimentConfig) -> str:
  """The unit of a run's main ledger: record-level if any, else site."""
  p = config.privacy
  return p.unit if p.record_level else privacy.PrivacyUnit.SITE.value


def read(config: config_lib.ExperimentConfig, site_names,
         preparation: str | None = None) -> InitSource | None:
  """The --init_from source of `config` (None without --init_from), its
  relation to this run's patients and, when composed, its events for
  `site_names`; `preparation` is this run's `dataset_preparation`. Raises
  ConfigError naming --init_from."""
  from fedjax_seg.run import config_flags  # pylint: disable=g-import-not-at-top
  model = config.model
  if not model.init_from:
    return None
  path = pathlib.Path(model.init_from).absolute()
  flag = f"--init_from={model.init_from}"
  report_path = path / artifacts.REPORT
  if not report_path.is_file():
    raise config_lib.ConfigError(
        f"{flag}: no {artifacts.REPORT} there (give the --workdir of a finished run).")
  raw = report_path.read_bytes()
  report = json.loads(raw)
  other = config_flags.config_from_dict(report["config"])
  dp = other.privacy.enabled
  relation = _relation(config, other, flag, preparation,
                       report.get("dataset", {}).get("preparation_id"))
  section = report.get("privacy", {}) if dp else {}
  prior, prior_site = {}, {}
  both_ledgers = config.privacy.use_site_level and config.privacy.record_level
  if relation == "composed":
    ledger = privacy.PrivacyLedger.from_dict(section["ledger"])
    if ledger.unit != main_unit(config):
      raise config_lib.ConfigError(
          f"{flag}: that run's epsilon is per {ledger.unit}, this run's per "
          f"{main_unit(config)}; composing them needs one unit (use the "
          "source's --unit, or other patients and --init_from_disjoint).")
    prior = {s: ledger.events(s) for s in site_names
             if s in ledger.site_names}
    if both_ledgers:
      if "site_level" not in section:
        raise config_lib.ConfigError(
            f"{flag}/--site_level: that run protected this run's patients "
            "per unit only, with no site-level DP, so a site-level epsilon "
            "of this run cannot cover its model; start from a source with "
            "--site_level too, or drop --site_level.")
      site_ledger = privacy.PrivacyLedger.from_dict(
          section["site_level"]["ledger"])
      prior_site = {s: site_ledger.events(s) for s in site_names
                    if s in site_ledger.site_names}
  return InitSource(
      workdir=str(path), config=other,
      report_sha256=hashlib.sha256(raw).hexdigest(), relation=relation,
      dp=dp, epsilon_max=section.get("epsilon_max"),
      epsilon_label=section.get("epsilon_label"),
      params_sha256=report.get("evaluated_params_sha256",
                               report.get("final_params_sha256")),
      prior_events=prior, prior_site_level_events=prior_site,
      composes_site_level=relation == "composed" and both_ledgers)


def dataset_preparation(data: config_lib.DataConfig) -> str | None:
  """The prepared dataset's `preparation_id` (random, drawn when
  `data_prep.prepare` wrote it: public), or None for the built-in data or a
  dataset without one."""
  if data.dataset == "synthetic":
    return None
  from fedjax_seg.data import tfds_io  # pylint: disable=g-import-not-at-top
  try:
    return tfds_io.read_stats(data.dataset,
                              data.data_dir).get("preparation_id")
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _relation(config, other, flag: str, preparation: str | None = None,
              source_preparation: str | None = None) -> str:
  """One of RELATIONS, or ConfigError (module docstring)."""
  model, mine, theirs = config.model, config.data, other.data
  same_patients = theirs.dataset == mine.dataset and (
      mine.dataset != "synthetic" or other.data_seed == config.data_seed)
  if (same_patients and preparation and source_preparation
      and source_preparation != preparation):
    if not (model.init_from_disjoint or model.init_from_public):
      raise config_lib.ConfigError(
          f"{flag}: dataset {mine.dataset!r} was prepared again since that "
          "run (another preparation id), so its patients may now be at other "
          "sites and composing per site would miss them. Pass "
          "--init_from_disjoint if its patients are none of this run's, or "
          "use a source trained on this preparation.")
    same_patients = False
  dp = other.privacy.enabled
  if same_patients and model.init_from_public:
    raise config_lib.ConfigError(
        f"--init_from_public: {flag} trained on this run's patients (dataset "
        f"{theirs.dataset!r}"
        + (f", data seed {config.data_seed}" if mine.dataset == "synthetic"
           else "")
        + "), whose data this run protects; drop --init_from_public (a DP "
        "source is then composed into this run's ledger).")
  if model.init_from_public:
    return "public"
  if theirs.dataset == "synthetic" and not same_patients:
    return "public" if mine.dataset != "synthetic" else "disjoint"
  if not dp:
    whose = ("this run's patients" if same_patients
             else f"dataset {theirs.dataset!r}")
    raise config_lib.ConfigError(
        f"{flag}: that run trained WITHOUT DP on {whose}, so its parameters "
        "are not public and would carry its training data into this run's "
        "outputs. Pretrain on public data (e.g. the built-in synthetic data "
        "with another --data_seed), or pass --init_from_public to state "
        f"that {theirs.dataset!r} is public.")
  if same_patients:
    if model.init_from_disjoint:
      raise config_lib.ConfigError(
          f"--init_from_disjoint: {flag} trained on dataset "
          f"{theirs.dataset!r}"
          + (f" with the same data seed ({config.data_seed})"
             if mine.dataset == "synthetic" else "")
          + ", whose patients are this run's; drop --init_from_disjoint (its "
          "events are then composed into this run's ledger).")
    _check_independent_noise(config, other, flag)
    return "composed"
  if model.init_from_disjoint:
    _check_independent_noise(config, other, flag)
    return "disjoint"
  raise config_lib.ConfigError(
      f"{flag}: that run trained under DP on dataset {theirs.dataset!r}, "
      f"this one on {mine.dataset!r}: whether they share patients cannot be "
      "established. Pass --init_from_disjoint if its patients are none of "
      "this run's, or --init_from_public if that dataset is public.")


def _check_independent_noise(config, other, flag: str) -> None:
  """Refuses a DP source that drew its noise from this run's --noise_seed
  (and sweep member): both runs would add the same Gaussian draws, and two
  releases that share noise are not the independent mechanisms their
  ledgers account (their difference can cancel it)."""
  if (config.noise_seed is not None and config.noise_seed == other.noise_seed
      and config.sweep_member == other.sweep_member):
    raise config_lib.ConfigError(
        f"--noise_seed={config.noise_seed}: {flag} drew its noise from the "
        "same seed, so both runs add the same Gaussian draws; use another "
        "--noise_seed, or none (a secret).")

"""Experiment configuration: frozen dataclasses validated on construction.

Privacy settings (`PrivacyConfig`) are kept apart from performance settings
(`PerformanceConfig`); the latter never change a privacy figure. Every error
names the command-line flag of the offending field (flags are named like the
fields). DP is on unless `PrivacyConfig(enabled=False)` (`--nodp`).

This module imports nothing of the library (as flax examples' configs). The
choice flags' vocabularies, the grammar of the list flags' entries and
`ConfigError` are in `config_syntax.py`; a config checks that syntax when it
is built.
"""

import dataclasses

# The vocabularies, ConfigError and the entries' grammar (config_syntax.py).
from fedjax_seg.run.config_syntax import ADAPTIVE_MODES
from fedjax_seg.run.config_syntax import ALGORITHMS
from fedjax_seg.run.config_syntax import any_scenario
from fedjax_seg.run.config_syntax import AUDIT_CANARY_KINDS
from fedjax_seg.run.config_syntax import AUGMENTATIONS
from fedjax_seg.run.config_syntax import BACKENDS
from fedjax_seg.run.config_syntax import check as _check
from fedjax_seg.run.config_syntax import check_scenario_entries
from fedjax_seg.run.config_syntax import ConfigError
from fedjax_seg.run.config_syntax import LOCAL_LOOPS
from fedjax_seg.run.config_syntax import LOCAL_OPTIMIZERS
from fedjax_seg.run.config_syntax import NOISE_MECHANISMS
from fedjax_seg.run.config_syntax import NOISE_SCHEDULES
from fedjax_seg.run.config_syntax import NORMS
from fedjax_seg.run.config_syntax import PARAM_GROUPS
from fedjax_seg.run.config_syntax import parse_by_modality
from fedjax_seg.run.config_syntax import PER_EXAMPLE_GRADS
from fedjax_seg.run.config_syntax import PRIVACY_UNITS
from fedjax_seg.run.config_syntax import UNET_PRESETS


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Which data, and how it is split.

  Attributes:
    dataset: "synthetic" (built in) or the name of a dataset made by
      `python -m data_prep.prepare` in `data_dir`.
    data_dir: TFDS data dir of a prepared dataset.
    image_size, num_slices, patients_scale: synthetic dataset sizes.
    split_fractions: train/val/test fractions of each site's patients.
    held_out_sites: sites excluded from training (evaluated only).
    volumes: train a 3D U-Net on whole patient volumes (synthetic CT/MRI
      sites; one example = one patient volume of num_slices slices).
    data_seed: seed of the synthetic data and of the train/val/test split
      (None: --seed). A sweep over --seed keeps it fixed, so its members
      train on the same data.
    num_sites: a consortium of this many built-in sites instead of the 8
      default ones (`fedjax_seg.data.consortium`: each site draws one of the
      8 scanner profiles and a heavy-tailed size, deterministically per site
      id). Sites are rendered when their cohort is drawn and only the
      cohort's data are on the device; use with --sites_per_round (or
      site-level DP's Poisson sampling; one of them is required above 64
      sites). None: the 8 default sites.
    stream_sites: for a prepared dataset with many sites: read each
      round's cohort (and the evaluation samples) from its array_record
      files instead of loading every site, as --num_sites does for the
      built-in data; use with --sites_per_round (or site-level DP's Poisson
      sampling).
    eval_sites: with --num_sites, validation during training covers this
      fixed, seeded sample of sites (all if fewer).
    test_sites: with --num_sites, the final test evaluation covers this
      seeded sample of sites (all if fewer; the report gives the number).
    scanner_changes: distributions that change over rounds
      (`fedjax_seg.run.scenarios`): entries SITE:ROUND:PROFILE, site SITE's
      scanner replaced from round ROUND on by the built-in profile PROFILE
      of the same modality (built-in data only).
    intensity_drift: entries SITE:GAIN_RATE[:OFFSET_RATE], the site's
      image intensities x become x (1 + GAIN_RATE r) + OFFSET_RATE r in
      round r (0-based): a slow gain or calibration drift.
    site_joins: entries SITE:ROUND, the site trains from round ROUND on (its
      privacy budget starts then; its noise is calibrated for its rounds).
    site_leaves: entries SITE:ROUND, the site trains up to round ROUND - 1.
  """

  dataset: str = "synthetic"
  data_dir: str | None = None
  image_size: int = 32
  num_slices: int = 8
  patients_scale: float = 1.0
  split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
  held_out_sites: tuple[str, ...] = ()
  volumes: bool = False
  data_seed: int | None = None
  num_sites: int | None = None
  stream_sites: bool = False
  eval_sites: int = 32
  test_sites: int = 1000
  scanner_changes: tuple[str, ...] = ()
  intensity_drift: tuple[str, ...] = ()
  site_joins: tuple[str, ...] = ()
  site_leaves: tuple[str, ...] = ()

  @property
  def cohorts(self) -> bool:
    """Each round's cohort is made or read on demand (--num_sites or
    --stream_sites) instead of holding every site."""
    return self.num_sites is not None or self.stream_sites

  def __post_init__(self):
    _check(bool(self.dataset), "dataset", "must not be empty.")
    _check(self.data_seed is None or self.data_seed >= 0, "data_seed",
           "must be >= 0.")
    _check(not self.volumes or self.dataset == "synthetic", "volumes",
           "3D volumes come from the synthetic dataset only (prepared "
           "datasets hold 2D slices).")
    if self.dataset != "synthetic":
      _check(self.data_dir is not None, "data_dir",
             f"is required for the prepared dataset {self.dataset!r} "
             "(use --dataset=synthetic for the built-in one).")
    if self.num_sites is not None:
      _check(self.num_sites >= 1, "num_sites", "must be >= 1.")
      _check(self.dataset == "synthetic" and not self.volumes, "num_sites",
             "makes a consortium of the built-in 2D sites: only with "
             "--dataset=synthetic and without --volumes.")
    check_scenario_entries(self)
    _check(not self.stream_sites or (self.dataset != "synthetic"
                                     and self.num_sites is None),
           "stream_sites", "reads a prepared dataset's sites on demand; "
           "for the built-in data use --num_sites.")
    _check(not self.cohorts or not any_scenario(self),
           "num_sites" if self.num_sites is not None else "stream_sites",
           "scenarios that change over rounds "
           "(--scanner_changes, --intensity_drift, --site_joins, "
           "--site_leaves) are for sites held in memory, not with "
           "--num_sites or --stream_sites.")
    _check(self.eval_sites >= 1, "eval_sites", "must be >= 1.")
    _check(self.test_sites >= 1, "test_sites", "must be >= 1.")
    _check(self.image_size >= 16, "image_size", "must be >= 16.")
    _check(self.num_slices >= 1, "num_slices", "must be >= 1.")
    _check(self.patients_scale > 0, "patients_scale", "must be > 0.")
    fr = self.split_fractions
    _check(len(fr) == 3 and min(fr) >= 0 and abs(sum(fr) - 1) < 1e-6
           and fr[0] > 0, "split_fractions",
           f"need three fractions >= 0 summing to 1 with train > 0, got {fr}.")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """U-Net architecture (see `fedjax_seg.models.preset`) and its start.

  Attributes:
    preset: tiny, small or base.
    widths: channel widths per level (overrides the preset's if given).
    norm: group or instance (BatchNorm would mix examples).
    residual: residual blocks.
    dropout: dropout rate.
    init_from: start from the final (or averaged) model of the run in this
      --workdir instead of a random init (pretraining). Refused when that
      run trained without DP on data not known to be public; a DP run on
      this run's patients is composed into this run's ledger.
    init_from_public: state that the --init_from run's dataset is public
      (needed for a non-private run on a prepared dataset; the built-in
      synthetic data are public when they are other patients, i.e. drawn
      with another --data_seed or used by a run on another dataset).
    init_from_disjoint: state that the DP-trained --init_from run's
      patients are none of this run's (another dataset); its privacy cost is
      then theirs. Without it, a DP source on this run's dataset has its
      ledger composed into this run's (epsilons cover both runs) and one on
      another dataset is refused.
    trainable: parameter groups trained (encoder, decoder, head, norm);
      empty = all. Fewer private dimensions: clipping and noise cover only
      these; the others stay at their initial (e.g. --init_from) values.
  """

  preset: str = "tiny"
  widths: tuple[int, ...] = ()
  norm: str = "group"
  residual: bool = False
  dropout: float = 0.0
  init_from: str | None = None
  init_from_public: bool = False
  init_from_disjoint: bool = False
  trainable: tuple[str, ...] = ()

  def __post_init__(self):
    _check(self.preset in UNET_PRESETS, "model",
           f"unknown preset {self.preset!r}; choose from "
           f"{sorted(UNET_PRESETS)}.")
    _check(self.norm in NORMS, "norm",
           f"must be one of {NORMS} (BatchNorm mixes examples and breaks"
           f" per-example DP), got {self.norm!r}.")
    _check(all(w > 0 for w in self.widths), "widths", "must be positive.")
    _check(0 <= self.dropout < 1, "dropout", "must be in [0, 1).")
    unknown = [g for g in self.trainable if g not in PARAM_GROUPS]
    _check(not unknown, "trainable",
           f"unknown groups {unknown}; choose from {PARAM_GROUPS}.")


@dataclasses.dataclass(frozen=True)
class PrivacyConfig:
  """Everything that changes a privacy figure.

  Attributes:
    enabled: False = no DP at all (the run is marked non-private).
    unit: "patient" (default: all slices of a patient, clipped as a group;
      the guarantee a hospital needs), "example" (one slice) or "site"
      (DP-FedAvg only: no record-level DP).
    l2_clip_norm: record-level clip norm C (initial C if adaptive).
    noise_multiplier: record-level sigma, used when target_epsilon is None.
    target_epsilon: each site gets its own sigma_k so that all sites reach
      this epsilon after all rounds (site-adaptive noise); None (--
      target_epsilon=none) uses noise_multiplier for every site.
    noise_schedule: per-round shape of sigma: constant, linear (to
      schedule_end_factor), exponential (decay_rate per round), cosine (to
      schedule_end_factor), step (x schedule_end_factor at half the rounds).
    schedule_end_factor, schedule_decay_rate: schedule parameters.
    adaptive_clipping: "off", "geometric" (Andrew et al.) or "percentile"
      (ADP-FL), both through a noised count. Adapts the record-level clip
      norm, or with unit="site" the site clip norm of DP-FedAvg.
    target_quantile, clip_learning_rate, count_noise_multiplier: adaptive
      clipping parameters (count noise std in units; 0 = the smallest that
      raises the gradient noise by at most 10%).
    delta: target delta.
    epsilon_budget: per-site budget; the run stops before a round that would
      exceed it.
    site_level: add site-level DP (DP-FedAvg) at the server (forced with
      unit="site"); accounted separately.
    site_clip_norm, site_noise_multiplier: DP-FedAvg clip S and multiplier z.
    site_sampling_rate: Poisson rate of sites per round (site-level DP).
    site_target_epsilon: calibrate site_noise_multiplier so that every
      site's site-level epsilon ends at this value after all rounds (none:
      use site_noise_multiplier as given).
    audit: run the one-run canary audit (Steinke et al. 2023) inside the
      run: gradient canaries in one site's clipped sums, scored on that
      site's released gradients; report.json gets privacy.audit (an
      empirical epsilon lower bound next to the claimed epsilon).
    audit_canaries: number of canaries m (each included with prob. 1/2).
    audit_canary_kind: "random" (Gaussian unit directions) or "dirac" (one
      parameter each).
    audit_site: the audited site's name (none = the first training site).
    noise_mechanism: the noise of the run's unit: independent (DP-SGD),
      banded (banded matrix factorisation, DP-FTRL: noise correlated over
      each site's steps, units in mf_bands cyclic groups, Poisson-sampled
      in turn) or blt (a buffered linear Toeplitz factorisation: each step
      trains one of N_k // batch_size groups of the site's units). With
      unit="site" the server's noise, correlated over rounds: sites in
      b = floor(1 / site_sampling_rate) cyclic groups (banded: at most
      mf_bands), one group per round.
    mf_bands: bands b of the banded factorisation (and its cyclic groups).
    blt_max_buffers: most buffers of the BLT (its state is this many
      copies of the parameters per site).
  """

  enabled: bool = True
  unit: str = "patient"
  l2_clip_norm: float = 1.0
  noise_multiplier: float = 1.0
  target_epsilon: float | None = 8.0
  noise_schedule: str = "constant"
  schedule_end_factor: float = 0.5
  schedule_decay_rate: float = 0.98
  adaptive_clipping: str = "off"
  target_quantile: float = 0.5
  clip_learning_rate: float = 0.2
  count_noise_multiplier: float = 0.0
  delta: float = 1e-5
  epsilon_budget: float | None = None
  site_level: bool = False
  site_clip_norm: float = 0.5
  site_noise_multiplier: float = 1.0
  site_sampling_rate: float = 1.0
  site_target_epsilon: float | None = None
  audit: bool = False
  audit_canaries: int = 1000
  audit_canary_kind: str = "random"
  audit_site: str | None = None
  noise_mechanism: str = "independent"
  mf_bands: int = 4
  blt_max_buffers: int = 4

  def __post_init__(self):
    _check(self.unit in PRIVACY_UNITS, "unit",
           f"must be one of {PRIVACY_UNITS}, got {self.unit!r}.")
    _check(self.l2_clip_norm > 0, "l2_clip_norm", "must be > 0.")
    _check(self.noise_multiplier >= 0, "noise_multiplier",
           f"must be >= 0, got {self.noise_multiplier}.")
    _check(self.target_epsilon is None or self.target_epsilon > 0,
           "target_epsilon", "must be > 0.")
    _check(self.noise_schedule in NOISE_SCHEDULES, "noise_schedule",
           f"must be one of {NOISE_SCHEDULES}.")
    _check(self.schedule_end_factor > 0, "schedule_end_factor", "must be > 0.")
    _check(0 < self.schedule_decay_rate <= 1.5, "schedule_decay_rate",
           "must be in (0, 1.5].")
    _check(self.adaptive_clipping in ADAPTIVE_MODES, "adaptive_clipping",
           f"must be one of {ADAPTIVE_MODES}.")
    _check(0 < self.target_quantile < 1, "target_quantile", "must be in (0, 1).")
    _check(self.clip_learning_rate > 0, "clip_learning_rate", "must be > 0.")
    _check(self.count_noise_multiplier >= 0, "count_noise_multiplier",
           "must be >= 0.")
    _check(0 < self.delta < 1, "delta", f"must be in (0, 1), got {self.delta}.")
    _check(self.epsilon_budget is None or self.epsilon_budget > 0,
           "epsilon_budget", "must be > 0.")
    _check(self.site_clip_norm > 0, "site_clip_norm", "must be > 0.")
    _check(self.site_noise_multiplier >= 0, "site_noise_multiplier",
           "must be >= 0.")
    _check(0 < self.site_sampling_rate <= 1, "site_sampling_rate",
           "must be in (0, 1].")
    _check(self.site_target_epsilon is None or self.site_target_epsilon > 0,
           "site_target_epsilon", "must be > 0.")
    _check(self.site_target_epsilon is None or (
        self.use_site_level and (self.record_level
                                 or self.adaptive_clipping == "off")),
           "site_target_epsilon", "calibrates site-level DP's fixed noise: "
           "it needs --unit=site or --site_level, and no --adaptive_clipping "
           "with --unit=site.")
    _check(self.audit_canaries >= 2, "audit_canaries", "must be >= 2.")
    _check(self.audit_canary_kind in AUDIT_CANARY_KINDS, "audit_canary_kind",
           f"must be one of {AUDIT_CANARY_KINDS}.")
    _check(not self.audit or (self.enabled and self.unit != "site"),
           "audit", "audits record-level DP-SGD: it needs DP on (no --nodp) "
           "and --unit=example or --unit=patient.")
    _check(not (self.unit == "site" and self.adaptive_clipping != "off"
                and self.site_noise_multiplier <= 0), "site_noise_multiplier",
           "must be > 0 with --adaptive_clipping (the clip-count release "
           "needs noise).")
    _check(not (self.site_level and self.unit != "site"
                and self.adaptive_clipping != "off"), "adaptive_clipping",
           "with --site_level on top of record-level DP it is ambiguous "
           "which clip norm adapts, and a per-site adaptive clip norm would "
           "reveal which sites were sampled; use it with --unit=site (site "
           "clip norm) or without --site_level (record-level clip norm).")

    _check(self.noise_mechanism in NOISE_MECHANISMS, "noise_mechanism",
           f"must be one of {NOISE_MECHANISMS}.")
    _check(self.mf_bands >= 1, "mf_bands", "must be >= 1.")
    _check(self.blt_max_buffers >= 1, "blt_max_buffers", "must be >= 1.")
    if self.noise_mechanism != "independent":
      for ok, flag, why in (
          (self.enabled, "dp", "needs DP (not --nodp)"),
          (self.noise_schedule == "constant", "noise_schedule",
           "assumes one noise scale over the stream: use constant"),
          (self.adaptive_clipping == "off", "adaptive_clipping",
           "assumes one clip norm over the stream: use off"),
          (not self.audit, "audit", "samples the units in cyclic groups, "
           "which the canary audit does not model")):
        _check(ok, flag, f"--noise_mechanism={self.noise_mechanism} {why}.")

  @property
  def record_level(self) -> bool:
    return self.enabled and self.unit != "site"

  @property
  def use_site_level(self) -> bool:
    return self.enabled and (self.site_level or self.unit == "site")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """The federated algorithm and its learning settings.

  Attributes:
    algorithm: fedavg, fedavgm, fedprox, fedadam, fedyogi or fedbn.
    rounds: number of rounds.
    local_steps: DP-SGD steps per site per round.
    batch_size: expected units (patients, or slices with --unit=example)
      per step (q_k = batch_size / N_k).
    learning_rate: local learning rate; local_optimizer: sgd/momentum/adam.
    server_learning_rate: server step (1.0 for FedAvg).
    prox_mu: FedProx proximal weight (algorithm fedprox).
    sites_per_round: sites sampled uniformly per round (0 = all); with
      site-level DP sites are Poisson-sampled with site_sampling_rate instead.
    dropout_rate: probability that a sampled site does not show up.
    weighting: "num_examples" or "uniform".
    augmult: augmentation multiplicity K: each unit's gradient is the mean
      over K augmented copies before clipping (free in privacy); 0 = off.
    augmentations: the transforms of each copy (flip, affine, intensity,
      gamma, noise; `fedjax_seg.data.augment`).
    augment_by_modality: per-modality overrides of augmentations, entries
      MODALITY:op+op (e.g. XRAY:intensity+gamma+noise keeps chest X-rays
      unflipped); a modality not listed gets augmentations.
    ema_decay: evaluate and report an exponential moving average of the
      global model over rounds with this decay (post-processing of released
      models, free in privacy); 0 = the last model. Default 0.9.
  """

  algorithm: str = "fedavg"
  rounds: int = 30
  # Tuned at equal epsilon per patient (README, "Levers for utility"): one
  # step on an expected 16 patients beats two on 4 at epsilon 1 and 8.
  local_steps: int = 1
  batch_size: int = 16
  learning_rate: float = 0.25
  local_optimizer: str = "sgd"
  server_learning_rate: float = 1.0
  prox_mu: float = 0.01
  sites_per_round: int = 0
  dropout_rate: float = 0.0
  weighting: str = "num_examples"
  augmult: int = 0
  augmentations: tuple[str, ...] = AUGMENTATIONS
  augment_by_modality: tuple[str, ...] = ()
  ema_decay: float = 0.9

  def __post_init__(self):
    _check(self.augmult >= 0, "augmult", "must be >= 0.")
    unknown = [a for a in self.augmentations
               if a not in AUGMENTATIONS]
    _check(not unknown, "augmentations",
           f"unknown {unknown}; choose from {AUGMENTATIONS}.")
    try:
      parse_by_modality(self.augment_by_modality)
    except ValueError as e:
      raise ConfigError(f"--augment_by_modality: {e}") from e
    _check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1).")
    _check(self.algorithm in ALGORITHMS, "algorithm",
           f"must be one of {ALGORITHMS}, got {self.algorithm!r}.")
    _check(self.rounds >= 1, "rounds", "must be >= 1.")
    _check(self.local_steps >= 1, "local_steps", "must be >= 1.")
    _check(self.batch_size >= 1, "batch_size", "must be >= 1.")
    _check(self.learning_rate > 0, "learning_rate", "must be > 0.")
    _check(self.local_optimizer in LOCAL_OPTIMIZERS,
           "local_optimizer", f"must be one of {LOCAL_OPTIMIZERS}.")
    _check(self.server_learning_rate > 0, "server_learning_rate",
           "must be > 0.")
    _check(self.prox_mu >= 0, "prox_mu", "must be >= 0.")
    _check(self.sites_per_round >= 0, "sites_per_round", "must be >= 0.")
    _check(0 <= self.dropout_rate < 1, "dropout_rate", "must be in [0, 1).")
    _check(self.weighting in ("num_examples", "uniform"), "weighting",
           "must be num_examples or uniform.")


@dataclasses.dataclass(frozen=True)
class PerformanceConfig:
  """Settings that change speed and memory only, never a privacy figure.

  Attributes:
    backend: site backend (auto, vmap, map, shard, loop).
    microbatch_size: per-example gradients in chunks (None = all at once);
      only with chunk_size=none.
    local_loop: auto, scan or unroll (see `federated.ClientConfig`).
    chunk_size: work follows the realised Poisson sample: the padded batch
      is computed in chunks of this many slices and the chunks after the
      last sampled unit are skipped (patients' slices are packed first);
      none computes the whole padded capacity; 0 (default) picks it by
      image size (`run.setup.resolve_chunk_size`: 4, and 2 on CPU from
      96x96 pixels per slice up, as measured fastest).
    per_example_grads: how a DP step forms per-unit gradients, the same
      values either way: vmap (jax.vmap of jax.grad) or layers (one batched
      backward pass, each layer's per-example gradient from its input and
      output gradient; needs chunk_size, no augmult) or ghost (the same
      pass, per-slice norms by ghost norms where cheaper and the clipped
      sum by book-keeping; --unit=example only). vmap measured as fast or
      faster on CPU (BENCHMARKS.md). These needs are the federated engine's
      and the segmentation task's: the run is refused at setup, naming
      the flag, before anything is written.
  """

  backend: str = "auto"
  microbatch_size: int | None = None
  local_loop: str = "auto"
  chunk_size: int | None = 0
  per_example_grads: str = "vmap"

  def __post_init__(self):
    _check(self.backend in BACKENDS, "backend",
           f"must be one of {BACKENDS}.")
    _check(self.microbatch_size is None or self.microbatch_size >= 1,
           "microbatch_size", "must be >= 1.")
    _check(self.local_loop in LOCAL_LOOPS, "local_loop",
           f"must be one of {LOCAL_LOOPS}.")
    _check(self.chunk_size is None or self.chunk_size >= 0, "chunk_size",
           "must be >= 1, 0 (by image size) or none (the whole padded "
           "capacity).")
    _check(self.per_example_grads in PER_EXAMPLE_GRADS,
           "per_example_grads",
           f"must be one of {PER_EXAMPLE_GRADS}.")
    _check(self.chunk_size is None or self.microbatch_size is None,
           "microbatch_size", "applies to the full-capacity path only; set "
           "--chunk_size=none with it (chunks already bound the memory).")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """A whole simulation.

  Attributes:
    seed: seed of the model initialisation, and of the data and split
      unless --data_seed is given (public).
    noise_seed: none (the default): every noise, sampling and canary key
      derives from a secret drawn from the operating system when the run
      starts, kept only in its checkpoint directory. An integer: those keys
      derive from it instead, for a reproducible research run; its noise is
      then known to anyone with the seed (its epsilon holds only while the
      seed stays secret) and two runs sharing a noise seed must not both be
      released.
    sweep_member: folded into the model root and a --noise_seed root (a
      sweep's member index, so that no two members share a key); None for a
      plain run.
    eval_every: evaluate on the validation split every k rounds (and at the
      end on the test split).
    checkpoint_every: checkpoint every k rounds (and at the end).
    stop_after_rounds: stop this process after this many rounds of this run
      (as if killed) without writing the final report; for testing resume.
    release_training_diagnostics: also write the training loss and clipped
      fraction over the realised sampled units (and, under site-level DP,
      the realised sampled sites) to the log, CSV and report, un-noised and
      marked NOT COVERED BY THE GUARANTEE. Off by default: these are
      statistics of private training data.
    tensorboard: also write TensorBoard scalars per round into --workdir
      (each site's epsilon, sigma and clip norm, validation Dice, round and
      device seconds: what rounds.csv holds); needs the `tensorboard` extra
      (tensorboardX). View with `tensorboard --logdir=WORKDIR`.
  """

  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  privacy: PrivacyConfig = PrivacyConfig()
  federated: FederatedConfig = FederatedConfig()
  performance: PerformanceConfig = PerformanceConfig()
  seed: int = 0
  noise_seed: int | None = None
  sweep_member: int | None = None
  eval_every: int = 5
  checkpoint_every: int = 5
  stop_after_rounds: int | None = None
  release_training_diagnostics: bool = False
  tensorboard: bool = False

  def __post_init__(self):
    _check(self.eval_every >= 1, "eval_every", "must be >= 1.")
    _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1.")
    _check(self.seed >= 0, "seed", "must be >= 0.")
    _check(self.noise_seed is None or self.noise_seed >= 0, "noise_seed",
           "must be >= 0 or none.")
    _check(self.sweep_member is None or self.sweep_member >= 0,
           "sweep_member", "must be >= 0.")
    if self.privacy.use_site_level and self.federated.algorithm == "fedbn":
      raise ConfigError(
          "--algorithm: fedbn keeps each site's normalisation parameters at "
          "the site, outside the site-level DP mechanism, and evaluating "
          "with them would reveal which sites were sampled; use another "
          "algorithm with site-level DP.")
    if self.data.cohorts and self.privacy.audit:
      raise ConfigError("--audit: not with --num_sites or --stream_sites "
                        "(every site would carry the audit's state); audit a "
                        "run whose sites are all in memory.")
    if self.model.trainable and self.privacy.use_site_level:
      raise ConfigError("--trainable: not with site-level DP (its server "
                        "noise would move the frozen parameters); use "
                        "record-level DP.")
    if self.federated.augmult and self.data.volumes:
      raise ConfigError("--augmult: augmentation is for 2D slices; this run "
                        "trains 3D volumes (--volumes).")
    if self.privacy.use_site_level and (self.data.site_joins
                                        or self.data.site_leaves):
      raise ConfigError("--site_joins/--site_leaves: not with site-level DP "
                        "(its server noise is scaled by a fixed expected "
                        "number of sites); use record-level DP.")
    # In the sites (record-level); at the server (--unit=site) every
    # cohort, rate and dropout is fine: the server's plan draws the groups.
    correlated = (self.privacy.noise_mechanism != "independent"
                  and self.privacy.record_level)
    for used, flag in ((self.federated.sites_per_round, "sites_per_round"),
                       (self.federated.dropout_rate, "dropout_rate"),
                       (self.data.site_joins or self.data.site_leaves,
                        "site_joins/--site_leaves"),
                       (self.data.cohorts, "num_sites/--stream_sites"),
                       (self.privacy.use_site_level
                        and self.privacy.site_sampling_rate < 1,
                        "site_sampling_rate")):
      if correlated and used:
        raise ConfigError(
            f"--{flag}: not with --noise_mechanism="
            f"{self.privacy.noise_mechanism}: its accounting assumes every "
            "site trains in every round (the stream of each site is its "
            "rounds' steps).")
    if self.privacy.use_site_level and self.federated.sites_per_round:
      raise ConfigError("--sites_per_round: with site-level DP, sites are "
                        "Poisson-sampled with --site_sampling_rate; leave "
                        "--sites_per_round at 0.")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @property
  def data_seed(self) -> int:
    """The seed of the data and split (--data_seed, else --seed)."""
    return self.seed if self.data.data_seed is None else self.data.data_seed

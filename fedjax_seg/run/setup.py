"""A run's settings resolved once into its fixed pieces (`Run`).

`setup(config, workdir)` reads the data, plans the noise (`privacy.plan`,
from the sites' public unit counts), builds the model, its initial (or
--init_from) parameters, the segmentation task and the federated trainer,
and the noise root; nothing is written before the data and every setting
are checked. The loop (`run.loop`) then only steps over a `RunState`.
"""

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import federated as fed
from fedjax_seg import models
from fedjax_seg import privacy
from fedjax_seg.data import augment as augment_lib
from fedjax_seg.federated import client as client_lib
from fedjax_seg.privacy import auditing
from fedjax_seg.privacy import plan as privacy_plan
from fedjax_seg.privacy import schedules
from fedjax_seg.run import artifacts
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_syntax
from fedjax_seg.run import data as data_lib
from fedjax_seg.run import init_source as init_source_lib
from fedjax_seg.run import many_sites
from fedjax_seg.run import noise_secret
from fedjax_seg.run import state as state_lib
from fedjax_seg.segmentation import task as segmentation_task

# Pixels per slice from which a chunk of 2 slices beat 4 on CPU: whole
# default rounds (BENCHMARKS.md, "Image size") took 3.00 s with 4 and 3.20 s
# with 2 at 32x32, 9.12 s and 9.94 s at 64x64, 49.1 s and 36.1 s at 128x128.
SMALL_CHUNK_PIXELS = 96 * 96


def resolve_chunk_size(chunk_size: int | None, spatial_shape) -> int | None:
  """--chunk_size, with 0 resolved by the slices' size and the platform:
  4 slices per chunk, or 2 on CPU for slices of SMALL_CHUNK_PIXELS or more
  (their per-example convolutions ran faster in pairs there)."""
  if chunk_size != 0:
    return chunk_size
  if (jax.default_backend() == "cpu"
      and int(np.prod(spatial_shape)) >= SMALL_CHUNK_PIXELS):
    return 2
  return 4


@dataclasses.dataclass
class RunPlan:
  """The run's plan: its noise (`privacy.plan.NoisePlan`) and the host's
  fixed choices beside it (all public)."""

  noise: privacy_plan.NoisePlan
  site_modalities: tuple
  chunk_size: int | None  # --chunk_size resolved (performance only).
  init_source: init_source_lib.InitSource | None = None
  # The prepared dataset's random preparation id (None for the built-in
  # data), read once at setup; the report names it.
  dataset_preparation: str | None = None

  @property
  def site_names(self) -> tuple:
    return self.noise.site_names

  @property
  def unit(self) -> privacy.PrivacyUnit:
    return self.noise.unit

  @property
  def init_source_sha256(self) -> str | None:
    """The composed --init_from source's report digest, or None."""
    source = self.init_source
    return (source.report_sha256 if source is not None
            and source.relation == "composed" else None)

  def to_meta(self) -> dict:
    """What a checkpoint keeps to refuse a resumption that changes it."""
    return dict(self.noise.to_meta(),
                init_source_report_sha256=self.init_source_sha256)


@dataclasses.dataclass
class Run:
  """The fixed pieces of one run (built once by `setup`)."""

  config: config_lib.ExperimentConfig
  workdir: pathlib.Path
  plan: RunPlan
  model: Any
  trainer: Any
  data: data_lib.RunData
  root: jax.Array  # The noise root (secret unless --noise_seed).
  checkpointer: artifacts.Checkpointer

  @property
  def many(self) -> bool:
    """Distributions and a per-site table instead of per-site columns."""
    return len(self.plan.site_names) > many_sites.PER_SITE_OUTPUTS_MAX


def unet_config(model: config_lib.ModelConfig, in_channels: int,
                num_classes: int, spatial_dims: int = 2) -> models.UNetConfig:
  """The U-Net of --model (a preset) with --widths, --norm, --residual,
  --dropout, for data of these channels, classes and dimensions."""
  overrides = dict(in_channels=in_channels, num_classes=num_classes,
                   spatial_dims=spatial_dims, norm=model.norm,
                   residual=model.residual, dropout=model.dropout)
  if model.widths:
    overrides["widths"] = tuple(model.widths)
  return models.preset(model.preset, **overrides)


def named_shape(p: config_lib.PrivacyConfig, rounds: int):
  """The noise schedule's shape, `round -> relative sigma` (a function of the
  public round index)."""
  return schedules.named_shape(p.noise_schedule, rounds,
                               end_factor=p.schedule_end_factor,
                               decay_rate=p.schedule_decay_rate)


def _adaptive(p: config_lib.PrivacyConfig):
  if p.adaptive_clipping == "off":
    return None
  return privacy_plan.AdaptiveSettings(
      mode=p.adaptive_clipping, target_quantile=p.target_quantile,
      learning_rate=(p.clip_learning_rate
                     if p.adaptive_clipping == "geometric" else 1.0),
      count_noise_multiplier=p.count_noise_multiplier)


def make_plan(config: config_lib.ExperimentConfig, counts, spatial_shape,
              scenario=None,
              source: init_source_lib.InitSource | None = None,
              dataset_preparation: str | None = None) -> RunPlan:
  """The run's plan from the sites' public counts (`SiteArrays` or
  `SiteCounts`) and the examples' spatial shape; raises ConfigError naming
  the flag."""
  p, f, d = config.privacy, config.federated, config.data
  unit = privacy.PrivacyUnit(p.unit)
  units = np.asarray(counts.num_patients if unit is privacy.PrivacyUnit.PATIENT
                     else counts.num_examples, np.int64)
  names = tuple(counts.site_names)
  empty = [names[k] for k in np.flatnonzero(units == 0)]
  if empty:
    raise config_lib.ConfigError(
        f"--split_fractions: sites {empty} have no training data.")
  if f.batch_size > units.max():
    what = ("patients" if unit is privacy.PrivacyUnit.PATIENT else "slices")
    raise config_lib.ConfigError(
        f"--batch_size={f.batch_size}: more than the largest site's "
        f"{int(units.max())} training {what} "
        f"({names[int(units.argmax())]}); lower --batch_size.")
  unknown = set(d.held_out_sites) - set(names)
  if unknown:
    raise config_lib.ConfigError(f"--held_out_sites: unknown sites "
                                 f"{sorted(unknown)}.")
  training = np.array([s not in set(d.held_out_sites) for s in names])
  by_modality = config_syntax.parse_by_modality(f.augment_by_modality)
  unknown = set(by_modality) - {m.upper() for m in counts.site_modalities}
  if unknown:
    raise config_lib.ConfigError(
        f"--augment_by_modality: no site has modality {sorted(unknown)} "
        f"(modalities: {sorted(set(counts.site_modalities))}).")
  active = None if scenario is None else scenario.active
  if active is not None:
    idle = np.flatnonzero(~(active & training[None, :]).any(axis=1))
    if idle.size:
      raise config_lib.ConfigError(
          f"--site_joins/--site_leaves/--held_out_sites: no training site is "
          f"in the federation in round {int(idle[0]) + 1}.")
  shape = named_shape(p, f.rounds)
  prior = source.prior_events if source is not None else {}
  try:
    noise = privacy_plan.plan_noise(
        site_names=names, units=units, batch_size=f.batch_size,
        local_steps=f.local_steps, rounds=f.rounds, schedule_shape=shape,
        delta=p.delta, unit=p.unit,
        record_level=p.record_level, noise_multiplier=p.noise_multiplier,
        target_epsilon=p.target_epsilon if p.enabled else None,
        windows=None if scenario is None else scenario.active_windows(),
        training_sites=training, active=active, l2_clip_norm=p.l2_clip_norm,
        adaptive=_adaptive(p) if p.record_level else None,
        use_site_level=p.use_site_level,
        site_noise_multiplier=p.site_noise_multiplier,
        site_sampling_rate=p.site_sampling_rate,
        site_clip_norm=p.site_clip_norm,
        site_adaptive=None if p.record_level else _adaptive(p),
        prior_events=prior,
        prior_site_level_events=(source.prior_site_level_events
                                 if source is not None else {}),
        mechanism=p.noise_mechanism if p.record_level else "independent",
        mf_bands=p.mf_bands, blt_max_buffers=p.blt_max_buffers,
        site_mechanism=("independent" if p.record_level
                        else p.noise_mechanism),
        site_target_epsilon=p.site_target_epsilon)
  except ValueError as e:
    target = ("--site_target_epsilon" if p.site_target_epsilon is not None
              and not p.record_level else "--target_epsilon")
    if prior:
      raise config_lib.ConfigError(
          f"--init_from/{target}: {e} (spent by the --init_from run "
          f"on this run's patients); raise {target}.") from e
    if str(e).startswith("--"):  # The plan named the flag.
      raise config_lib.ConfigError(str(e)) from e
    raise config_lib.ConfigError(
        f"{target}/--delta/--noise_schedule/--noise_mechanism: cannot "
        f"plan the noise: {e}") from e
  if prior and p.enabled and p.epsilon_budget is not None:
    spent = noise.prior_epsilon_at_least(p.epsilon_budget)
    if spent is not None:
      raise config_lib.ConfigError(
          f"--epsilon_budget={p.epsilon_budget}: the --init_from run "
          f"already spent {spent[1]:.4f} at site {spent[0]!r} on this run's "
          "patients; raise the budget.")
  return RunPlan(noise, tuple(counts.site_modalities),
                 chunk_size=resolve_chunk_size(config.performance.chunk_size,
                                               spatial_shape),
                 init_source=source, dataset_preparation=dataset_preparation)


def audit_config(config: config_lib.ExperimentConfig,
                 plan: RunPlan) -> auditing.AuditConfig | None:
  """The canary audit's settings for `--audit` (None without it)."""
  p = config.privacy
  if not p.audit:
    return None
  names = list(plan.site_names)
  training = [s for s, t in zip(names, plan.noise.training_sites) if t]
  site = p.audit_site or training[0]
  if site not in training:
    raise config_lib.ConfigError(
        f"--audit_site: {site!r} is not a training site (training sites: "
        f"{training}).")
  k = names.index(site)
  return auditing.AuditConfig(
      num_canaries=p.audit_canaries, kind=p.audit_canary_kind, site=k,
      max_per_step=auditing.canary_capacity(
          p.audit_canaries, float(plan.noise.sampling_rates[k])))


def make_task(config, model, plan: RunPlan):
  """The segmentation task: the loss, per-example gradients, augmentation
  (--augmult with --augmentations, per modality with
  --augment_by_modality)."""
  f = config.federated
  by_modality = config_syntax.parse_by_modality(f.augment_by_modality)
  augment = augment_lib.AugmentConfig(augmentations=f.augmentations)
  table = None
  if by_modality:
    table = augment_lib.ops_table(plan.site_modalities, f.augmentations,
                                  by_modality)
    augment = augment_lib.AugmentConfig(augmentations=tuple(
        op for i, op in enumerate(augment_lib.AUGMENTATIONS)
        if any(row[i] for row in table)))
  return segmentation_task.task(model, augmult=f.augmult, augment=augment,
                                augment_per_site=table)


def trainer_settings(config, plan: RunPlan, params) -> dict:
  """The FederatedTrainer's settings (all but the task)."""
  p, f, perf = config.privacy, config.federated, config.performance
  noise = plan.noise
  local_dp = client_lib.LocalDPConfig(
      enabled=p.record_level,
      unit=(plan.unit.value if plan.unit is not privacy.PrivacyUnit.SITE
            else privacy.PrivacyUnit.EXAMPLE.value),
      l2_clip_norm=p.l2_clip_norm, adaptive_clipping=noise.adaptive,
      audit=audit_config(config, plan),
      noise_stream=(noise.mechanism.stream if noise.mechanism else None))
  client = fed.ClientConfig(
      local_steps=f.local_steps, expected_batch_size=f.batch_size,
      max_batch_size=noise.max_batch_size, learning_rate=f.learning_rate,
      optimizer=f.local_optimizer,
      prox_mu=f.prox_mu if f.algorithm == "fedprox" else 0.0,
      microbatch_size=perf.microbatch_size, local_loop=perf.local_loop,
      chunk_size=plan.chunk_size, per_example_grads=perf.per_example_grads)
  optimizer = {"fedavg": "fedavg", "fedprox": "fedavg", "fedbn": "fedavg",
               "fedavgm": "fedavgm", "fedadam": "fedadam",
               "fedyogi": "fedyogi"}[f.algorithm]
  server = fed.ServerConfig(optimizer=optimizer,
                            learning_rate=f.server_learning_rate,
                            weighting=f.weighting)
  site_dp = None
  if p.use_site_level:
    site_dp = fed.SiteLevelDPConfig(
        l2_clip_norm=p.site_clip_norm,
        noise_multiplier=noise.site_applied_sigma,
        expected_sites=noise.expected_sites,
        adaptive_clipping=noise.site_adaptive,
        noise_strategy=(None if noise.site_mechanism is None
                        else noise.site_mechanism.strategies[0]))
  norm_mask = models.norm_param_mask(params) if f.algorithm == "fedbn" else None
  trainable = (models.trainable_mask(params, config.model.trainable)
               if config.model.trainable else None)
  return dict(client=client, local_dp=local_dp, server=server, site_dp=site_dp,
              norm_mask=norm_mask, backend=perf.backend,
              trainable_mask=trainable)


def trainer_signature(config, plan: RunPlan, params) -> tuple:
  """The trainer's static settings, without the values every round reads as
  arrays (`round.round_arrays`: clip norm, learning rates; sigmas always
  are).

  Runs with equal signatures compute the same program and can share one
  `FederatedTrainer` (one compilation), e.g. sweep members that differ in
  noise schedule, target epsilon, clip norm, learning rates or seed.
  """
  t = trainer_settings(config, plan, params)
  client = dataclasses.replace(t["client"], learning_rate=1.0)
  local_dp = dataclasses.replace(t["local_dp"], l2_clip_norm=1.0)
  server = dataclasses.replace(t["server"], learning_rate=1.0)
  mask = None if t["norm_mask"] is None else str(t["norm_mask"])
  f = config.federated
  # The model and the task's settings too: the shared trainer's task is
  # built from the first member's.
  return (config.model, client, local_dp, server, t["site_dp"], mask,
          t["backend"], f.augmult, f.augmentations, f.augment_by_modality)


def _trainer(config, model, plan: RunPlan, params):
  """The federated trainer; an engine refusal of a setting (e.g.
  --per_example_grads that the task or --chunk_size do not allow) names the
  flag, which is named like the engine's setting."""
  try:
    return fed.FederatedTrainer(make_task(config, model, plan),
                                **trainer_settings(config, plan, params))
  except fed.SettingError as e:
    raise config_lib.ConfigError(f"--{e}") from e


def pretrained_params(source: init_source_lib.InitSource, like):
  """The --init_from run's evaluated model (its EMA if it kept one, else
  its final global model) from its latest checkpoint, checked against this
  run's parameter shapes and against the digest its report gives."""
  flag = f"--init_from={source.workdir}"
  try:
    params, rounds = artifacts.restore_evaluated(
        pathlib.Path(source.workdir), source.config.federated.ema_decay, like)
  except artifacts.RunDirError as e:
    raise config_lib.ConfigError(f"{flag}: {e}") from e
  if rounds == 0:
    raise config_lib.ConfigError(f"{flag}: that run has no completed round.")
  if source.params_sha256 and artifacts.params_digest(
      params) != source.params_sha256:
    raise config_lib.ConfigError(
        f"{flag}: its latest checkpoint's model is not the one its "
        f"{artifacts.REPORT} describes (params sha256 differs); was it "
        "resumed or rerun since?")
  return jax.tree.map(jnp.asarray, params)


def setup(config, workdir: pathlib.Path, splits=None,
          trainers: dict | None = None) -> tuple[Run, Any]:
  """Loads data (unless `splits` are given), plans the noise, builds model,
  task and trainer (taken from, or added to, `trainers`, keyed by
  `trainer_signature`, when given); writes nothing before the data and
  settings are checked. Returns (run, initial params)."""
  data = data_lib.prepare(config, splits)
  train = data.train
  preparation = init_source_lib.dataset_preparation(config.data)
  plan = make_plan(config, data.counts, train.image.shape[2:-1],
                   data.scenario,
                   init_source_lib.read(config, data.counts.site_names,
                                        preparation),
                   preparation)
  model = models.SegmentationModel(unet_config(
      config.model, in_channels=train.image.shape[-1],
      num_classes=len(train.class_names), spatial_dims=train.image.ndim - 3))
  init_key = privacy.derive_key(noise_secret.model_root(config),
                                round_index=0, site=0, step=0,
                                purpose=privacy.Purpose.MODEL_INIT)
  params = model.init(init_key, (1,) + train.image.shape[2:])
  if plan.init_source is not None:
    params = pretrained_params(plan.init_source, params)
  if config.privacy.record_level:
    # Per-example clipping is only valid for models that do not mix examples.
    probe = jnp.asarray(train.image[0, :min(3, int(train.num_examples[0]))])
    if probe.shape[0] >= 2:
      models.check_per_example_independence(jax.jit(model.apply), params,
                                            probe)
  if trainers is None:
    trainer = _trainer(config, model, plan, params)
  else:
    signature = trainer_signature(config, plan, params)
    if signature not in trainers:
      trainers[signature] = _trainer(config, model, plan, params)
    trainer = trainers[signature]
  workdir.mkdir(parents=True, exist_ok=True)
  # Last, once everything is checked: a new run's secret is written now,
  # before its first round.
  root = noise_secret.noise_root(
      config, workdir / artifacts.CHECKPOINTS,
      record={"config": config.to_dict(), "noise_plan": plan.to_meta()},
      check_reuse=lambda stored: state_lib.check_same_run(stored, plan,
                                                          config, workdir))
  run = Run(config, workdir, plan, model, trainer, data, root,
            artifacts.Checkpointer(workdir))
  return run, params

"""The host loop: sample -> round -> account -> evaluate -> checkpoint -> log.

`train_and_evaluate(config, workdir)` runs a whole simulation and writes, in
`workdir`: report.json, rounds.csv, plots (PNG) and orbax checkpoints. A run
resumes from its latest checkpoint and then continues bit-identically: every
key of the mechanism is derived from the run's noise root (a secret kept in
its checkpoint directory, or --noise_seed; `noise_secret`) along (round,
site, step, purpose), the model's initialisation from --seed, the data and
splits are deterministic, and the checkpoint holds the params, the
server and site states (optimizer, adaptive clipping, FedBN parameters), the
privacy ledgers and the history.
"""

import csv
import dataclasses
import hashlib
import io
import json
import logging as pylogging
import math
import os
import pathlib
import platform
import sys
import time
import warnings
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg import centralized
from fedjax_seg import config as config_lib
from fedjax_seg import distributed
from fedjax_seg import federated as fed
from fedjax_seg import init_source as init_source_lib
from fedjax_seg import many_sites
from fedjax_seg import models
from fedjax_seg import noise_secret
from fedjax_seg import privacy
from fedjax_seg import scenarios as scenarios_lib
from fedjax_seg import segmentation_task
from fedjax_seg.data import augment as augment_lib
from fedjax_seg.data import consortium as consortium_lib
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.data import synthetic
from fedjax_seg.federated import client as client_lib
from fedjax_seg.privacy import auditing
from fedjax_seg.privacy import schedules

REPORT = "report.json"
ROUNDS_CSV = "rounds.csv"
SITES_CSV = "sites.csv"  # With more than many_sites.PER_SITE_OUTPUTS_MAX sites.
CHECKPOINTS = "checkpoints"
# Settings that may change between a run and its resumption; any other change
# would make the resumed run a different experiment (and its ledger wrong).
_RESUMABLE_CHANGES = ("performance", "eval_every", "checkpoint_every",
                      "stop_after_rounds", "release_training_diagnostics")
# History rows keep un-noised training diagnostics (only with
# --release_training_diagnostics) under this key.
NOT_COVERED_KEY = "NOT_COVERED_BY_THE_GUARANTEE"
DIAGNOSTICS_WARNING = (
    "NOT COVERED BY THE GUARANTEE: --release_training_diagnostics wrote the "
    "training loss and the clipped fraction over the realised sampled units "
    "(and, under site-level DP, the realised sampled sites), computed from "
    "private training data without noise.")
# The report's and README's one sentence on public site sizes.
SITE_SIZES_ASSUMPTION = (
    "each site's number of training units N_k is public (it sets the "
    "sampling rate q_k, the noise multiplier and the FedAvg weights, and "
    "this report gives it); the epsilons are for adding or removing one "
    "unit, so against an adversary who knows N_k and that one unit was "
    "replaced rather than added or removed, the loss is up to about twice "
    "epsilon (add/remove composed with remove/add).")
# PLD discretisation of the report's epsilons (the verifier uses the same).
# 1e-3 gives a valid (pessimistic) bound within about 1e-5 of 1e-4's on the
# default run, ten times faster (10 s per distinct event at 1e-4).
PLD_DISCRETIZATION = 1e-3


class _DropRdpConvergenceWarnings(pylogging.Filter):
  """dp_accounting warns, once per order and event, when a fractional-order
  series does not converge and it drops that order (the bound stays valid,
  slightly looser); at one event per site per round that floods the log."""

  def filter(self, record):
    return not (record.filename == "rdp_privacy_accountant.py"
                and "failed to converge" in record.getMessage())


pylogging.getLogger("absl").addFilter(_DropRdpConvergenceWarnings())


def atomic_write(path: pathlib.Path, data: bytes) -> None:
  """Writes `data` to a temp file beside `path`, then renames it."""
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  tmp.write_bytes(data)
  os.replace(tmp, path)


def enable_compilation_cache() -> str:
  """Turns on JAX's persistent compilation cache (shared by all runs)."""
  path = os.environ.get("FEDJAX_SEG_COMPILATION_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "fedjax_seg", "jax")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  return path


def synthetic_config(config: config_lib.DataConfig,
                     seed: int) -> synthetic.SyntheticConfig:
  return synthetic.SyntheticConfig(
      image_size=config.image_size, num_slices=config.num_slices,
      patients_scale=config.patients_scale, seed=seed)


def load_data(config: config_lib.DataConfig, seed: int,
              synthetic_override: synthetic.SyntheticConfig | None = None):
  """{"train", "val", "test"}: SliceDatasets split by patient (for the
  built-in data, of `synthetic_override` when given)."""
  if config.dataset == "synthetic":
    make = synthetic.generate_volumes if config.volumes else synthetic.generate
    data = make(synthetic_override or synthetic_config(config, seed))
    return sites_lib.split_by_patient(data, config.split_fractions, seed)
  _check_prepared(config)
  return sites_lib.load_splits(config.dataset, config.data_dir,
                               config.split_fractions, seed)


def _check_prepared(config: config_lib.DataConfig) -> None:
  path = pathlib.Path(config.data_dir) / config.dataset
  if not path.is_dir():
    raise config_lib.ConfigError(
        f"--dataset: {config.dataset!r} not found in --data_dir="
        f"{config.data_dir} (prepare it with python -m data_prep.prepare).")


def noise_shape(config: config_lib.PrivacyConfig, rounds: int):
  """Relative sigma per round (a function of the public round index)."""
  end = config.schedule_end_factor
  if config.noise_schedule == "constant":
    return schedules.constant_schedule(1.0)
  if config.noise_schedule == "linear":
    return schedules.linear_schedule(1.0, end, max(rounds - 1, 1))
  if config.noise_schedule == "exponential":
    return schedules.exponential_decay(1.0, config.schedule_decay_rate, 1)
  if config.noise_schedule == "cosine":
    return schedules.cosine_decay_schedule(1.0, max(rounds - 1, 1), alpha=end)
  return schedules.step_schedule(1.0, {max(rounds // 2, 1): end})


def _f32(x) -> float:
  """The float32 value a device applies and reports back, as a float."""
  return float(np.float32(x))


@dataclasses.dataclass
class _Plan:
  """Everything fixed for the whole run, derived from config and data only.

  Every value here is public: it depends on the configuration and on the
  per-site unit counts (public by the report's stated assumption), never on
  the content of the data.
  """

  unit: privacy.PrivacyUnit
  site_names: tuple
  units: np.ndarray  # [S] N_k in privacy units (examples or patients).
  sampling_rates: np.ndarray  # [S] q_k.
  max_batch_size: int
  base_sigma: np.ndarray  # [S] accounted sigma before the schedule.
  accounted_sigma: np.ndarray  # [rounds, S] accounted sigma of each round.
  applied_sigma: np.ndarray  # [rounds, S] gradient sigma (adaptive: raised).
  recorded_sigma: np.ndarray  # [rounds, S] what the ledger records (float32).
  adaptive: privacy.AdaptiveClipping | None  # record-level
  site_adaptive: privacy.AdaptiveClipping | None  # site-level
  site_applied_sigma: float  # z of the server noise (float32).
  site_recorded_sigma: float  # what the site-level ledger records.
  training_sites: np.ndarray  # [S] bool (held-out sites excluded).
  site_modalities: tuple = ()  # [S] modality names (public).
  # [rounds, S] bool: the site is in the federation that round (scenarios
  # with joins and leaves); None without a scenario.
  active: np.ndarray | None = None
  # Slices per chunk of a DP step (--chunk_size resolved; performance only).
  chunk_size: int | None = 4
  # --init_from's source (its relation and, when composed, its events).
  init_source: init_source_lib.InitSource | None = None

  def to_meta(self) -> dict:
    """What a checkpoint keeps to refuse a resumption that changes it."""
    count = lambda ac: None if ac is None else ac.count_noise_multiplier
    return {"recorded_sigma": self.recorded_sigma.tolist(),
            "applied_sigma": np.vectorize(_f32)(self.applied_sigma).tolist(),
            "site_recorded_sigma": self.site_recorded_sigma,
            "site_applied_sigma": self.site_applied_sigma,
            "count_noise_multiplier": count(self.adaptive),
            "site_count_noise_multiplier": count(self.site_adaptive),
            # A composed --init_from source: its events are in the ledger.
            "init_source_report_sha256": (
                None if self.init_source is None
                or self.init_source.relation != "composed"
                else self.init_source.report_sha256)}


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


def _record_level_adaptive(config, largest_sigma):
  p, f = config.privacy, config.federated
  if p.adaptive_clipping == "off" or not p.record_level:
    return None
  return _adaptive_clipping(p, p.l2_clip_norm, f.batch_size, largest_sigma)


def _adaptive_clipping(p: config_lib.PrivacyConfig, initial: float,
                       expected: float, largest_sigma: float):
  kwargs = dict(initial_l2_clip_norm=initial,
                target_quantile=p.target_quantile, expected_batch_size=expected,
                learning_rate=(p.clip_learning_rate
                               if p.adaptive_clipping == "geometric" else 1.0),
                mode=p.adaptive_clipping)
  if p.count_noise_multiplier:
    adaptive = privacy.AdaptiveClipping(
        count_noise_multiplier=p.count_noise_multiplier, **kwargs)
  else:
    # The default count noise raises the gradient noise by 10% for the
    # largest sigma of the run (less for every other site and round).
    adaptive = privacy.AdaptiveClipping.with_noise_overhead(
        noise_multiplier=largest_sigma, overhead=0.1, **kwargs)
  # The device draws the count noise in float32: account that value.
  return dataclasses.replace(
      adaptive, count_noise_multiplier=_f32(adaptive.count_noise_multiplier))


def _plan(config: config_lib.ExperimentConfig, train: sites_lib.SiteArrays,
          scenario: scenarios_lib.Scenario | None = None,
          source: init_source_lib.InitSource | None = None):
  p, f = config.privacy, config.federated
  unit = privacy.PrivacyUnit(p.unit)
  units = np.asarray(train.num_patients if unit is privacy.PrivacyUnit.PATIENT
                     else train.num_examples, np.int64)
  empty = [train.site_names[k] for k in np.flatnonzero(units == 0)]
  if empty:
    raise config_lib.ConfigError(
        f"--split_fractions: sites {empty} have no training data.")
  if f.batch_size > units.max():
    raise config_lib.ConfigError(
        f"--batch_size={f.batch_size}: more than the largest site's "
        f"{int(units.max())} training {'patients' if unit is privacy.PrivacyUnit.PATIENT else 'slices'} "
        f"({train.site_names[int(units.argmax())]}); lower --batch_size.")
  rates = np.minimum(1.0, f.batch_size / units)
  max_batch = max(fed.max_batch_size_for(int(n), float(q))
                  for n, q in zip(units, rates))
  rounds = f.rounds
  shape = noise_shape(p, rounds)
  round_shape = schedules.evaluate(shape, rounds)  # [rounds] float64
  windows = (np.tile([0, rounds], (len(units), 1)) if scenario is None
             else scenario.active_windows())
  if p.record_level and p.target_epsilon is not None:
    # Each site is calibrated for the rounds it is in the federation (all of
    # them, unless it joins late or leaves early), with the schedule's
    # values of those rounds.
    sigmas = {}
    # A composed --init_from source: each site's calibration aims at the
    # total of the source's events and this run's.
    prior = source.prior_events if source is not None else {}
    for first, end in sorted({tuple(w) for w in windows.tolist()}):
      members = [k for k in range(len(units))
                 if tuple(windows[k]) == (first, end)]
      window_shape = (shape if first == 0 else
                      (lambda r, first=first: shape(r + first)))
      try:
        sigmas.update(privacy.calibrate_site_noise_multipliers(
            p.target_epsilon, p.delta,
            site_sizes={train.site_names[k]: int(units[k]) for k in members},
            batch_size=f.batch_size, steps=(end - first) * f.local_steps,
            schedule=schedules.per_round(window_shape, f.local_steps),
            max_batch_size=max_batch, steps_per_event=f.local_steps,
            prior_events=prior))
      except ValueError as e:
        if not prior:
          raise
        raise config_lib.ConfigError(
            f"--init_from/--target_epsilon: {e} (spent by the --init_from "
            f"run on this run's patients); raise --target_epsilon.") from e
    base = np.array([sigmas[s] for s in train.site_names])
  else:
    base = np.full(len(units), p.noise_multiplier if p.record_level else 0.0)
  if source is not None and p.enabled and p.epsilon_budget is not None:
    _check_budget_left(config, source, train.site_names)
  held = set(config.data.held_out_sites)
  unknown = held - set(train.site_names)
  if unknown:
    raise config_lib.ConfigError(f"--held_out_sites: unknown sites "
                                 f"{sorted(unknown)}.")
  training = np.array([s not in held for s in train.site_names])
  accounted = round_shape[:, None] * base[None, :]
  # The count release must cost less than every site's total noise: size it
  # from the largest sigma any site will use.
  adaptive = _record_level_adaptive(config, float(accounted.max()) or 1.0)
  if adaptive is None:
    applied = accounted
    recorded = np.vectorize(_f32)(accounted)
  else:
    applied = np.vectorize(lambda z: adaptive.gradient_noise_multiplier(z)
                           if z > 0 else 0.0)(accounted)
    recorded = np.vectorize(
        lambda z: adaptive.accounted_noise_multiplier(_f32(z)))(applied)
  site_adaptive = None
  site_applied = site_recorded = 0.0
  if p.use_site_level:
    z = p.site_noise_multiplier
    if p.adaptive_clipping != "off" and not p.record_level:
      site_adaptive = _adaptive_clipping(
          p, p.site_clip_norm, p.site_sampling_rate * int(training.sum()),
          z or 1.0)
      site_applied = _f32(site_adaptive.gradient_noise_multiplier(z))
      site_recorded = site_adaptive.accounted_noise_multiplier(site_applied)
    else:
      site_applied = site_recorded = _f32(z)
  by_modality = augment_lib.parse_by_modality(f.augment_by_modality)
  unknown = set(by_modality) - {m.upper() for m in train.site_modalities}
  if unknown:
    raise config_lib.ConfigError(
        f"--augment_by_modality: no site has modality {sorted(unknown)} "
        f"(modalities: {sorted(set(train.site_modalities))}).")
  active = None if scenario is None else scenario.active
  if active is not None:
    idle = np.flatnonzero(~(active & training[None, :]).any(axis=1))
    if idle.size:
      raise config_lib.ConfigError(
          f"--site_joins/--site_leaves/--held_out_sites: no training site is "
          f"in the federation in round {int(idle[0]) + 1}.")
  return _Plan(unit, train.site_names, units, rates, max_batch, base,
               accounted, applied, recorded.astype(np.float64), adaptive,
               site_adaptive, site_applied, site_recorded, training,
               tuple(train.site_modalities), active, init_source=source)


def _check_budget_left(config, source: init_source_lib.InitSource,
                       site_names) -> None:
  """Refuses --epsilon_budget at or below what a composed --init_from
  source already spent at some site (the run could not train a round)."""
  p = config.privacy
  for prior, unit in ((source.prior_events, init_source_lib.main_unit(config)),
                      (source.prior_site_level_events,
                       privacy.PrivacyUnit.SITE.value)):
    if not prior:
      continue
    ledger = privacy.PrivacyLedger(list(site_names), delta=p.delta, unit=unit)
    for site, events in prior.items():
      spent = ledger.epsilon_if(site, events)
      if spent >= p.epsilon_budget:
        raise config_lib.ConfigError(
            f"--epsilon_budget={p.epsilon_budget}: the --init_from run "
            f"already spent {spent:.4f} at site {site!r} on this run's "
            "patients; raise the budget.")


def audit_config(config: config_lib.ExperimentConfig,
                 plan: _Plan) -> auditing.AuditConfig | None:
  """The canary audit's settings for `--audit` (None without it)."""
  p = config.privacy
  if not p.audit:
    return None
  names = list(plan.site_names)
  training = [s for s, t in zip(names, plan.training_sites) if t]
  site = p.audit_site or training[0]
  if site not in training:
    raise config_lib.ConfigError(
        f"--audit_site: {site!r} is not a training site (training sites: "
        f"{training}).")
  k = names.index(site)
  return auditing.AuditConfig(
      num_canaries=p.audit_canaries, kind=p.audit_canary_kind, site=k,
      max_per_step=auditing.canary_capacity(p.audit_canaries,
                                            float(plan.sampling_rates[k])))


def _augment_settings(f: config_lib.FederatedConfig, plan: _Plan) -> dict:
  """ClientConfig's augment and augment_per_site (by modality)."""
  by_modality = augment_lib.parse_by_modality(f.augment_by_modality)
  if not by_modality:
    return dict(augment=augment_lib.AugmentConfig(
        augmentations=f.augmentations))
  table = augment_lib.ops_table(plan.site_modalities, f.augmentations,
                                by_modality)
  used = tuple(op for i, op in enumerate(augment_lib.AUGMENTATIONS)
               if any(row[i] for row in table))
  return dict(augment=augment_lib.AugmentConfig(augmentations=used),
              augment_per_site=table)


def _trainer_settings(config, plan, params) -> dict:
  """The FederatedTrainer's settings (all but the loss)."""
  p, f, perf = config.privacy, config.federated, config.performance
  local_dp = client_lib.LocalDPConfig(
      enabled=p.record_level,
      unit=(plan.unit.value if plan.unit is not privacy.PrivacyUnit.SITE
            else privacy.PrivacyUnit.EXAMPLE.value),
      l2_clip_norm=p.l2_clip_norm, adaptive_clipping=plan.adaptive,
      audit=audit_config(config, plan))
  client = fed.ClientConfig(
      local_steps=f.local_steps, expected_batch_size=f.batch_size,
      max_batch_size=plan.max_batch_size, learning_rate=f.learning_rate,
      optimizer=f.local_optimizer,
      prox_mu=f.prox_mu if f.algorithm == "fedprox" else 0.0,
      microbatch_size=perf.microbatch_size, local_loop=perf.local_loop,
      chunk_size=plan.chunk_size, augmult=f.augmult,
      per_example_grads=perf.per_example_grads,
      **_augment_settings(f, plan))
  optimizer = {"fedavg": "fedavg", "fedprox": "fedavg", "fedbn": "fedavg",
               "fedavgm": "fedavgm", "fedadam": "fedadam",
               "fedyogi": "fedyogi"}[f.algorithm]
  server = fed.ServerConfig(optimizer=optimizer,
                            learning_rate=f.server_learning_rate,
                            weighting=f.weighting)
  site_dp = None
  if p.use_site_level:
    site_dp = fed.SiteLevelDPConfig(
        l2_clip_norm=p.site_clip_norm, noise_multiplier=plan.site_applied_sigma,
        expected_sites=p.site_sampling_rate * int(plan.training_sites.sum()),
        adaptive_clipping=plan.site_adaptive)
  norm_mask = models.norm_param_mask(params) if f.algorithm == "fedbn" else None
  trainable = (models.trainable_mask(params, config.model.trainable)
               if config.model.trainable else None)
  return dict(client=client, local_dp=local_dp, server=server, site_dp=site_dp,
              norm_mask=norm_mask, backend=perf.backend,
              trainable_mask=trainable)


def trainer_signature(config, plan, params) -> tuple:
  """The trainer's static settings, without the values every round reads as
  arrays (`round_arrays`: clip norm, learning rates; sigmas always are).

  Runs with equal signatures compute the same program and can share one
  `FederatedTrainer` (one compilation), e.g. sweep members that differ in
  noise schedule, target epsilon, clip norm, learning rates or seed.
  """
  t = _trainer_settings(config, plan, params)
  client = dataclasses.replace(t["client"], learning_rate=1.0)
  local_dp = dataclasses.replace(t["local_dp"], l2_clip_norm=1.0)
  server = dataclasses.replace(t["server"], learning_rate=1.0)
  mask = None if t["norm_mask"] is None else str(t["norm_mask"])
  # The model too: the shared trainer's loss is built from the first
  # member's model.
  return (config.model, client, local_dp, server, t["site_dp"], mask,
          t["backend"])


def _trainer(config, model, plan, params):
  return fed.FederatedTrainer(segmentation_task.example_loss(model),
                              **_trainer_settings(config, plan, params))


def _participants(config, plan, root, round_index):
  p, f = config.privacy, config.federated
  num_sites = len(plan.site_names)
  # Training sites, and with a scenario those in the federation this round.
  eligible = plan.training_sites if plan.active is None else (
      plan.active[round_index] & plan.training_sites)
  if p.use_site_level:
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=p.site_sampling_rate,
                                   dropout_rate=f.dropout_rate)
  elif f.sites_per_round and plan.active is not None:
    # A scenario: the cohort is drawn among the sites in the federation
    # this round (from the noise root and round alone).
    members = np.flatnonzero(eligible)
    chosen = fed.sample_participants(
        root, round_index, len(members),
        num_per_round=min(f.sites_per_round, len(members)),
        dropout_rate=f.dropout_rate)
    part = np.zeros(num_sites, bool)
    part[members[chosen]] = True
  elif f.sites_per_round:
    part = fed.sample_participants(
        root, round_index, num_sites,
        num_per_round=min(f.sites_per_round, num_sites),
        dropout_rate=f.dropout_rate)
  elif f.dropout_rate:
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=1.0,
                                   dropout_rate=f.dropout_rate)
  else:
    part = np.ones(num_sites, bool)
  return part & eligible


def _versions() -> dict:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import fedjax_seg  # pylint: disable=g-import-not-at-top
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return {"fedjax_seg": fedjax_seg.__version__, "jax": jax.__version__,
          "jaxlib": metadata.version("jaxlib"), "flax": flax.__version__,
          "optax": optax.__version__,
          "dp_accounting": metadata.version("dp-accounting"),
          "jax_privacy": metadata.version("jax-privacy"),
          "numpy": np.__version__, "python": sys.version.split()[0]}


class _Checkpointer:
  """Orbax CheckpointManager behind two calls: save and restore."""

  def __init__(self, workdir: pathlib.Path):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self._manager = ocp.CheckpointManager(
        (workdir / CHECKPOINTS).absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))

  def latest(self):
    return self._manager.latest_step()

  # The state is saved and restored as host (numpy) arrays: every host holds
  # all of it (rounds gather their results to every host), and orbax refuses
  # host-local jax.Arrays (e.g. the EMA, updated on each host's own device)
  # over several processes, while numpy arrays are written once.

  def save(self, step: int, state, meta: dict) -> None:
    ocp = self._ocp
    with _quiet():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(jax.device_get(state)),
          meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()

  def restore(self, step: int, target):
    ocp = self._ocp
    with _quiet():
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(jax.device_get(target)),
          meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


class _quiet:  # pylint: disable=invalid-name
  """Orbax logs every file operation at INFO: keep the round log readable."""

  def __enter__(self):
    self._level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)

  def __exit__(self, *exc):
    logging.set_verbosity(self._level)


# Fields added after runs were checkpointed whose default has changed since:
# a checkpoint without the field ran with this value (its behaviour then).
_VALUE_BEFORE_THE_FIELD = {("federated", "ema_decay"): 0.0}


def _comparable(config_dict: dict) -> dict:
  # Through the config class, so that a checkpoint written before a field
  # existed compares with the behaviour it had: the field's value then
  # (_VALUE_BEFORE_THE_FIELD), else its default.
  from fedjax_seg import config_flags  # pylint: disable=g-import-not-at-top
  config_dict = json.loads(json.dumps(config_dict))
  for (section, name), value in _VALUE_BEFORE_THE_FIELD.items():
    if isinstance(config_dict.get(section), dict):
      config_dict[section].setdefault(name, value)
  try:
    config_dict = config_flags.config_from_dict(config_dict).to_dict()
  except (config_lib.ConfigError, KeyError, TypeError):
    pass  # Compared as stored (and so refused if it differs).
  d = json.loads(json.dumps(config_dict))
  for key in _RESUMABLE_CHANGES:
    d.pop(key, None)
  # --rounds may change on resume only when the noise already planned for
  # the completed rounds stays the same (checked against the checkpoint).
  d.get("federated", {}).pop("rounds", None)
  return d


@dataclasses.dataclass
class RunState:
  """Everything a run carries from round to round (and checkpoints).

  Attributes:
    server_state, site_states: the federated trainer's state.
    ledger: record-level ledger (one accountant per site).
    site_ledger: site-level (DP-FedAvg) ledger.
    history: one row per completed round (only covered or public values,
      plus NOT COVERED diagnostics when the flag asks for them).
    evals: validation Dice per site at the evaluated rounds (held out).
    charged_rounds: {site: [round indices charged in `ledger`]}.
    rounds_completed: rounds done so far.
    averaged_params: with --ema_decay, the exponential moving average of
      the global model over rounds, started from zeros (debiased when
      read, `evaluated_params`); else None.
  """

  server_state: Any
  site_states: Any
  ledger: privacy.PrivacyLedger
  site_ledger: privacy.PrivacyLedger
  history: list
  evals: list
  charged_rounds: dict
  rounds_completed: int = 0
  averaged_params: Any = None

  def meta(self, config, plan) -> dict:
    return {"rounds_completed": self.rounds_completed,
            "ledger": self.ledger.to_dict(),
            "site_ledger": self.site_ledger.to_dict(),
            "charged_rounds": self.charged_rounds,
            "history": self.history, "evals": self.evals,
            "noise_plan": plan.to_meta(),
            "config": config.to_dict()}


@dataclasses.dataclass
class _Run:
  """The fixed pieces of one run (built once by `_setup`)."""

  config: config_lib.ExperimentConfig
  workdir: pathlib.Path
  plan: _Plan
  model: Any
  trainer: Any
  site_data: Any
  val: sites_lib.SiteArrays
  test: sites_lib.SiteArrays | None
  root: jax.Array  # The noise root (secret unless --noise_seed).
  checkpointer: _Checkpointer
  # With --num_sites: the cohorts' data, and the consortium ids of the
  # validation (`val`'s sites) and final test samples.
  cohorts: many_sites.CohortSource | None = None
  val_ids: np.ndarray | None = None
  test_ids: np.ndarray | None = None
  # With a scenario that changes the data (scanner changes, drift): each
  # split as the sites see it in a given round.
  scenario: scenarios_lib.Scenario | None = None
  scenario_data: dict | None = None

  @property
  def many(self) -> bool:
    """Distributions and a per-site table instead of per-site columns."""
    return len(self.plan.site_names) > many_sites.PER_SITE_OUTPUTS_MAX


def _setup(config, workdir: pathlib.Path, splits=None,
           trainers: dict | None = None) -> tuple[_Run, Any]:
  """Loads data (unless `splits` are given), plans the noise, builds model
  and trainer (taken from, or added to, `trainers`, keyed by
  `trainer_signature`, when given); writes nothing before the data and
  settings are checked. Returns (run, initial params)."""
  p = config.privacy
  cohorts = val_ids = test_ids = scenario = scenario_data = None
  if config.data.cohorts:
    d = config.data
    seed = config.data_seed
    if d.num_sites is not None:
      consortium = consortium_lib.Consortium(
          num_sites=d.num_sites, image_size=d.image_size,
          num_slices=d.num_slices, patients_scale=d.patients_scale,
          seed=seed, split_fractions=d.split_fractions)
    else:  # --stream_sites: a prepared dataset's sites, read on demand.
      _check_prepared(d)
      consortium = consortium_lib.PreparedConsortium(
          d.dataset, d.data_dir, d.split_fractions, seed)
    n = consortium.num_sites
    counts = many_sites.site_counts(consortium)
    plan = _plan(config, counts, None,
                 init_source_lib.read(config, counts.site_names))
    cohorts = many_sites.CohortSource(consortium, many_sites.cohort_slots(
        n, config.federated.sites_per_round,
        p.site_sampling_rate if p.use_site_level else None))
    val_ids = many_sites.eval_sample(n, d.eval_sites, seed)
    test_ids = many_sites.test_sample(n, d.test_sites, seed)
    val = consortium.site_arrays(val_ids, "val")
    train, test = consortium.site_arrays([0], "train"), None
  else:
    if splits is None:
      splits = load_data(config.data, config.data_seed)
    train = sites_lib.stack_sites(splits["train"])
    val = sites_lib.stack_sites(splits["val"])
    test = sites_lib.stack_sites(splits["test"])
    if scenarios_lib.any_set(config.data):
      scenario = scenarios_lib.Scenario.build(
          config.data, train.site_names, train.site_modalities,
          config.federated.rounds)
    plan = _plan(config, train, scenario,
                 init_source_lib.read(config, train.site_names))
  if scenario is not None and scenario.has_data_changes:
    replaced = {}
    if any(scenario.new_profile):
      other = load_data(config.data, config.data_seed,
                        scenario.replaced_config(synthetic_config(
                            config.data, config.data_seed)))
      replaced = {split: sites_lib.stack_sites(other[split])
                  for split in ("train", "val", "test")}
    scenario_data = {
        split: scenarios_lib.ScenarioData(scenario, arrays,
                                          replaced.get(split))
        for split, arrays in (("train", train), ("val", val),
                              ("test", test))}
  plan.chunk_size = resolve_chunk_size(config.performance.chunk_size,
                                       train.image.shape[2:-1])
  workdir.mkdir(parents=True, exist_ok=True)
  model = models.SegmentationModel(config.model.unet_config(
      in_channels=train.image.shape[-1], num_classes=len(train.class_names),
      spatial_dims=train.image.ndim - 3))
  init_key = privacy.derive_key(noise_secret.model_root(config),
                                round_index=0, site=0, step=0,
                                purpose=privacy.Purpose.MODEL_INIT)
  params = model.init(init_key, (1,) + train.image.shape[2:])
  if plan.init_source is not None:
    params = pretrained_params(plan.init_source, params)
  if p.record_level:  # Per-example clipping is only valid for such models.
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
  # Last, once everything is checked: a new run's secret is written now,
  # before its first round.
  root = noise_secret.noise_root(
      config, workdir / CHECKPOINTS,
      record={"config": config.to_dict(), "noise_plan": plan.to_meta()},
      check_reuse=lambda stored: _check_same_run(stored, plan, config,
                                                 workdir))
  run = _Run(config, workdir, plan, model, trainer,
             None if cohorts else segmentation_task.site_data(train), val,
             test, root, _Checkpointer(workdir), cohorts, val_ids, test_ids,
             scenario, scenario_data)
  return run, params


def pretrained_params(source: init_source_lib.InitSource, like):
  """The --init_from run's evaluated model (its EMA if it kept one, else
  its final global model) from its latest checkpoint, checked against this
  run's parameter shapes and against the digest its report gives."""
  from fedjax_seg import predict  # pylint: disable=g-import-not-at-top
  flag = f"--init_from={source.workdir}"
  try:
    params, rounds = predict.restore_evaluated_params(
        pathlib.Path(source.workdir), source.config, like)
  except predict.PredictError as e:
    raise config_lib.ConfigError(f"{flag}: {e}") from e
  if rounds == 0:
    raise config_lib.ConfigError(f"{flag}: that run has no completed round.")
  if source.params_sha256 and params_digest(params) != source.params_sha256:
    raise config_lib.ConfigError(
        f"{flag}: its latest checkpoint's model is not the one its "
        f"{REPORT} describes (params sha256 differs); was it resumed or "
        "rerun since?")
  return jax.tree.map(jnp.asarray, params)


def _restore_or_init(run: _Run, params) -> RunState:
  """A fresh state, or the latest checkpoint's (refusing changed settings)."""
  config, plan = run.config, run.plan
  server_state, site_states = run.trainer.init(params, len(plan.site_names))
  state = RunState(
      server_state, site_states,
      privacy.PrivacyLedger(plan.site_names, delta=config.privacy.delta,
                            unit=plan.unit),
      privacy.PrivacyLedger(plan.site_names, delta=config.privacy.delta,
                            unit=privacy.PrivacyUnit.SITE),
      history=[], evals=[], charged_rounds={s: [] for s in plan.site_names},
      averaged_params=(jax.tree.map(jnp.zeros_like, params)
                       if config.federated.ema_decay else None))
  latest = run.checkpointer.latest()
  if latest is None:
    source = plan.init_source
    if source is not None:  # Composed: the source's events come first.
      main = state.ledger if config.privacy.record_level else state.site_ledger
      for ledger, prior in ((main, source.prior_events),
                            (state.site_ledger,
                             source.prior_site_level_events)):
        for site, events in prior.items():
          for event in events:
            ledger.record_event(site, event)
    return state
  target = {"server": server_state, "sites": site_states}
  if state.averaged_params is not None:
    target["averaged"] = state.averaged_params
  try:
    restored, meta = run.checkpointer.restore(latest, target)
  except (ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(
        f"--workdir={run.workdir}: its checkpoint {latest} does not restore "
        f"into this run's state ({type(e).__name__}: {e}); it was made with "
        "other settings (e.g. --ema_decay) or is damaged. Use a new "
        "--workdir, or the run's flags.") from e
  if _comparable(meta["config"]) != _comparable(config.to_dict()):
    raise config_lib.ConfigError(
        f"--workdir={run.workdir} holds a run with other settings; resuming "
        "it with these would make its privacy ledger wrong. Use a new "
        "--workdir, or the same flags.")
  _check_noise_plan_unchanged(meta, plan, config)
  state = RunState(
      restored["server"], restored["sites"],
      privacy.PrivacyLedger.from_dict(meta["ledger"]),
      privacy.PrivacyLedger.from_dict(meta["site_ledger"]),
      meta["history"], meta["evals"], meta["charged_rounds"],
      int(meta["rounds_completed"]), restored.get("averaged"))
  logging.info("resumed %s at round %d", run.workdir, state.rounds_completed)
  return state


def _check_same_run(stored: dict | None, plan: _Plan, config,
                    workdir) -> None:
  """Refuses to reuse the noise secret of a run that stopped before its
  first checkpoint for a run with other settings (it would draw the same
  noise at another scale, or under another plan)."""
  if stored is None or _comparable(stored["config"]) != _comparable(
      config.to_dict()):
    raise config_lib.ConfigError(
        f"--workdir={workdir} holds the noise secret of a run with other "
        "settings (stopped before its first checkpoint); reusing it would "
        "add the same noise under other settings. Use a new --workdir, or "
        "the same flags.")
  _check_noise_plan_unchanged({"noise_plan": stored["noise_plan"],
                               "config": stored["config"],
                               "rounds_completed": 0}, plan, config)


def _check_noise_plan_unchanged(meta, plan: _Plan, config) -> None:
  """Refuses a resumption whose noise for any already planned round differs.

  The noise keys of (round, site, step) are fixed by the noise root: a round
  rerun with another sigma would draw the same Gaussian twice at two scales
  (their difference cancels the noise), and a calibration for another number
  of rounds would end above the target epsilon.
  """
  saved, now = meta["noise_plan"], plan.to_meta()
  old_rounds = meta["config"]["federated"]["rounds"]
  done = int(meta["rounds_completed"])
  if saved.get("init_source_report_sha256") != now[
      "init_source_report_sha256"]:
    raise config_lib.ConfigError(
        f"--init_from={config.model.init_from}: that run's report changed "
        "since this run started (its ledger holds the events of the report "
        "then); use a new --workdir.")
  if config.federated.rounds < done:
    raise config_lib.ConfigError(
        f"--rounds={config.federated.rounds}: the checkpoint already holds "
        f"{done} completed rounds; resume with --rounds >= {done}.")
  n = min(len(saved["recorded_sigma"]), len(now["recorded_sigma"]))
  same = all(
      np.array_equal(np.asarray(saved[key][:n], np.float64),
                     np.asarray(now[key][:n], np.float64))
      for key in ("recorded_sigma", "applied_sigma")) and all(
          saved[key] == now[key] for key in (
              "site_recorded_sigma", "site_applied_sigma",
              "count_noise_multiplier", "site_count_noise_multiplier"))
  if not same:
    raise config_lib.ConfigError(
        f"--rounds: the checkpoint was planned for {old_rounds} rounds and "
        f"--rounds={config.federated.rounds} changes the noise of rounds it "
        "planned (site-adaptive calibration and noise schedules depend on "
        "the number of rounds). Resuming would rerun rounds with other noise "
        "under the same keys and miss the target epsilon. Resume with "
        f"--rounds={old_rounds}, or start a new --workdir.")


def _charged_sites(config, plan: _Plan, part: np.ndarray) -> np.ndarray:
  """[S] bool: the sites the record-level ledger charges this round.

  Without site-level DP, the sites that train (participation is drawn from
  the noise root, independently of the data, so it is public). With
  site-level DP the sampled set of sites must stay hidden (the site-level
  guarantee relies on it), so every training site is charged every round: an
  upper bound for the sites that did not train, and a ledger that reveals
  nothing.
  """
  return plan.training_sites if config.privacy.use_site_level else part


def _check_budget(run: _Run, state: RunState, round_index: int,
                  part: np.ndarray) -> str | None:
  """The stop reason if this round would take any site it charges, in any
  ledger in use, past --epsilon_budget (with the values it would record)."""
  config, plan = run.config, run.plan
  p, f = config.privacy, config.federated
  if not p.enabled or p.epsilon_budget is None:
    return None
  checks = []
  if p.record_level:
    for k in np.flatnonzero(_charged_sites(config, plan, part)):
      checks.append((state.ledger, k, "record-level", _record_level_event(
          config, plan, round_index, k)))
  if p.use_site_level:
    event = privacy.poisson_gaussian_event(
        plan.site_recorded_sigma, p.site_sampling_rate, 1)
    for k in np.flatnonzero(plan.training_sites):
      checks.append((state.site_ledger, k, "site-level", event))
  for ledger, k, which, event in checks:
    name = plan.site_names[k]
    would = ledger.epsilon_if(name, event)
    if would > p.epsilon_budget:
      return (f"budget: round {round_index + 1} would take site {name!r} to "
              f"{which} {privacy.PrivacyUnit(ledger.unit).epsilon_label} "
              f"{would:.3f} > budget {p.epsilon_budget}")
  return None


def _record_level_event(config, plan: _Plan, round_index: int, k: int):
  return privacy.poisson_gaussian_event(
      float(plan.recorded_sigma[round_index, k]), float(plan.sampling_rates[k]),
      config.federated.local_steps, dataset_size=int(plan.units[k]),
      max_batch_size=plan.max_batch_size)


def round_arrays(config, plan: _Plan, round_index: int):
  """(SiteConfig, server learning rate) of a round: every per-round value the
  device program reads as an array, so that runs that differ only in these
  (sweep members) share one compiled program."""
  f, p = config.federated, config.privacy
  num_sites = len(plan.site_names)
  full = lambda v: jnp.full((num_sites,), v, jnp.float32)
  site_config = fed.SiteConfig(
      jnp.asarray(plan.sampling_rates, jnp.float32),
      jnp.asarray(plan.applied_sigma[round_index], jnp.float32),
      l2_clip_norm=full(p.l2_clip_norm), learning_rate=full(f.learning_rate))
  return site_config, jnp.float32(f.server_learning_rate)


def round_site_data(run: _Run, round_index: int):
  """The training data the sites hold in round `round_index` (0-based)."""
  if run.scenario_data is None:
    return run.site_data
  return segmentation_task.site_data(run.scenario_data["train"].at(
      round_index))


def _split_at(run: _Run, split: str, round_index: int):
  """Validation or test arrays as of round `round_index` (0-based)."""
  if run.scenario_data is None:
    return run.val if split == "val" else run.test
  return run.scenario_data[split].at(round_index)


def _run_round(run: _Run, state: RunState, round_index: int,
               part: np.ndarray):
  """One federated round on the device: (new state, output, seconds)."""
  site_config, server_lr = round_arrays(run.config, run.plan, round_index)
  if run.cohorts is not None:
    return _run_cohort_round(run, state, round_index, part, site_config,
                             server_lr)
  t0 = time.perf_counter()
  server_state, site_states, out = run.trainer.run_round(
      state.server_state, state.site_states, round_site_data(run, round_index),
      site_config, part, round_index, run.root, server_lr)
  jax.block_until_ready(server_state.params)
  seconds = time.perf_counter() - t0
  state = dataclasses.replace(state, server_state=server_state,
                              site_states=site_states)
  return state, jax.tree.map(np.asarray, out), seconds


def _run_cohort_round(run: _Run, state: RunState, round_index: int,
                      part: np.ndarray, site_config, server_lr):
  """`_run_round` over the cohort `part` of a --num_sites consortium: only
  the cohort's data go to the device; the output is as the all-sites round's
  (metrics [N], zeros for sites not in the cohort)."""
  cohort = np.flatnonzero(part)
  # Rendering the cohort is host work (the row's host_seconds).
  data, states, configs, participating, ids = run.cohorts.round_inputs(
      cohort, state.site_states, site_config)
  t0 = time.perf_counter()
  server_state, new_states, out = run.trainer.run_round(
      state.server_state, states, data, configs, participating, round_index,
      run.root, server_lr, site_ids=ids)
  jax.block_until_ready(server_state.params)
  seconds = time.perf_counter() - t0
  site_states, client = run.cohorts.scatter(
      state.site_states, new_states, cohort, out.client, len(part))
  state = dataclasses.replace(state, server_state=server_state,
                              site_states=site_states)
  out = fed.RoundOutput(client, jax.tree.map(np.asarray, out.server))
  return state, out, seconds


def _record_round(run: _Run, state: RunState, round_index: int,
                  part: np.ndarray, out) -> None:
  """Charges this round in the ledgers, after checking that the device
  applied exactly the planned noise."""
  config, plan = run.config, run.plan
  p, f = config.privacy, config.federated
  m = out.client
  if p.record_level:
    for k in np.flatnonzero(part):
      got, want = float(m.noise_multiplier[k]), _f32(
          plan.applied_sigma[round_index, k])
      if got != want or int(m.steps[k]) != f.local_steps or not math.isclose(
          float(m.sampling_rate[k]), plan.sampling_rates[k], rel_tol=1e-6):
        raise AssertionError(
            f"site {plan.site_names[k]}: applied sigma {got}, steps "
            f"{int(m.steps[k])}, q {float(m.sampling_rate[k])} != planned "
            f"{want}, {f.local_steps}, {plan.sampling_rates[k]}")
    charged = np.flatnonzero(_charged_sites(config, plan, part))
    # All charged sites' RDP in one vectorised evaluation.
    state.ledger.record_events({
        plan.site_names[k]: _record_level_event(config, plan, round_index, k)
        for k in charged})
    for k in charged:
      state.charged_rounds[plan.site_names[k]].append(round_index)
  if p.use_site_level:
    got = float(out.server.noise_multiplier)
    if got != plan.site_applied_sigma:
      raise AssertionError(f"server: applied z {got} != planned "
                           f"{plan.site_applied_sigma}")
    for k in np.flatnonzero(plan.training_sites):
      state.site_ledger.record(plan.site_names[k], plan.site_recorded_sigma,
                               p.site_sampling_rate, 1)


def _main_ledger(config, state: RunState) -> privacy.PrivacyLedger:
  return state.ledger if config.privacy.record_level else state.site_ledger


def _rounds_charged(config, state: RunState, plan: _Plan) -> dict:
  """{site: rounds charged in the main ledger}: the rounds a site trained,
  or every round under site-level DP (one event per charged round, after
  the events a composed --init_from source brought)."""
  ledger = _main_ledger(config, state)
  prior = plan.init_source.prior_events if plan.init_source else {}
  return {s: len(ledger.events(s)) - len(prior.get(s, ()))
          for s in ledger.site_names}


def _round_row(run: _Run, state: RunState, round_index: int,
               part: np.ndarray, out, seconds: float) -> dict:
  """The history row of a round: covered, public or held-out values only,
  plus the NOT COVERED diagnostics when --release_training_diagnostics."""
  config, plan = run.config, run.plan
  p = config.privacy
  names = plan.site_names
  epsilon = (_main_ledger(config, state).epsilons() if p.enabled
             else {s: None for s in names})
  row = {
      "round": round_index + 1, "device_seconds": seconds,
      "epsilon": epsilon,
      "sigma": dict(zip(names, map(float, plan.accounted_sigma[round_index]))),
  }
  if p.use_site_level:
    # The realised set of sampled sites is hidden by site-level DP: neither
    # the participants nor anything that depends on them is written.
    row["site_level_clip"] = float(out.server.l2_clip_norm)
    if p.record_level:
      row["clip"] = {s: p.l2_clip_norm for s in names}
  else:
    row["participants"] = [names[k] for k in np.flatnonzero(part)]
    row["clip"] = dict(zip(names, map(float, np.where(
        part, out.client.l2_clip_norm if p.record_level else np.inf,
        np.nan))))
  if run.many:
    # Per-site values only for the sites that trained (the whole table is
    # in the report's privacy section and sites.csv); distributions for all.
    shown = [] if p.use_site_level else row["participants"]
    for key in ("epsilon", "sigma", "clip"):
      if key in row:
        row[key] = {s: row[key][s] for s in shown}
    values = [v for v in epsilon.values() if v is not None]
    row["sigma_max"] = float(plan.accounted_sigma[round_index].max())
    row["epsilon_max"] = max(values) if values else None
    row["epsilon_median"] = float(np.median(values)) if values else None
  if config.release_training_diagnostics:
    m = out.client
    units = int(m.num_real.sum())
    diagnostics = {
        "train_loss": float(m.loss_sum.sum() / max(units, 1)),
        "clipped_fraction": float(m.num_clipped.sum() / max(units, 1)),
    }
    if p.use_site_level:
      diagnostics["participants"] = [names[k] for k in np.flatnonzero(part)]
      diagnostics["sites_clipped"] = int(out.server.num_clipped)
    row[NOT_COVERED_KEY] = diagnostics
  return row


def _site_params(run: _Run, state: RunState, evaluated: bool = False,
                 ids=None):
  """The params each site uses (FedBN: a function of the site index, or of
  the position in `ids` when given): the training model, or with `evaluated`
  the reported one (`evaluated_params`)."""
  params = (evaluated_params(run.config, state) if evaluated
            else state.server_state.params)
  if run.trainer.norm_mask is None:
    return params
  site = (lambda k: k) if ids is None else (lambda k: int(ids[k]))
  return lambda k: client_lib.merge_local(
      params, jax.tree.map(lambda x: x[site(k)],
                           state.site_states.local_params),
      run.trainer.norm_mask)


def _evaluate_validation(run: _Run, state: RunState, row: dict) -> None:
  """Validation Dice per site (held-out patients) into `state.evals`; with
  --num_sites, of the fixed sample of sites `run.val` holds."""
  result = centralized.evaluate(
      run.model, _site_params(run, state, True, run.val_ids),
      _split_at(run, "val", row["round"] - 1))
  fg = _nanmean(result["dice_per_site"][:, 1:], axis=-1)
  state.evals.append({"round": row["round"], "dice_per_site": dict(zip(
      run.val.site_names, map(float, fg)))})
  row["val_dice_mean"] = float(_nanmean(fg))


def _log_round(run: _Run, row: dict, round_times: list) -> None:
  config, plan = run.config, run.plan
  p, f = config.privacy, config.federated
  eta = np.mean(round_times) * (f.rounds - row["round"])
  label = plan.unit.epsilon_label if p.record_level else (
      privacy.PrivacyUnit.SITE.epsilon_label)
  worst = (row["epsilon_max"] if "epsilon_max" in row
           else max(row["epsilon"].values()) if p.enabled else None)
  eps = (f"{label} max {worst:.3f}" if p.enabled else "epsilon inf (NO DP)")
  clip = "-"
  if p.record_level and "clip" in row:
    values = [v for v in row["clip"].values() if np.isfinite(v)]
    clip = f"{np.mean(values):.3f}" if values else "-"
  elif p.use_site_level:
    clip = f"{row['site_level_clip']:.3f} (site)"
  sites = (f" | {len(row['participants'])} sites" if "participants" in row
           else "")
  extra = ""
  if NOT_COVERED_KEY in row:
    d = row[NOT_COVERED_KEY]
    extra = (f" | NOT COVERED BY THE GUARANTEE: train loss "
             f"{d['train_loss']:.4f}, clipped {d['clipped_fraction']:.3f}")
    if "participants" in d:
      extra += f", {len(d['participants'])} sites sampled"
  sigma = row.get("sigma_max") or max(row["sigma"].values(), default=0.0)
  noise = (f"sigma {sigma:.3f}" if p.record_level
           else f"z {run.plan.site_applied_sigma:.3f} (site)" if p.enabled
           else "no noise")
  logging.info(
      "round %d/%d | %s | %s | C %s%s | %.2f s (device %.2f s) | ETA %.0f s"
      "%s%s", row["round"], f.rounds, eps, noise, clip, sites,
      row["wall_seconds"], row["device_seconds"], eta,
      f" | val Dice {row['val_dice_mean']:.3f}" if "val_dice_mean" in row
      else "", extra)


def _time_round(row: dict, round_start: float, evaluation: float) -> None:
  """The whole round's wall time and its parts. Not covered by the
  guarantee (the report's assumptions say so): they follow the realised
  sample, and under site-level DP the number and sizes of the sampled sites
  (the loop backend runs only sampled sites; with --num_sites the host part
  renders the cohort).

  wall_seconds: from choosing the participants to now (budget check, device
  round, device-to-host copies, accounting, history row, validation, log,
  checkpoint); device_seconds: the jitted round until its parameters are
  ready; evaluation_seconds: validation (0 in rounds without it);
  host_seconds: the rest.
  """
  wall = time.perf_counter() - round_start
  row["wall_seconds"] = wall
  row["evaluation_seconds"] = evaluation
  row["host_seconds"] = max(0.0, wall - row["device_seconds"] - evaluation)


def _checkpoint(run: _Run, state: RunState) -> None:
  tree = {"server": state.server_state, "sites": state.site_states}
  if state.averaged_params is not None:
    tree["averaged"] = state.averaged_params
  run.checkpointer.save(state.rounds_completed, tree,
                        state.meta(run.config, run.plan))


def _average(config, state: RunState) -> None:
  """Folds this round's global model into the EMA (--ema_decay): only
  released models go in, so it is post-processing."""
  decay = config.federated.ema_decay
  if decay:
    state.averaged_params = optax.incremental_update(
        state.server_state.params, state.averaged_params, 1.0 - decay)


def evaluated_params(config, state: RunState):
  """The global model evaluated and reported: the debiased EMA with
  --ema_decay (after at least one round), else the last model."""
  decay, t = config.federated.ema_decay, state.rounds_completed
  if not decay or t == 0:
    return state.server_state.params
  return debiased_average(state.averaged_params, decay, t)


def debiased_average(averaged, decay: float, rounds: int):
  """An EMA started from zeros, after `rounds` updates with `decay`,
  divided by 1 - decay^rounds (the weight its models carry)."""
  correction = 1.0 - decay ** rounds
  return jax.tree.map(lambda e: e / jnp.asarray(correction, e.dtype),
                      averaged)


def _warn_about_settings(config) -> None:
  if not config.privacy.enabled:
    logging.warning("=" * 70)
    logging.warning("DP IS DISABLED (--nodp): this run has NO privacy "
                    "guarantee. Its epsilons are infinite.")
    logging.warning("=" * 70)
  if noise_secret.is_public(config) and config.privacy.enabled:
    logging.warning("PUBLIC NOISE: %s", noise_secret.statement(config))
  if config.release_training_diagnostics:
    logging.warning("--release_training_diagnostics: the training loss and "
                    "clipped fraction (and under site-level DP the sampled "
                    "sites) are written un-noised: NOT COVERED BY THE "
                    "GUARANTEE.")


class Simulation:
  """One run, stepped round by round.

  `train_and_evaluate` drives one; a sweep (`fedjax_seg.sweep`) drives
  several in lockstep and runs their device rounds together. Per round:
  `begin_round` (participants, budget check), the device round (`run_round`,
  or the sweep's batched one), `end_round` (ledgers, history row,
  validation, log, checkpoint); at the end `finish` (test evaluation,
  verified report, CSV, plots).

  Args:
    config: the run's settings.
    workdir: its output directory (resumes from its latest checkpoint).
    splits: preloaded `load_data(config.data, config.data_seed)` (a sweep
      loads the data once for all members).
    trainers: {signature: FederatedTrainer} shared between runs (a sweep's
      members with equal `trainer_signature` use one trainer, one
      compilation).
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               workdir: str | os.PathLike, *, splits=None,
               trainers: dict | None = None):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.start_time = time.time()
    _warn_about_settings(config)
    self.run, params = _setup(config, self.workdir, splits, trainers)
    # The model before round 1 (from the MODEL_INIT key; public).
    self.initial_params = params
    self.state = _restore_or_init(self.run, params)
    # Several hosts: the same settings, the same restored round and ledgers
    # everywhere (every host derives the same keys from them).
    distributed.check_hosts_agree(
        "the run's settings, restored round and ledgers",
        hashlib.sha256(json.dumps([
            config.to_dict(), self.state.rounds_completed,
            self.state.ledger.to_dict(), self.state.site_ledger.to_dict()],
            sort_keys=True, default=str).encode()).hexdigest())
    self.first_round = self.state.rounds_completed
    self.stopped_reason = "completed"
    self.round_times: list[float] = []
    self.stopped = self.state.rounds_completed >= config.federated.rounds
    self._round_start = 0.0

  @property
  def next_round(self) -> int:
    return self.state.rounds_completed

  def site_params(self, site: int):
    """The parameters site `site` trains from now: the server's, with its
    own normalisation parameters under FedBN."""
    params = _site_params(self.run, self.state)
    return params(site) if callable(params) else params

  def begin_round(self) -> np.ndarray | None:
    """The participants [S] bool of the next round, or None when the run
    stops (all rounds done, or the budget would be exceeded)."""
    if self.stopped:
      return None
    r = self.next_round
    self._round_start = time.perf_counter()
    part = _participants(self.config, self.run.plan, self.run.root, r)
    reason = _check_budget(self.run, self.state, r, part)
    if reason is not None:
      self.stopped_reason = reason
      self.stopped = True
      logging.warning("stopping before round %d: %s", r + 1, reason)
      return None
    return part

  def round_arrays(self):
    """(SiteConfig, server learning rate) of the next round."""
    return round_arrays(self.config, self.run.plan, self.next_round)

  def run_round(self, part: np.ndarray):
    """This run's device round alone: (server_state, site_states, output as
    numpy, device seconds)."""
    state, out, seconds = _run_round(self.run, self.state, self.next_round,
                                     part)
    return state.server_state, state.site_states, out, seconds

  def end_round(self, part: np.ndarray, server_state, site_states, out,
                seconds: float) -> bool:
    """Accounts, records, evaluates, logs and checkpoints the round just run
    on the device. Returns False if the process should stop here as if
    killed (--stop_after_rounds)."""
    config, run = self.config, self.run
    f = config.federated
    r = self.next_round
    state = self.state = dataclasses.replace(
        self.state, server_state=server_state, site_states=site_states)
    _average(config, state)
    _record_round(run, state, r, part, out)
    row = _round_row(run, state, r, part, out, seconds)
    evaluation = 0.0
    # Counted before validation: the EMA now holds r + 1 models.
    state.rounds_completed = r + 1
    if (r + 1) % config.eval_every == 0 or r + 1 == f.rounds:
      eval_start = time.perf_counter()
      _evaluate_validation(run, state, row)
      evaluation = time.perf_counter() - eval_start
    state.history.append(row)
    _time_round(row, self._round_start, evaluation)
    self.round_times.append(row["wall_seconds"])
    _log_round(run, row, self.round_times)
    if (r + 1) % config.checkpoint_every == 0 or r + 1 == f.rounds:
      _checkpoint(run, state)
      # The checkpoint's copy of the row was timed up to the save.
      _time_round(row, self._round_start, evaluation)
    if r + 1 >= f.rounds:
      self.stopped = True
    if (config.stop_after_rounds is not None
        and len(self.round_times) >= config.stop_after_rounds
        and r + 1 < f.rounds):
      logging.warning("stopping after %d rounds of this run (as if killed)",
                      len(self.round_times))
      return False
    return True

  def finish(self) -> dict:
    """Test evaluation, the verified report and every output file."""
    config, run, state = self.config, self.run, self.state
    p = config.privacy
    if (self.stopped_reason != "completed"
        and state.rounds_completed > self.first_round
        and state.rounds_completed % config.checkpoint_every):
      _checkpoint(run, state)  # Not saved yet by the loop.
    stopped_reason = self.stopped_reason
    if p.enabled and p.record_level and p.target_epsilon is not None:
      worst = state.ledger.max_epsilon()
      if worst > p.target_epsilon:
        above = (f"{run.plan.unit.epsilon_label} {worst:.4f} is above "
                 f"--target_epsilon={p.target_epsilon}")
        logging.warning("%s", above)
        stopped_reason += f" ({above})"
    if run.cohorts is None:
      test_result = centralized.evaluate(
          run.model, _site_params(run, state, True),
          _split_at(run, "test", max(state.rounds_completed - 1, 0)),
          with_hd95=True)
    else:
      test_result = many_sites.evaluate_sites(
          run.model, _site_params(run, state, True), run.cohorts.consortium,
          run.test_ids, "test", with_hd95=True)
    report = _report(run, state, test_result, stopped_reason,
                     time.time() - self.start_time, self.round_times)
    report["final_params_sha256"] = params_digest(state.server_state.params)
    if config.federated.ema_decay:
      report["metrics"]["evaluated_model"] = (
          f"EMA of the global model over rounds, decay "
          f"{config.federated.ema_decay}, debiased (post-processing)")
      report["evaluated_params_sha256"] = params_digest(
          evaluated_params(config, state))
    if p.enabled:
      from fedjax_seg import verifier  # pylint: disable=g-import-not-at-top
      result = verifier.verify_report(report, workers="auto")
      report["privacy"]["verified"] = {
          "ok": result.ok, "problems": result.problems,
          "plan_rederived": result.rederived,
          "by": "python -m fedjax_seg.verifier (plain dp_accounting; the plan "
                "re-derived from the config and site sizes)"}
      if not result.ok:
        logging.error("privacy verification FAILED: %s", result.problems)
    if distributed.is_writer():  # Host 0 alone writes (several hosts).
      _write_outputs(self.workdir, report, state.history, run.plan,
                     _rounds_charged(config, state, run.plan))
    return report


INTERRUPTED = {"stopped_reason": "interrupted"}


def train_and_evaluate(config: config_lib.ExperimentConfig,
                       workdir: str | os.PathLike) -> dict:
  """Runs (or resumes) a simulation; returns the report (also written).

  The steps, over one `RunState` (see `Simulation`): setup (data, noise
  plan, model, trainer), restore or init, then per round: participants,
  check budget, run round, record round (ledgers), row (+ validation), log,
  checkpoint; at the end the test evaluation, the report (verified against
  the ledger by `fedjax_seg.verifier`), CSV and plots.
  """
  enable_compilation_cache()
  sim = Simulation(config, workdir)
  while (part := sim.begin_round()) is not None:
    if not sim.end_round(part, *sim.run_round(part)):
      return dict(INTERRUPTED, rounds_completed=sim.state.rounds_completed)
  return sim.finish()


def params_digest(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def _nanmean(values, axis=None):
  """Mean ignoring NaN (sites without validation patients); NaN if none."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return np.nanmean(values, axis=axis)


def _nan_to_none(x):
  return None if x is None or (isinstance(x, float) and not math.isfinite(x)) \
      else x


def _diagnostics_released(config, history) -> bool:
  """Whether any output holds NOT COVERED diagnostics (this run's flag, or
  rows of an earlier part of a resumed run)."""
  return config.release_training_diagnostics or any(
      NOT_COVERED_KEY in row for row in history)


def _assumptions(config, plan: _Plan, diagnostics_released: bool) -> dict:
  """What the epsilons cover and what is public, for report.json."""
  p = config.privacy
  public = [
      "site names and modalities",
      "the number of training units of each site (slices and patients) and "
      "the sampling rates and maximum batch size derived from them",
      "the configuration (every flag) and the noise plan derived from it and "
      "from the unit counts (sigma per round and site, clip norms unless "
      "adaptive)",
  ]
  if not p.use_site_level:
    public.append(
        "which sites train in each round: drawn from the noise root, "
        "independently of the data (under site-level DP this is hidden and "
        "never written)")
  not_covered = [
      "validation and test metrics (Dice, IoU, HD95): computed on held-out "
      "patients who are in no training set; they describe those patients and "
      "are not covered by the training guarantee",
      "wall-clock timings (seconds per round, ETA): they follow how much was "
      "sampled and, under site-level DP, how many sites were sampled and how "
      "large they are (the loop backend runs only sampled sites; with "
      "--num_sites a round renders its cohort); a simulation runs on data "
      "you hold, but do not publish per-round timings of a real deployment",
      "checkpoint state files (parameters, optimizer and site-local states, "
      "for resumption): the simulator's internal state, not a release; the "
      "final parameters are covered",
  ]
  if diagnostics_released:
    not_covered.append(DIAGNOSTICS_WARNING)
  if plan.init_source is not None:
    public.append(plan.init_source.assumption())
  covered = ("the trained parameters and everything computed from them "
             "(post-processing), every epsilon, the noised adaptive-clipping "
             "releases (clip norms)")
  return {
      "unit": plan.unit.value,
      "unit_meaning": {
          "example": "one training slice (one volume with --volumes)",
          "patient": "all training slices of one patient",
          "site": "all data of one site (DP-FedAvg)"}[plan.unit.value],
      "neighbouring_relation": "add or remove one unit",
      "covered": covered if p.enabled else "nothing: --nodp (NOT PRIVATE)",
      "public": public,
      "not_covered": not_covered,
      "secret": noise_secret.statement(config),
      "patients_at_one_site": "each patient's data are at one site only "
                              "(per-site ledgers assume disjoint patients)",
      "site_sizes": SITE_SIZES_ASSUMPTION,
  }


def _ledger_section(ledger: privacy.PrivacyLedger, names) -> dict:
  epsilon_pld = ledger.epsilons_pld(PLD_DISCRETIZATION, workers="auto")
  return {"ledger": ledger.to_dict(), "epsilon_per_site": ledger.epsilons(),
          "epsilon_max": ledger.max_epsilon(),
          "epsilon_pld_per_site": {s: epsilon_pld[s] for s in names},
          "epsilon_label": privacy.PrivacyUnit(ledger.unit).epsilon_label}


def _privacy_section(run: _Run, state: RunState) -> dict:
  config, plan = run.config, run.plan
  p, f = config.privacy, config.federated
  names = plan.site_names
  section = {"enabled": p.enabled, "unit": plan.unit.value, "delta": p.delta,
             "accountant": "rdp", "pld_accountant": "pld",
             "pld_value_discretization_interval": PLD_DISCRETIZATION,
             "epsilon_label": plan.unit.epsilon_label,
             "assumptions": _assumptions(
                 config, plan, _diagnostics_released(config, state.history))}
  if not p.enabled:
    section.update(
        warning="NOT PRIVATE: trained without clipping or noise.",
        epsilon_per_site={s: None for s in names}, epsilon_max=None,
        epsilon_pld_per_site={s: None for s in names}, ledger=None)
    return section
  rounds_done = state.rounds_completed
  site_plan = {"noise_multiplier": plan.site_recorded_sigma,
               "sampling_rate": p.site_sampling_rate,
               "rounds": list(range(rounds_done)),
               "charged_sites": [names[k] for k in
                                 np.flatnonzero(plan.training_sites)]}
  if p.record_level:
    section.update(_ledger_section(state.ledger, names))
    section["plan"] = {
        "local_steps": f.local_steps, "max_batch_size": plan.max_batch_size,
        "dataset_size_per_site": dict(zip(names, map(int, plan.units))),
        "sampling_rate_per_site": dict(zip(names, map(float,
                                                      plan.sampling_rates))),
        "rounds_trained_per_site": state.charged_rounds,
        "accounted_sigma_per_round": {
            s: plan.recorded_sigma[:, k].tolist() for k, s in
            enumerate(names)},
    }
    section["noise_multiplier_per_site"] = dict(zip(names, map(
        float, plan.base_sigma)))
    if p.use_site_level:
      section["site_level"] = dict(_ledger_section(state.site_ledger, names),
                                   plan=site_plan)
  else:
    section.update(_ledger_section(state.site_ledger, names))
    section["plan"] = site_plan
  source = plan.init_source
  if source is not None:
    section["init_from"] = {"workdir": source.workdir,
                            "report_sha256": source.report_sha256,
                            "relation": source.relation}
  if source is not None and source.report_section() is not None:
    section["composed_from"] = source.report_section()
  if source is not None and source.report_section(site_level=True):
    section["site_level"]["composed_from"] = source.report_section(True)
  section.update(sampling_rate_per_site=dict(zip(
      names, map(float, plan.sampling_rates))),
                 max_batch_size=plan.max_batch_size,
                 epsilon_budget=p.epsilon_budget,
                 target_epsilon=p.target_epsilon)
  audit = audit_config(config, plan)
  if audit is not None:
    section["audit"] = audit_section(run, state, audit, section)
  return section


def audit_section(run: _Run, state: RunState, audit: auditing.AuditConfig,
                  privacy_section: dict) -> dict:
  """`privacy.audit` of the report: the one-run canary audit's figures,
  claimed epsilons read from `privacy_section` (computed once)."""
  config, plan = run.config, run.plan
  site = plan.site_names[audit.site]
  claimed = privacy_section["epsilon_per_site"][site]
  observed = np.asarray(state.site_states.audit.observed[audit.site])
  included = np.asarray(auditing.inclusion(run.root, audit))
  result = auditing.audit_from_scores(
      auditing.scores(run.root, audit, observed), included,
      config.privacy.delta, audit.significance)
  return {
      "method": "one-run white-box audit (Steinke, Nasr, Jagielski 2023) "
                "with gradient canaries; bound from jax_privacy.auditing."
                "CanaryScoreAuditor.epsilon_one_run (Bonferroni thresholds)",
      "site": site, "unit": plan.unit.value,
      "epsilon_label": plan.unit.epsilon_label,
      "claimed_epsilon": claimed,
      "claimed_epsilon_pld": privacy_section["epsilon_pld_per_site"][site],
      "canary_kind": audit.kind,
      "canaries_per_step_max": audit.max_per_step,
      "canary_contributions": int(state.site_states.audit.sampled[
          audit.site]),
      "canary_contributions_cut": int(state.site_states.audit.cut[
          audit.site]),
      "noise_seed": config.noise_seed,
      "contradicts_claim": result.epsilon_lower_bound > claimed,
      **result.to_dict(),
      **({} if result.epsilon_gdp_estimate is not None else {
          "epsilon_gdp_estimate_withheld":
              "the installed jax_privacy's epsilon_from_gdp is positive on "
              "scores without signal (its |mu| shortcut, fixed upstream in "
              "jax_privacy pull request 270)"}),
      "released": "post-processing of the audited site's released (noised) "
                  "gradients and the canary inclusion bits; the canaries "
                  "changed that site's clipped sums (and through its "
                  "updates the global model), nothing else",
  }


def _report(run: _Run, state: RunState, result, stopped_reason, seconds,
            round_times) -> dict:
  config, plan = run.config, run.plan
  names = plan.site_names
  # With --num_sites the test pass covers a sample of sites; `run.val` has
  # the vocabularies.
  test = run.test if run.cohorts is None else run.val
  tested = (names if run.cohorts is None
            else tuple(names[k] for k in run.test_ids))
  def fg(a):  # Mean over foreground classes; NaN for sites without data.
    a = np.asarray(a, np.float64)[..., 1:]
    count = np.sum(~np.isnan(a), axis=-1)
    return np.where(count > 0, np.nansum(a, axis=-1) / np.maximum(count, 1),
                    np.nan)

  dice_site = fg(result["dice_per_site"])
  report = {
      "rounds_completed": state.rounds_completed,
      "stopped_reason": stopped_reason,
      "privacy": _privacy_section(run, state),
      "metrics": {
          "split": "test (held-out patients; not covered by the guarantee)",
          "dice_per_site": {s: _nan_to_none(float(v)) for s, v in
                            zip(tested, dice_site)},
          "dice_per_modality": {m: _nan_to_none(float(v)) for m, v in zip(
              test.modality_names, fg(result["dice_per_modality"]))},
          "dice_mean": _nan_to_none(float(_nanmean(dice_site))),
          "dice_per_site_per_class": {
              s: dict(zip(test.class_names, map(float, row)))
              for s, row in zip(tested, result["dice_per_site"])},
          "iou_per_site": {s: _nan_to_none(float(v)) for s, v in
                           zip(tested, fg(result["iou_per_site"]))},
          "hd95_per_site": {s: _nan_to_none(float(np.mean(v)))
                            for s, v in zip(tested, result["hd95_per_site"])},
          "validation_history": state.evals,
      },
      "history": state.history,
      "config": config.to_dict(),
      # Which preparation of the dataset (a composed --init_from compares).
      "dataset": {"name": config.data.dataset,
                  "fingerprint": init_source_lib.dataset_fingerprint(
                      config.data)},
      "sites": {s: {"modality": m, "train_units": int(n)} for s, m, n in
                zip(names, plan.site_modalities, plan.units)},
      "versions": _versions(),
      "device": {"platform": jax.default_backend(),
                 "devices": [str(d) for d in jax.devices()],
                 "machine": platform.machine(),
                 "cpu_count": os.cpu_count(),
                 "backend": config.performance.backend},
      "timing": _timing(seconds, state.history[-len(round_times):]
                        if round_times else []),
  }
  if run.cohorts is not None:
    report["metrics"]["sites_evaluated"] = (
        f"{len(tested)} of {len(names)} sites (seeded sample, --test_sites)"
        if len(tested) < len(names) else f"all {len(names)} sites")
    report["metrics"]["validation_sites"] = list(run.val.site_names)
  if run.scenario is not None:
    report["scenario"] = scenarios_lib.report_section(
        run.scenario, state.evals, plan.training_sites)
    if run.scenario_data is not None:
      report["metrics"]["split"] += (
          f" as the sites' scanners acquire them in the last round run "
          f"({max(state.rounds_completed, 1)})")
  if run.many:
    report["sites_summary"] = many_sites.summary(
        report, names, plan.site_modalities, plan.units,
        _rounds_charged(config, state, run.plan))
  if _diagnostics_released(config, state.history):
    report["training_diagnostics"] = {
        "warning": DIAGNOSTICS_WARNING,
        "where": f"history[*].{NOT_COVERED_KEY}"}
  return report


def _timing(total_seconds: float, rows: list) -> dict:
  """Whole-run and per-round timing of this run's rounds (public)."""
  timing = {"total_seconds": total_seconds, "rounds_this_run": len(rows),
            "first_round_wall_seconds": (rows[0]["wall_seconds"] if rows
                                         else None)}
  later = rows[1:]  # The first round compiles.
  for key in ("wall_seconds", "device_seconds", "host_seconds"):
    timing[f"median_round_{key}"] = (
        float(np.median([r[key] for r in later])) if later else None)
  if later:
    # Host share of a round without validation (what a round costs on top
    # of the device work); validation rounds are reported apart.
    plain = [r for r in later if not r["evaluation_seconds"]] or later
    timing["median_host_fraction"] = float(np.median(
        [r["host_seconds"] / r["wall_seconds"] for r in plain]))
  return timing


def _write_outputs(workdir: pathlib.Path, report: dict, history: list,
                   plan: _Plan, charged: dict) -> None:
  """report.json, rounds.csv, plots and (many sites) sites.csv; `charged`
  is {site: number of rounds charged} (`_rounds_charged`)."""
  atomic_write(workdir / REPORT, json.dumps(report, indent=1).encode())
  many = "sites_summary" in report
  if many:
    atomic_write(workdir / SITES_CSV, many_sites.sites_csv(
        report, plan.site_names, plan.site_modalities, plan.units,
        charged).encode())
  buf = io.StringIO()
  writer = csv.writer(buf)
  # Many sites: the distributions' summaries instead of a column per site.
  names = [] if many else list(plan.site_names)
  label = report["privacy"]["epsilon_label"].replace(" ", "_")
  has = lambda key: any(key in row for row in history)
  header = ["round", "wall_seconds", "device_seconds", "host_seconds",
            "evaluation_seconds", "val_dice_mean"]
  if many:
    header += [f"{label}_max", f"{label}_median"]
  header += [f"{label}_{s}" for s in names] + [f"sigma_{s}" for s in names]
  if has("clip") and names:
    header += [f"clip_{s}" for s in names]
  if has("site_level_clip"):
    header.append("site_level_clip")
  if has("participants"):
    header.append("sites_trained")
  diagnostics = has(NOT_COVERED_KEY)
  if diagnostics:
    header += [f"{k} [NOT COVERED BY THE GUARANTEE]" for k in
               ("train_loss", "clipped_fraction", "sites_sampled")]
  writer.writerow(header)
  for row in history:
    line = [row["round"]] + [
        f"{row[k]:.4f}" if k in row else "" for k in (
            "wall_seconds", "device_seconds", "host_seconds",
            "evaluation_seconds")] + [row.get("val_dice_mean", "")]
    if many:
      line += [row.get("epsilon_max", ""), row.get("epsilon_median", "")]
    line += [row["epsilon"][s] for s in names]
    line += [row["sigma"][s] for s in names]
    if has("clip") and names:
      line += [row.get("clip", {}).get(s, "") for s in names]
    if has("site_level_clip"):
      line.append(row.get("site_level_clip", ""))
    if has("participants"):
      line.append(len(row.get("participants", [])))
    if diagnostics:
      d = row.get(NOT_COVERED_KEY, {})
      line += [d.get("train_loss", ""), d.get("clipped_fraction", ""),
               len(d["participants"]) if "participants" in d else ""]
    writer.writerow(line)
  atomic_write(workdir / ROUNDS_CSV, buf.getvalue().encode())
  from fedjax_seg import plots  # pylint: disable=g-import-not-at-top
  if many:
    plots.write_many_sites(workdir, report, history)
  else:
    plots.write_all(workdir, report, history)

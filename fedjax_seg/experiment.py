"""The host loop: sample -> round -> account -> evaluate -> checkpoint -> log.

`train_and_evaluate(config, workdir)` runs a whole simulation and writes, in
`workdir`: report.json, rounds.csv, plots (PNG) and orbax checkpoints. A run
resumes from its latest checkpoint and then continues bit-identically: all
randomness is derived from the seed along (round, site, step, purpose), the
data and splits are deterministic, and the checkpoint holds the params, the
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

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import centralized
from fedjax_seg import config as config_lib
from fedjax_seg import federated as fed
from fedjax_seg import models
from fedjax_seg import privacy
from fedjax_seg import segmentation_task
from fedjax_seg.data import sites as sites_lib
from fedjax_seg.data import synthetic
from fedjax_seg.federated import client as client_lib
from fedjax_seg.privacy import schedules

REPORT = "report.json"
ROUNDS_CSV = "rounds.csv"
CHECKPOINTS = "checkpoints"
# Settings that may change between a run and its resumption; any other change
# would make the resumed run a different experiment (and its ledger wrong).
_RESUMABLE_CHANGES = ("performance", "eval_every", "checkpoint_every",
                      "stop_after_rounds")


class _DropRdpConvergenceWarnings(pylogging.Filter):
  """dp_accounting warns, once per order and event, when a fractional-order
  series does not converge and it drops that order (the bound stays valid,
  slightly looser); at one event per site per round that floods the log."""

  def filter(self, record):
    return not (record.filename == "rdp_privacy_accountant.py"
                and "failed to converge" in record.getMessage())


pylogging.getLogger("absl").addFilter(_DropRdpConvergenceWarnings())


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
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


def load_data(config: config_lib.DataConfig, seed: int):
  """{"train", "val", "test"}: SliceDatasets split by patient."""
  if config.dataset == "synthetic":
    make = synthetic.generate_volumes if config.volumes else synthetic.generate
    data = make(synthetic.SyntheticConfig(
        image_size=config.image_size, num_slices=config.num_slices,
        patients_scale=config.patients_scale, seed=seed))
    return sites_lib.split_by_patient(data, config.split_fractions, seed)
  path = pathlib.Path(config.data_dir) / config.dataset
  if not path.is_dir():
    raise config_lib.ConfigError(
        f"--dataset: {config.dataset!r} not found in --data_dir="
        f"{config.data_dir} (prepare it with python -m data_prep.prepare).")
  return sites_lib.load_splits(config.dataset, config.data_dir,
                               config.split_fractions, seed)


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


@dataclasses.dataclass
class _Plan:
  """Everything fixed for the whole run (derived from config and data)."""

  site_names: tuple
  units: np.ndarray  # [S] N_k in privacy units (examples or patients).
  sampling_rates: np.ndarray  # [S]
  max_batch_size: int
  base_sigma: np.ndarray  # [S] accounted sigma before the schedule.
  shape: object
  adaptive: privacy.AdaptiveClipping | None
  training_sites: np.ndarray  # [S] bool (held-out sites excluded)


def _adaptive(config: config_lib.PrivacyConfig, batch: int, base: float):
  if config.adaptive_clipping == "off" or not config.record_level:
    return None
  mode = config.adaptive_clipping
  sensitivity = 0.5 if mode == "geometric" else 1.0
  # Default count noise: for the site with the largest sigma the gradient
  # noise is raised by 10% (less for every other site).
  count = config.count_noise_multiplier or (
      sensitivity * base / math.sqrt(1 - 1 / 1.21))
  return privacy.AdaptiveClipping(
      initial_l2_clip_norm=config.l2_clip_norm,
      target_quantile=config.target_quantile,
      count_noise_multiplier=count, expected_batch_size=batch,
      learning_rate=(config.clip_learning_rate if mode == "geometric"
                     else 1.0), mode=mode)


def _meet_target(sigma, rate, units, max_batch, shape, rounds, local_steps,
                 target, delta) -> float:
  """Raises a calibrated sigma until a ledger recording exactly the planned
  events (truncated batches included) stays within the target epsilon.

  Calibration accounts untruncated Poisson sampling; the ledger adds the
  (tiny) truncation slack, which can tip the last digit over the target.
  """
  for _ in range(200):
    # The ledger records the float32 sigma the device applied: plan with it,
    # and keep a hair of margin for the adaptive-clipping conversion.
    planned = [privacy.poisson_gaussian_event(
        float(np.float32(sigma * float(shape(r)))), rate, local_steps,
        dataset_size=units, max_batch_size=max_batch) for r in range(rounds)]
    scratch = privacy.PrivacyLedger(["site"], delta=delta)
    if scratch.epsilon_if("site", planned) <= target * (1 - 1e-6):
      return sigma
    sigma *= 1.0005
  raise AssertionError(f"could not meet target epsilon {target}")


def _plan(config: config_lib.ExperimentConfig, train: sites_lib.SiteArrays):
  p, f = config.privacy, config.federated
  units = np.asarray(train.num_patients if p.unit == "patient"
                     else train.num_examples, np.int64)
  empty = [train.site_names[k] for k in np.flatnonzero(units == 0)]
  if empty:
    raise config_lib.ConfigError(
        f"--split_fractions: sites {empty} have no training data.")
  rates = np.minimum(1.0, f.batch_size / units)
  max_batch = max(fed.max_batch_size_for(int(n), float(q))
                  for n, q in zip(units, rates))
  rounds = f.rounds
  shape = noise_shape(p, rounds)
  if p.record_level and p.target_epsilon is not None:
    sigmas = privacy.calibrate_site_noise_multipliers(
        p.target_epsilon, p.delta,
        site_sizes=dict(zip(train.site_names, map(int, units))),
        batch_size=f.batch_size, steps=rounds * f.local_steps,
        schedule=schedules.per_round(shape, f.local_steps))
    base = np.array([_meet_target(
        sigmas[s], float(q), int(n), max_batch, shape, rounds, f.local_steps,
        p.target_epsilon, p.delta)
                     for s, q, n in zip(train.site_names, rates, units)])
  else:
    base = np.full(len(units), p.noise_multiplier if p.record_level else 0.0)
  held = set(config.data.held_out_sites)
  unknown = held - set(train.site_names)
  if unknown:
    raise config_lib.ConfigError(f"--held_out_sites: unknown sites "
                                 f"{sorted(unknown)}.")
  training = np.array([s not in held for s in train.site_names])
  # The count release must cost less than every site's total noise: size it
  # from the largest sigma any site will use.
  largest = float(base.max() * max(float(shape(r)) for r in range(rounds)))
  return _Plan(train.site_names, units, rates, max_batch, base, shape,
               _adaptive(p, f.batch_size, largest or 1.0), training)


def _trainer(config, model, plan, params):
  p, f, perf = config.privacy, config.federated, config.performance
  local_dp = client_lib.LocalDPConfig(
      enabled=p.record_level, unit="patient" if p.unit == "patient"
      else "example", l2_clip_norm=p.l2_clip_norm,
      adaptive_clipping=plan.adaptive)
  client = fed.ClientConfig(
      local_steps=f.local_steps, expected_batch_size=f.batch_size,
      max_batch_size=plan.max_batch_size, learning_rate=f.learning_rate,
      optimizer=f.local_optimizer,
      prox_mu=f.prox_mu if f.algorithm == "fedprox" else 0.0,
      microbatch_size=perf.microbatch_size, local_loop=perf.local_loop)
  optimizer = {"fedavg": "fedavg", "fedprox": "fedavg", "fedbn": "fedavg",
               "fedavgm": "fedavgm", "fedadam": "fedadam",
               "fedyogi": "fedyogi"}[f.algorithm]
  server = fed.ServerConfig(optimizer=optimizer,
                            learning_rate=f.server_learning_rate,
                            weighting=f.weighting)
  site_dp = None
  if p.use_site_level:
    site_dp = fed.SiteLevelDPConfig(
        l2_clip_norm=p.site_clip_norm, noise_multiplier=p.site_noise_multiplier,
        expected_sites=p.site_sampling_rate * int(plan.training_sites.sum()))
  norm_mask = models.norm_param_mask(params) if f.algorithm == "fedbn" else None
  return fed.FederatedTrainer(segmentation_task.example_loss(model), client,
                              local_dp, server, site_dp, norm_mask,
                              backend=perf.backend)


def _participants(config, plan, root, round_index):
  p, f = config.privacy, config.federated
  num_sites = len(plan.site_names)
  if p.use_site_level:
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=p.site_sampling_rate,
                                   dropout_rate=f.dropout_rate)
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
  return part & plan.training_sites


def _round_sigmas(plan, round_index):
  """(accounted sigma [S], applied gradient sigma [S]) for this round."""
  accounted = plan.base_sigma * float(plan.shape(round_index))
  if plan.adaptive is None:
    return accounted, accounted
  applied = np.array([plan.adaptive.gradient_noise_multiplier(z) if z > 0
                      else 0.0 for z in accounted])
  return accounted, applied


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

  def save(self, step: int, state, meta: dict) -> None:
    ocp = self._ocp
    with _quiet():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()

  def restore(self, step: int, target):
    ocp = self._ocp
    with _quiet():
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target),
          meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


class _quiet:  # pylint: disable=invalid-name
  """Orbax logs every file operation at INFO: keep the round log readable."""

  def __enter__(self):
    self._level = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)

  def __exit__(self, *exc):
    logging.set_verbosity(self._level)


def _comparable(config_dict: dict) -> dict:
  d = json.loads(json.dumps(config_dict))
  for key in _RESUMABLE_CHANGES:
    d.pop(key, None)
  d.get("federated", {}).pop("rounds", None)
  return d


def train_and_evaluate(config: config_lib.ExperimentConfig,
                       workdir: str | os.PathLike) -> dict:
  """Runs (or resumes) a simulation; returns the report (also written)."""
  workdir = pathlib.Path(workdir)
  enable_compilation_cache()
  start_time = time.time()
  p, f = config.privacy, config.federated
  if not p.enabled:
    logging.warning("=" * 70)
    logging.warning("DP IS DISABLED (--nodp): this run has NO privacy "
                    "guarantee. Its epsilons are infinite.")
    logging.warning("=" * 70)

  splits = load_data(config.data, config.seed)
  train = sites_lib.stack_sites(splits["train"])
  val = sites_lib.stack_sites(splits["val"])
  test = sites_lib.stack_sites(splits["test"])
  plan = _plan(config, train)
  # Only now, with data and settings checked, is anything written.
  workdir.mkdir(parents=True, exist_ok=True)
  num_sites = len(plan.site_names)
  model = models.SegmentationModel(config.model.unet_config(
      in_channels=train.image.shape[-1], num_classes=len(train.class_names),
      spatial_dims=train.image.ndim - 3))
  root = jax.random.key(config.seed)
  init_key = privacy.derive_key(root, round_index=0, site=0, step=0,
                                purpose=privacy.Purpose.MODEL_INIT)
  params = model.init(init_key, (1,) + train.image.shape[2:])
  if p.record_level:  # Per-example clipping is only valid for such models.
    probe = jnp.asarray(train.image[0, :min(3, int(train.num_examples[0]))])
    if probe.shape[0] >= 2:
      models.check_per_example_independence(jax.jit(model.apply), params,
                                            probe)
  trainer = _trainer(config, model, plan, params)
  site_data = segmentation_task.site_data(train)
  ledger = privacy.PrivacyLedger(plan.site_names, delta=p.delta,
                                 unit="patient" if p.unit == "patient"
                                 else "example")
  site_ledger = privacy.PrivacyLedger(plan.site_names, delta=p.delta,
                                      unit="site")
  server_state, site_states = trainer.init(params, num_sites)
  history, evals = [], []
  first_round = 0
  checkpointer = _Checkpointer(workdir)
  latest = checkpointer.latest()
  if latest is not None:
    (state, meta) = checkpointer.restore(
        latest, {"server": server_state, "sites": site_states})
    if _comparable(meta["config"]) != _comparable(config.to_dict()):
      raise config_lib.ConfigError(
          f"--workdir={workdir} holds a run with other settings; resuming it "
          "with these would make its privacy ledger wrong. Use a new "
          "--workdir, or the same flags.")
    server_state, site_states = state["server"], state["sites"]
    ledger = privacy.PrivacyLedger.from_dict(meta["ledger"])
    site_ledger = privacy.PrivacyLedger.from_dict(meta["site_ledger"])
    history, evals = meta["history"], meta["evals"]
    first_round = int(meta["rounds_completed"])
    logging.info("resumed %s at round %d", workdir, first_round)

  def checkpoint(rounds_completed):
    checkpointer.save(rounds_completed,
                      {"server": server_state, "sites": site_states},
                      {"rounds_completed": rounds_completed,
                       "ledger": ledger.to_dict(),
                       "site_ledger": site_ledger.to_dict(),
                       "history": history, "evals": evals,
                       "config": config.to_dict()})

  def site_params(states):
    if trainer.norm_mask is None:
      return server_state.params
    return lambda k: client_lib.merge_local(
        server_state.params, jax.tree.map(lambda x: x[k], states.local_params),
        trainer.norm_mask)

  stopped_reason = "completed"
  round_times = []
  rounds_this_run = 0
  for r in range(first_round, f.rounds):
    part = _participants(config, plan, root, r)
    accounted, applied = _round_sigmas(plan, r)
    # Stop BEFORE a round that would take a site past its budget.
    if p.enabled and p.epsilon_budget is not None:
      for k in np.flatnonzero(part):
        name = plan.site_names[k]
        if p.record_level:
          planned = privacy.poisson_gaussian_event(
              accounted[k], plan.sampling_rates[k], f.local_steps,
              dataset_size=int(plan.units[k]),
              max_batch_size=plan.max_batch_size)
          target, which = ledger, "record-level"
        else:
          planned = privacy.poisson_gaussian_event(
              p.site_noise_multiplier, p.site_sampling_rate, 1)
          target, which = site_ledger, "site-level"
        would = target.epsilon_if(name, planned)
        if would > p.epsilon_budget:
          stopped_reason = (
              f"budget: round {r + 1} would take site {name!r} to "
              f"{which} epsilon {would:.3f} > budget {p.epsilon_budget}")
          logging.warning("stopping before round %d: %s", r + 1,
                          stopped_reason)
          break
      if stopped_reason != "completed":
        break
    site_config = fed.SiteConfig(
        jnp.asarray(plan.sampling_rates, jnp.float32),
        jnp.asarray(applied, jnp.float32))
    t0 = time.time()
    server_state, site_states, out = trainer.run_round(
        server_state, site_states, site_data, site_config, part, r, root)
    jax.block_until_ready(server_state.params)
    seconds = time.time() - t0
    round_times.append(seconds)
    m = jax.tree.map(np.asarray, out.client)
    ran = m.steps > 0
    for k in np.flatnonzero(ran):  # Only sites that trained spend budget.
      if p.record_level:
        got = float(m.noise_multiplier[k])
        if not math.isclose(got, applied[k], rel_tol=1e-5, abs_tol=1e-6):
          raise AssertionError(f"site {plan.site_names[k]}: applied sigma "
                               f"{got} != planned {applied[k]}")
        z = (plan.adaptive.accounted_noise_multiplier(got)
             if plan.adaptive else got)
        ledger.record(plan.site_names[k], z, float(m.sampling_rate[k]),
                      int(m.steps[k]), dataset_size=int(plan.units[k]),
                      max_batch_size=plan.max_batch_size)
    if p.use_site_level:
      site_ledger.record_all(float(out.server.noise_multiplier),
                             p.site_sampling_rate, 1)
    eps = ledger.epsilons() if p.record_level else site_ledger.epsilons()
    units = int(m.num_real.sum())
    row = {
        "round": r + 1, "seconds": seconds,
        "participants": [plan.site_names[k] for k in np.flatnonzero(ran)],
        "train_loss": float(m.loss_sum.sum() / max(units, 1)),
        "epsilon": eps if p.enabled else {s: None for s in plan.site_names},
        "sigma": dict(zip(plan.site_names, map(float, accounted))),
        "clip": dict(zip(plan.site_names, map(float, np.where(
            ran, m.l2_clip_norm, np.nan)))),
        "clipped_fraction": float(m.num_clipped.sum() / max(units, 1)),
        "site_level_clip": float(out.server.l2_clip_norm),
    }
    if (r + 1) % config.eval_every == 0 or r + 1 == f.rounds:
      result = centralized.evaluate(model, site_params(site_states), val)
      fg = _nanmean(result["dice_per_site"][:, 1:], axis=-1)
      evals.append({"round": r + 1, "dice_per_site": dict(zip(
          plan.site_names, map(float, fg)))})
      row["val_dice_mean"] = float(_nanmean(fg))
    history.append(row)
    rounds_this_run += 1
    eta = np.mean(round_times) * (f.rounds - r - 1)
    max_eps = max(v for v in eps.values()) if p.enabled else float("inf")
    logging.info(
        "round %d/%d | loss %.4f | eps max %s | sigma %.3f | C %s | "
        "%d sites | %.1f s | ETA %.0f s%s", r + 1, f.rounds, row["train_loss"],
        f"{max_eps:.3f}" if p.enabled else "inf (NO DP)",
        float(np.max(accounted)), f"{np.nanmean(m.l2_clip_norm[ran]):.3f}"
        if p.record_level and ran.any() else "-", int(ran.sum()), seconds,
        eta, f" | val Dice {row['val_dice_mean']:.3f}"
        if "val_dice_mean" in row else "")
    if (r + 1) % config.checkpoint_every == 0 or r + 1 == f.rounds:
      checkpoint(r + 1)
    if (config.stop_after_rounds is not None
        and rounds_this_run >= config.stop_after_rounds and r + 1 < f.rounds):
      logging.warning("stopping after %d rounds of this run (as if killed)",
                      rounds_this_run)
      return {"rounds_completed": r + 1, "stopped_reason": "interrupted"}

  rounds_completed = history[-1]["round"] if history else first_round
  if (stopped_reason != "completed" and rounds_completed > first_round
      and rounds_completed % config.checkpoint_every):
    checkpoint(rounds_completed)  # Not saved yet by the loop.
  test_result = centralized.evaluate(model, site_params(site_states), test,
                                     with_hd95=True)
  report = _report(config, plan, test, test_result, ledger, site_ledger,
                   history, evals, rounds_completed, stopped_reason,
                   time.time() - start_time, round_times)
  report["final_params_sha256"] = params_digest(server_state.params)
  _write_outputs(workdir, report, history, plan)
  return report


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


def _report(config, plan, test, result, ledger, site_ledger, history, evals,
            rounds_completed, stopped_reason, seconds, round_times) -> dict:
  p = config.privacy
  names = plan.site_names
  def fg(a):  # Mean over foreground classes; NaN for sites without data.
    a = np.asarray(a, np.float64)[..., 1:]
    count = np.sum(~np.isnan(a), axis=-1)
    return np.where(count > 0, np.nansum(a, axis=-1) / np.maximum(count, 1),
                    np.nan)

  dice_site = fg(result["dice_per_site"])
  privacy_section = {"enabled": p.enabled, "unit": p.unit, "delta": p.delta,
                     "accountant": "rdp"}
  if not p.enabled:
    privacy_section.update(
        warning="NOT PRIVATE: trained without clipping or noise.",
        epsilon_per_site={s: None for s in names}, epsilon_max=None,
        epsilon_pld_per_site={s: None for s in names}, ledger=None)
  else:
    main = ledger if p.record_level else site_ledger
    privacy_section.update(
        epsilon_per_site=main.epsilons(), epsilon_max=main.max_epsilon(),
        epsilon_pld_per_site={s: main.epsilon_pld(s) for s in names},
        ledger=main.to_dict(),
        sampling_rate_per_site=dict(zip(names, map(float,
                                                   plan.sampling_rates))),
        noise_multiplier_per_site=dict(zip(names, map(float,
                                                      plan.base_sigma))),
        max_batch_size=plan.max_batch_size,
        epsilon_budget=p.epsilon_budget)
    if p.use_site_level and p.record_level:
      privacy_section["site_level"] = {
          "epsilon": site_ledger.max_epsilon(),
          "ledger": site_ledger.to_dict()}
  modality_names = test.modality_names
  return {
      "rounds_completed": rounds_completed,
      "stopped_reason": stopped_reason,
      "privacy": privacy_section,
      "metrics": {
          "split": "test",
          "dice_per_site": {s: _nan_to_none(float(v)) for s, v in
                            zip(names, dice_site)},
          "dice_per_modality": {m: _nan_to_none(float(v)) for m, v in zip(
              modality_names, fg(result["dice_per_modality"]))},
          "dice_mean": _nan_to_none(float(_nanmean(dice_site))),
          "dice_per_site_per_class": {
              s: dict(zip(test.class_names, map(float, row)))
              for s, row in zip(names, result["dice_per_site"])},
          "iou_per_site": {s: _nan_to_none(float(v)) for s, v in
                           zip(names, fg(result["iou_per_site"]))},
          "hd95_per_site": {s: _nan_to_none(float(np.mean(v)))
                            for s, v in zip(names, result["hd95_per_site"])},
          "validation_history": evals,
      },
      "config": config.to_dict(),
      "sites": {s: {"modality": m, "train_units": int(n)} for s, m, n in
                zip(names, test.site_modalities, plan.units)},
      "versions": _versions(),
      "device": {"platform": jax.default_backend(),
                 "devices": [str(d) for d in jax.devices()],
                 "machine": platform.machine(),
                 "cpu_count": os.cpu_count(),
                 "backend": config.performance.backend},
      "timing": {"total_seconds": seconds,
                 "rounds_this_run": len(round_times),
                 "first_round_seconds": (round_times[0] if round_times
                                         else None),
                 "mean_round_seconds": (float(np.mean(round_times[1:]))
                                        if len(round_times) > 1 else None)},
  }


def _write_outputs(workdir: pathlib.Path, report: dict, history: list,
                   plan) -> None:
  _atomic_write(workdir / REPORT, json.dumps(report, indent=1).encode())
  buf = io.StringIO()
  writer = csv.writer(buf)
  names = list(plan.site_names)
  writer.writerow(["round", "seconds", "participants", "train_loss",
                   "clipped_fraction", "val_dice_mean"]
                  + [f"epsilon_{s}" for s in names]
                  + [f"sigma_{s}" for s in names]
                  + [f"clip_{s}" for s in names])
  for row in history:
    writer.writerow([row["round"], f"{row['seconds']:.3f}",
                     len(row["participants"]), f"{row['train_loss']:.5f}",
                     f"{row['clipped_fraction']:.4f}",
                     row.get("val_dice_mean", "")]
                    + [row["epsilon"][s] for s in names]
                    + [row["sigma"][s] for s in names]
                    + [row["clip"][s] for s in names])
  _atomic_write(workdir / ROUNDS_CSV, buf.getvalue().encode())
  from fedjax_seg import plots  # pylint: disable=g-import-not-at-top
  plots.write_all(workdir, report, history)

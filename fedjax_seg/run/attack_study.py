"""Gradient inversion against a run's model: what the server could see.

`run_study(sim, config)` takes a finished (or interrupted) run, loaded as an
`loop.Simulation`, and for each chosen site, batch size B, round
("first": the model every site starts from, before round 1; "last": the
model after the last completed round) and setting (`capture.SETTINGS`: no
DP, example-level DP, patient-level DP at the run's sigma and clip norm of
that round and site), captures the update one local step on B target slices
would release (`capture.capture_update`) and attacks it with
`gradient_inversion.invert_gradients`. Each reconstruction is scored against
the true slices (`image_metrics.matched_metrics`: SSIM, PSNR, MSE).

Targets are slices of held-out TEST patients of the site (never training
data): for each patient, the B consecutive slices with the most foreground;
the patients with the most foreground first. Their images, like the test
metrics of a run, are held-out data: the outputs show them.

The epsilon of a DP setting is the guarantee the run's noise gives over all
its rounds in that setting's unit: for the run's own unit, the ledger's
figure (the report's); for the other unit, the figure of the same run with
`--unit` set to it (same sigmas, expected batch size and rounds charged),
from the same accountant (the run's noise accounted at that unit: with
--target_epsilon a run at that unit would have calibrated another sigma).
The attacked step is one of the releases that guarantee covers. "last"
attacks the model after the last completed round under that round's noise:
the next release such a site would make. The capture is one plain step:
with --augmult the engine's release averages augmented copies, which only
makes the attacker's task harder. With B slices the attacker is given the
best case: a step that sampled exactly its targets, nothing else.

Keys: the release noise and the attack's restarts have their own purposes
(`Purpose.ATTACK_RELEASE`, `Purpose.ATTACK_RESTARTS`), derived from the
run's root along (round, site, target) and then (round label, B, setting),
so no attack key equals a training key or another attack key.
"""

import dataclasses
import math
import pathlib
import time
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg.privacy import plan as privacy_plan
from fedjax_seg.run import config as config_lib
from fedjax_seg import privacy
from fedjax_seg.segmentation import task as segmentation_task
from fedjax_seg.attacks import capture
from fedjax_seg.attacks import gradient_inversion
from fedjax_seg.attacks import image_metrics
from fedjax_seg.data import nifti
from fedjax_seg.data import sites as sites_lib

ROUNDS = ("first", "last")
# The attack's box constraint, a public fact of the preprocessing
# (`data.nifti.normalize`, and the synthetic data alike): CT (windowed) and
# X-ray / other (percentile-scaled) images are in [0, 1]; MRI is z-scored per
# volume, where values beyond -4 and 6 standard deviations are rare.
DATA_RANGE = (0.0, 1.0)
Z_SCORED_RANGE = (-4.0, 6.0)


def data_range(modality: str) -> tuple[float, float]:
  """The box (low, high) images of `modality` lie in after preprocessing."""
  return (Z_SCORED_RANGE if nifti.normalization_for(modality) == "MRI"
          else DATA_RANGE)


def scored_metrics(reconstructions: np.ndarray, true: np.ndarray) -> dict:
  """`image_metrics.matched_metrics` on the true images' own scale: both
  shifted by the true images' minimum, with their max - min as the peak
  value of PSNR and the dynamic range L of SSIM (comparable across
  modalities whatever their normalisation)."""
  low, high = float(np.min(true)), float(np.max(true))
  return image_metrics.matched_metrics(
      np.asarray(reconstructions) - low, np.asarray(true) - low,
      max(high - low, 1e-6))


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """What to attack.

  Attributes:
    sites: site names (empty: the first training site).
    targets: target groups per site and batch size (held-out patients).
    batch_sizes: B of the attacked steps.
    rounds: subset of `ROUNDS`.
    settings: subset of `capture.SETTINGS`.
    inversion: the attack's settings (its `data_range` is replaced per
      site by `data_range` of the site's modality).
  """

  sites: tuple[str, ...] = ()
  targets: int = 2
  batch_sizes: tuple[int, ...] = (1, 4)
  rounds: tuple[str, ...] = ROUNDS
  settings: tuple[str, ...] = capture.SETTINGS
  inversion: gradient_inversion.InversionConfig = (
      gradient_inversion.InversionConfig(
          iterations=300, restarts=1, tv_weight=0.01, learning_rate=0.05))

  def __post_init__(self):
    bad = lambda values, allowed: [v for v in values if v not in allowed]
    if not self.rounds or bad(self.rounds, ROUNDS):
      raise config_lib.ConfigError(
          f"--attack_rounds: choose from {ROUNDS}, got {self.rounds}.")
    if not self.settings or bad(self.settings, capture.SETTINGS):
      raise config_lib.ConfigError(
          f"--attack_settings: choose from {capture.SETTINGS}, got "
          f"{self.settings}.")
    if not self.batch_sizes or min(self.batch_sizes) < 1:
      raise config_lib.ConfigError(
          f"--attack_batch_sizes: need B >= 1, got {self.batch_sizes}.")
    if self.targets < 1:
      raise config_lib.ConfigError("--attack_targets: must be >= 1.")


@dataclasses.dataclass(frozen=True)
class Target:
  """B held-out slices of one test patient.

  Attributes:
    site: site index.
    patient: the patient's index within the site's test split.
    positions: [B] positions of the slices in the test arrays' slice axis.
    slice_index: [B] their slice numbers within the volume.
  """

  site: int
  patient: int
  positions: tuple[int, ...]
  slice_index: tuple[int, ...]


def select_targets(test: sites_lib.SiteArrays, site: int, batch_size: int,
                   count: int) -> list[Target]:
  """Up to `count` targets of `batch_size` slices at `site`: per test
  patient the window of consecutive slices with the most foreground pixels,
  patients ranked by it (ties by patient index). Deterministic."""
  candidates = []
  for p in range(int(test.num_patients[site])):
    positions = test.groups[site, p][test.group_mask[site, p]]
    positions = positions[np.argsort(test.slice_index[site, positions])]
    if len(positions) < batch_size:
      continue
    foreground = (test.label[site, positions] > 0).reshape(
        len(positions), -1).sum(axis=1)
    sums = np.convolve(foreground, np.ones(batch_size), "valid")
    start = int(np.argmax(sums))
    window = positions[start:start + batch_size]
    candidates.append((-float(sums[start]), p, window))
  candidates.sort(key=lambda c: (c[0], c[1]))
  return [Target(site, p, tuple(map(int, w)),
                 tuple(int(test.slice_index[site, i]) for i in w))
          for _, p, w in candidates[:count]]


def attack_keys(root: jax.Array, *, round_index: int, round_label: str,
                site: int, target: int, batch_size: int,
                setting: str) -> tuple[jax.Array, jax.Array]:
  """(release noise key, restarts key) of one attacked update."""
  def derive(purpose):
    key = privacy.derive_key(root, round_index=round_index, site=site,
                             step=target, purpose=purpose)
    for value in (ROUNDS.index(round_label), batch_size,
                  capture.SETTINGS.index(setting)):
      key = jax.random.fold_in(key, value)
    return key
  return (derive(privacy.Purpose.ATTACK_RELEASE),
          derive(privacy.Purpose.ATTACK_RESTARTS))


def setting_epsilon(sim, train: sites_lib.SiteArrays, site: int,
                    setting: str) -> tuple[float | None, str]:
  """(epsilon, label) of a setting at `site` over the run's charged rounds
  (None, "no DP") for "nodp"); see the module docstring."""
  if setting == "nodp":
    return None, "no DP"
  config, plan, state = sim.config, sim.run.plan, sim.state
  unit = privacy.PrivacyUnit(setting)
  name = plan.site_names[site]
  if unit is plan.unit:
    return float(state.ledger.epsilon(name)), unit.epsilon_label
  if plan.noise.mechanism is not None:
    # Its groups, rates and strategies are the run's unit's: the other
    # unit's accounting would need its own plan (not derived here).
    raise config_lib.ConfigError(
        f"--attack_settings={setting}: with --noise_mechanism="
        f"{config.privacy.noise_mechanism} only the run's own unit "
        f"({plan.unit.value}) is accounted; attack that setting.")
  counts = np.asarray(train.num_patients if unit is privacy.PrivacyUnit.PATIENT
                      else train.num_examples, np.int64)
  # The run's noise, as the plan of that unit's sampling would account it.
  rates, max_batch = privacy_plan.sampling_for(counts,
                                               config.federated.batch_size)
  other = dataclasses.replace(plan.noise, unit=unit, units=counts,
                              sampling_rates=rates, max_batch_size=max_batch)
  ledger = privacy.PrivacyLedger([name], delta=config.privacy.delta,
                                 unit=unit)
  for r in state.charged_rounds[name]:
    ledger.record_event(name, other.record_level_event(r, site))
  return float(ledger.epsilon(name)), unit.epsilon_label


def _round_settings(sim, site: int, round_label: str):
  """(round index, params, sigma, clip norm) of a round at a site."""
  config, plan, state = sim.config, sim.run.plan, sim.state
  if round_label == "first":
    r, params = 0, sim.initial_params
  else:
    if state.rounds_completed < 1:
      raise config_lib.ConfigError(
          f"--attack_rounds: the run in {sim.workdir} has no completed round "
          "to attack as 'last'.")
    r, params = state.rounds_completed - 1, sim.site_params(site)
  # Restored arrays are committed to a device, fresh ones are not: one form
  # for both, so that the attack compiles once per batch size.
  params = jax.tree.map(jnp.asarray, jax.device_get(params))
  sigma = (float(plan.noise.applied_sigma[r, site])
           if config.privacy.record_level else 0.0)
  # The clip norm the site used in round r; a round it sat out records NaN:
  # then its latest earlier one (adaptive clipping keeps it), else the
  # configured C.
  clip = config.privacy.l2_clip_norm
  for row in reversed(state.history[:r + 1]):
    value = row.get("clip", {}).get(plan.site_names[site])
    if value is not None and math.isfinite(float(value)):
      clip = float(value)
      break
  return r, params, sigma, clip


def _stats(values: list[float]) -> dict:
  values = np.asarray(values, np.float64)
  return {"mean": float(values.mean()), "std": float(values.std()),
          "min": float(values.min()), "max": float(values.max())}


def run_study(sim, config: StudyConfig, train: sites_lib.SiteArrays
              ) -> tuple[dict, dict]:
  """Attacks the run's updates; returns (results, images).

  Args:
    sim: the run (`loop.Simulation`, restored from its workdir).
    config: what to attack.
    train: the run's training split (unit counts, for the epsilon of the
      setting whose unit is not the run's).

  Returns:
    `results` (JSON-ready: the settings, targets and one entry per
    attacked update with per-target SSIM/PSNR/MSE and their mean, std, min,
    max over targets) and `images` {(site, B): {"true": [T*B, H, W, C],
    (round, setting): [T*B, H, W, C] matched reconstructions}} for the grid.
  """
  run, plan = sim.run, sim.run.plan
  names = list(plan.site_names)
  training = [s for s, t in zip(names, plan.noise.training_sites) if t]
  sites = list(config.sites) or training[:1]
  unknown = [s for s in sites if s not in names]
  if unknown:
    raise config_lib.ConfigError(f"--attack_sites: unknown sites {unknown} "
                                 f"(sites: {names}).")
  held = [s for s in sites if s not in training]
  if held:
    raise config_lib.ConfigError(
        f"--attack_sites: {held} did not train in this run (held out); "
        f"training sites: {training}.")
  dp_settings = [s for s in config.settings if s != "nodp"]
  if dp_settings and not sim.config.privacy.record_level:
    raise config_lib.ConfigError(
        f"--attack_settings: {dp_settings} need a run with record-level DP; "
        f"the run in {sim.workdir} has none. Use --attack_settings=nodp or "
        "attack a DP run.")
  if sim.config.data.volumes:
    raise config_lib.ConfigError(
        "--volumes: the attack study attacks 2D slice models; this run "
        "trained a 3D model.")
  if sim.config.data.num_sites is not None:
    raise config_lib.ConfigError(
        "--num_sites: the attack study needs the run's sites stacked in "
        "memory; attack a run of the 8 default sites (or a prepared "
        "dataset).")
  loss_fn = segmentation_task.example_loss(run.model)
  test = run.data.test
  image_shape = tuple(test.image.shape[2:])
  entries, images, targets_out = [], {}, {}
  for site_name in sites:
    k = names.index(site_name)
    inversion = dataclasses.replace(
        config.inversion, data_range=data_range(test.site_modalities[k]))
    epsilons = {s: setting_epsilon(sim, train, k, s) for s in config.settings}
    for batch_size in config.batch_sizes:
      targets = select_targets(test, k, batch_size, config.targets)
      if not targets:
        raise config_lib.ConfigError(
            f"--attack_batch_sizes: no test patient of site {site_name} has "
            f"{batch_size} slices.")
      targets_out.setdefault(site_name, {})[str(batch_size)] = [
          {"test_patient": t.patient, "slice_index": list(t.slice_index)}
          for t in targets]
      true = np.concatenate([test.image[k, list(t.positions)]
                             for t in targets])
      grid = images[(site_name, batch_size)] = {"true": true}
      for round_label in config.rounds:
        r, params, sigma, clip = _round_settings(sim, k, round_label)
        for setting in config.settings:
          per_target, recon, start = [], [], time.perf_counter()
          for i, t in enumerate(targets):
            noise_key, restart_key = attack_keys(
                run.root, round_index=r, round_label=round_label, site=k,
                target=i, batch_size=batch_size, setting=setting)
            x = test.image[k, list(t.positions)]
            y = test.label[k, list(t.positions)].astype(np.int32)
            update = capture.capture_update(
                loss_fn, params, x, y, setting, l2_clip_norm=clip,
                noise_multiplier=sigma, noise_key=noise_key)
            found = gradient_inversion.invert_gradients(
                loss_fn, params, update, y, image_shape, restart_key,
                inversion, num_classes=len(test.class_names))
            m = scored_metrics(found.images, x)
            recon.append(np.asarray(found.images)[m["match"]])
            per_target.append({
                "test_patient": t.patient,
                "slice_index": list(t.slice_index),
                "ssim": m["ssim"].tolist(), "psnr": m["psnr"].tolist(),
                "mse": m["mse"].tolist(),
                "gradient_cosine": float(found.cosine)})
          grid[(round_label, setting)] = np.concatenate(recon)
          epsilon, label = epsilons[setting]
          dp = setting != "nodp"
          entry = {
              "site": site_name, "round": round_label, "round_index": r,
              "batch_size": batch_size, "setting": setting,
              "noise_multiplier": sigma if dp else 0.0,
              "l2_clip_norm": clip if dp else None,
              "epsilon": epsilon, "epsilon_label": label,
              "delta": sim.config.privacy.delta if dp else None,
              "targets": per_target,
              "seconds": time.perf_counter() - start}
          for metric in ("ssim", "psnr", "mse"):
            # Per target: the mean over its B slices; spread over targets.
            entry[metric] = _stats([float(np.mean(t[metric]))
                                    for t in per_target])
          entries.append(entry)
          logging.info(
              "attack %s B=%d %s round %s: SSIM %.3f +- %.3f, PSNR %.1f dB "
              "(%s %s; %.0f s)", site_name, batch_size, setting, round_label,
              entry["ssim"]["mean"], entry["ssim"]["std"],
              entry["psnr"]["mean"], label,
              "-" if epsilon is None else f"{epsilon:.3f}", entry["seconds"])
  results = {
      "run": {"workdir": str(sim.workdir),
              "rounds_completed": sim.state.rounds_completed,
              "unit": plan.unit.value, "seed": sim.config.seed,
              "model": dataclasses.asdict(sim.config.model)},
      "study": {"sites": sites, "targets": config.targets,
                "batch_sizes": list(config.batch_sizes),
                "rounds": list(config.rounds),
                "settings": list(config.settings),
                "inversion": dataclasses.asdict(config.inversion),
                "data_range_per_site": {
                    s: data_range(test.site_modalities[names.index(s)])
                    for s in sites}},
      "targets": targets_out,
      "attacks": entries,
      "notes": {
          "targets": "slices of held-out test patients (not training data); "
                     "the PNG grids show them and their reconstructions",
          "update": "one local step on exactly the B target slices (the "
                    "attacker's best case; no augmentation even if the run "
                    "used --augmult); DP settings at the run's sigma "
                    "and clip norm of that round and site; 'last' is the "
                    "final model under the last round's noise",
          "epsilon": "the run's guarantee over all its rounds in the "
                     "setting's unit (the run's own unit: the ledger's "
                     "figure; the other unit: the same noise with --unit "
                     "set to it)",
          "metrics": "SSIM, PSNR (dB) and MSE on the true slices' scale "
                     "(peak = their max - min); per target the mean over its "
                     "B slices, each matched one-to-one to a reconstruction;"
                     " mean/std/min/max over targets"},
  }
  if any(math.isnan(e["ssim"]["mean"]) for e in entries):
    logging.warning("some attack metrics are NaN")
  return results, images


def write_grids(workdir, results: dict, images: dict) -> list:
  """One PNG per (site, B): rows are the true slices, columns the true image
  then the reconstruction of each (round, setting). Returns the paths."""
  from fedjax_seg.run import plots  # pylint: disable=g-import-not-at-top
  plt = plots.plt
  paths = []
  for (site, batch_size), grid in images.items():
    columns = ["true"] + [c for c in grid if c != "true"]
    rows = grid["true"].shape[0]
    fig, axes = plt.subplots(rows, len(columns), squeeze=False,
                             figsize=(1.6 * len(columns), 1.6 * rows))
    for j, column in enumerate(columns):
      stack = grid[column]
      title = column if column == "true" else f"{column[0]}\n{column[1]}"
      if column != "true":
        entry = next(e for e in results["attacks"] if e["site"] == site and
                     e["batch_size"] == batch_size and
                     e["round"] == column[0] and e["setting"] == column[1])
        title += f"\nSSIM {entry['ssim']['mean']:.2f}"
      for i in range(rows):
        ax = axes[i, j]
        true = grid["true"][i, ..., 0]  # Every row on its true image's scale.
        ax.imshow(stack[i, ..., 0], cmap="gray", vmin=float(true.min()),
                  vmax=float(true.max()))
        ax.set_xticks([])
        ax.set_yticks([])
        if i == 0:
          ax.set_title(title, fontsize=7)
    fig.suptitle(f"{site}, B={batch_size}", fontsize=9, y=1.0 + 0.25 / rows)
    path = pathlib.Path(workdir) / f"attack_{site}_b{batch_size}.png"
    plots.save_figure(fig, path)
    paths.append(path)
  return paths


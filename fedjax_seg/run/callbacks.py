"""The loop's side effects, one callback each (as pfl-research's callbacks).

The loop (`run.loop`) calls, around every round, `on_round_begin` (which may
stop the run before the round: the budget) and `on_round_end` (with the
round's history row), in the order of `default_callbacks`: budget stop,
validation, stopwatch, round log, checkpoint, TensorBoard. Each reads the
simulation (`sim.run`, `sim.state`) and writes only what its name says.
"""

import time

from absl import logging
import numpy as np

from fedjax_seg import privacy
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import report as report_lib
from fedjax_seg.run import state as state_lib
from fedjax_seg.segmentation import evaluation


class Callback:
  """A side effect of the loop. Every hook does nothing by default."""

  def on_round_begin(self, sim, round_index: int,
                     participating: np.ndarray) -> str | None:
    """Before the device round; a str stops the run (the reason)."""
    del sim, round_index, participating
    return None

  def on_round_end(self, sim, row: dict) -> None:
    """After the round is accounted; `row` is its history row."""
    del sim, row

  def close(self) -> None:
    """When this process's part of the run ends (finished, stopped or
    --stop_after_rounds): releases what the callback holds open."""


class BudgetStop(Callback):
  """Stops before the first round that would take any site it charges, in
  any ledger in use, past --epsilon_budget (`NoisePlan.budget_stop`)."""

  def on_round_begin(self, sim, round_index, participating):
    p = sim.config.privacy
    if not p.enabled:
      return None
    return sim.run.plan.noise.budget_stop(
        sim.state.ledger, sim.state.site_ledger, round_index, participating,
        p.epsilon_budget)


class Validation(Callback):
  """Every --eval_every rounds and at the last: validation Dice per site on
  held-out patients (with --num_sites, of the fixed sample of sites) into
  `state.evals` and the row's `val_dice_mean`; its seconds into the row's
  `evaluation_seconds`."""

  def on_round_end(self, sim, row):
    config, run, state = sim.config, sim.run, sim.state
    done = row["round"]
    row["evaluation_seconds"] = 0.0
    if done % config.eval_every and done != config.federated.rounds:
      return
    start = time.perf_counter()
    result = evaluation.evaluate(
        run.model, state_lib.site_params(run, state, True, run.data.val_ids),
        run.data.split_at("val", done - 1))
    fg = report_lib.nanmean(result["dice_per_site"][:, 1:], axis=-1)
    state.evals.append({"round": done, "dice_per_site": dict(zip(
        run.data.val.site_names, map(float, fg)))})
    row["val_dice_mean"] = float(report_lib.nanmean(fg))
    row["evaluation_seconds"] = time.perf_counter() - start


def stamp(row: dict, round_start: float) -> None:
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
  row["host_seconds"] = max(0.0, wall - row["device_seconds"]
                            - row["evaluation_seconds"])


class Stopwatch(Callback):
  """The round's wall, host and evaluation seconds into its row."""

  def on_round_end(self, sim, row):
    stamp(row, sim.round_start)
    sim.round_times.append(row["wall_seconds"])


class RoundLog(Callback):
  """One log line per round: the worst epsilon so far, sigma, clip norm,
  sites, seconds, ETA, validation Dice (and NOT COVERED diagnostics only
  with --release_training_diagnostics)."""

  def on_round_end(self, sim, row):
    run = sim.run
    p, f = run.config.privacy, run.config.federated
    eta = np.mean(sim.round_times) * (f.rounds - row["round"])
    label = run.plan.unit.epsilon_label if p.record_level else (
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
    if report_lib.NOT_COVERED_KEY in row:
      d = row[report_lib.NOT_COVERED_KEY]
      extra = (f" | NOT COVERED BY THE GUARANTEE: train loss "
               f"{d['train_loss']:.4f}, clipped {d['clipped_fraction']:.3f}")
      if "participants" in d:
        extra += f", {len(d['participants'])} sites sampled"
    sigma = row.get("sigma_max") or max(row["sigma"].values(), default=0.0)
    noise = (f"sigma {sigma:.3f}" if p.record_level
             else f"z {run.plan.noise.site_applied_sigma:.3f} (site)"
             if p.enabled else "no noise")
    logging.info(
        "round %d/%d | %s | %s | C %s%s | %.2f s (device %.2f s) | ETA %.0f s"
        "%s%s", row["round"], f.rounds, eps, noise, clip, sites,
        row["wall_seconds"], row["device_seconds"], eta,
        f" | val Dice {row['val_dice_mean']:.3f}" if "val_dice_mean" in row
        else "", extra)


class Checkpoint(Callback):
  """Every --checkpoint_every rounds and at the last: the state, ledgers and
  history to orbax (`artifacts.Checkpointer`); the row is then timed again
  (its checkpointed copy was timed up to the save)."""

  def on_round_end(self, sim, row):
    config = sim.config
    done = row["round"]
    if done % config.checkpoint_every and done != config.federated.rounds:
      return
    save(sim)
    stamp(row, sim.round_start)


def save(sim) -> None:
  """Checkpoints the simulation's state now."""
  run, state = sim.run, sim.state
  run.checkpointer.save(state.rounds_completed, state.tree(),
                        state.meta(run.config, run.plan))


class TensorBoard(Callback):
  """--tensorboard: per round, each site's epsilon, sigma and clip norm, the
  validation Dice and the round's wall and device seconds as TensorBoard
  scalars in the workdir (tensorboardX, extra `tensorboard`; host 0 only).
  Only values the history row holds: released, public or held-out."""

  def __init__(self, logdir):
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise config_lib.ConfigError(
          "--tensorboard: needs tensorboardX (pip install -e "
          "'.[tensorboard]').") from e
    self._open = lambda: tensorboardX.SummaryWriter(str(logdir))
    self._writer = None  # Opened at the first round: nothing written before.

  def on_round_end(self, sim, row):
    if self._writer is None:
      self._writer = self._open()
    step = row["round"]
    write = self._writer.add_scalar
    label = sim.run.plan.unit.epsilon_label.replace(" ", "_")
    for key, tag in (("epsilon", label), ("sigma", "sigma"), ("clip", "clip")):
      for site, value in (row.get(key) or {}).items():
        if value is not None and np.isfinite(value):
          write(f"{tag}/{site}", float(value), step)
    for key in ("epsilon_max", "sigma_max", "site_level_clip",
                "val_dice_mean", "wall_seconds", "device_seconds"):
      if row.get(key) is not None and np.isfinite(row[key]):
        write(f"round/{key}", float(row[key]), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()


def default_callbacks(config, workdir, writer: bool) -> list[Callback]:
  """The loop's callbacks, in order (TensorBoard only with --tensorboard, on
  the writing host)."""
  out = [BudgetStop(), Validation(), Stopwatch(), RoundLog(), Checkpoint()]
  if config.tensorboard and writer:
    out.append(TensorBoard(workdir))
  return out

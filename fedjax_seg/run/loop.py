"""The host loop: `train_and_evaluate(config, workdir)`.

  run = setup(config)              # data, noise plan, model, task, trainer
  state = restore_or_init(run)     # or the latest checkpoint's
  for each round r:
    part = participants(run, r)    # from the noise root alone
    callbacks: on_round_begin      # the budget may stop the run here
    device_round(run, state, r)    # one jitted round over the sites
    record(run, state, r)          # check the applied noise, charge ledgers
    row = round_row(...)           # covered, public or held-out values
    callbacks: on_round_end        # validation, stopwatch, log, checkpoint,
                                   # TensorBoard
  finish: test evaluation, the report (verified by fedjax_seg.verifier),
          CSV, plots

`Simulation` is that loop stepped round by round: `train_and_evaluate`
drives one; a sweep (`run.sweep`) drives several in lockstep and runs their
device rounds together (`round.device_round` over members). A run resumes
from its latest checkpoint and then continues bit-identically: every key of
the mechanism derives from the run's noise root (a secret kept in its
checkpoint directory, or --noise_seed; `run.noise_secret`) along (round,
site, step, purpose), the model's initialisation from --seed, the data and
splits are deterministic, and the checkpoint holds the params, the server
and site states (optimizer, adaptive clipping, FedBN parameters), the
privacy ledgers and the history.
"""

import hashlib
import json
import logging as pylogging
import os
import pathlib
import time

from absl import logging
import numpy as np

from fedjax_seg.run import artifacts
from fedjax_seg.run import callbacks as callbacks_lib
from fedjax_seg.run import config as config_lib
from fedjax_seg.run import distributed
from fedjax_seg.run import noise_secret
from fedjax_seg.run import report as report_lib
from fedjax_seg.run import round as round_lib
from fedjax_seg.run import setup as setup_lib
from fedjax_seg.run import state as state_lib
from fedjax_seg.segmentation import evaluation

INTERRUPTED = {"stopped_reason": "interrupted"}


class _DropRdpConvergenceWarnings(pylogging.Filter):
  """dp_accounting warns, once per order and event, when a fractional-order
  series does not converge and it drops that order (the bound stays valid,
  slightly looser); at one event per site per round that floods the log."""

  def filter(self, record):
    return not (record.filename == "rdp_privacy_accountant.py"
                and "failed to converge" in record.getMessage())


pylogging.getLogger("absl").addFilter(_DropRdpConvergenceWarnings())


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

  Per round: `begin_round` (participants, callbacks' on_round_begin: the
  budget), the device round (`run_round`, or a sweep's batched one),
  `end_round` (ledgers, history row, callbacks' on_round_end); at the end
  `finish` (test evaluation, verified report, CSV, plots).

  Args:
    config: the run's settings.
    workdir: its output directory (resumes from its latest checkpoint).
    splits: preloaded `data.load(config.data, config.data_seed)` (a sweep
      loads the data once for all members).
    trainers: {signature: FederatedTrainer} shared between runs (a sweep's
      members with equal `setup.trainer_signature` use one trainer, one
      compilation).
  """

  def __init__(self, config: config_lib.ExperimentConfig,
               workdir: str | os.PathLike, *, splits=None,
               trainers: dict | None = None):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.start_time = time.time()
    _warn_about_settings(config)
    self.callbacks = callbacks_lib.default_callbacks(
        config, self.workdir, distributed.is_writer())
    self.run, params = setup_lib.setup(config, self.workdir, splits,
                                       trainers)
    # The model before round 1 (from the MODEL_INIT key; public).
    self.initial_params = params
    self.state = state_lib.restore_or_init(self.run, params)
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
    self.round_start = 0.0

  @property
  def next_round(self) -> int:
    return self.state.rounds_completed

  def site_params(self, site: int):
    """The parameters site `site` trains from now: the server's, with its
    own normalisation parameters under FedBN."""
    params = state_lib.site_params(self.run, self.state)
    return params(site) if callable(params) else params

  def begin_round(self) -> np.ndarray | None:
    """The participants [S] bool of the next round, or None when the run
    stops (all rounds done, or a callback stops it: the budget)."""
    if self.stopped:
      return None
    r = self.next_round
    self.round_start = time.perf_counter()
    part = round_lib.participants(self.run, r)
    for callback in self.callbacks:
      reason = callback.on_round_begin(self, r, part)
      if reason is not None:
        self.stopped_reason = reason
        self.stopped = True
        logging.warning("stopping before round %d: %s", r + 1, reason)
        return None
    return part

  def run_round(self, part: np.ndarray):
    """This run's device round alone: (new state, output as numpy, device
    seconds)."""
    return round_lib.device_round([self.run], [self.state], self.next_round,
                                  [part])[0]

  def end_round(self, part: np.ndarray, state: state_lib.RunState, out,
                seconds: float) -> bool:
    """Accounts and records the round just run on the device, then runs
    the callbacks. Returns False if the process should stop here as if
    killed (--stop_after_rounds)."""
    config, run = self.config, self.run
    rounds = config.federated.rounds
    r = self.next_round
    self.state = state
    state_lib.average(config, state)
    round_lib.record(run, state, r, part, out)
    row = report_lib.round_row(run, state, r, part, out, seconds)
    # Counted before validation: the EMA now holds r + 1 models.
    state.rounds_completed = r + 1
    state.history.append(row)
    for callback in self.callbacks:
      callback.on_round_end(self, row)
    if r + 1 >= rounds:
      self.stopped = True
    rounds_this_run = state.rounds_completed - self.first_round
    if (config.stop_after_rounds is not None
        and rounds_this_run >= config.stop_after_rounds
        and r + 1 < rounds):
      logging.warning("stopping after %d rounds of this run (as if killed)",
                      rounds_this_run)
      self._close()
      return False
    return True

  def _close(self) -> None:
    for callback in self.callbacks:
      callback.close()

  def finish(self) -> dict:
    """Test evaluation, the verified report and every output file."""
    config, run, state = self.config, self.run, self.state
    p = config.privacy
    self._close()
    if (self.stopped_reason != "completed"
        and state.rounds_completed > self.first_round
        and state.rounds_completed % config.checkpoint_every):
      callbacks_lib.save(self)  # Not saved yet by the loop.
    stopped_reason = self.stopped_reason
    if p.enabled and p.record_level and p.target_epsilon is not None:
      worst = state.ledger.max_epsilon()
      if worst > p.target_epsilon:
        above = (f"{run.plan.unit.epsilon_label} {worst:.4f} is above "
                 f"--target_epsilon={p.target_epsilon}")
        logging.warning("%s", above)
        stopped_reason += f" ({above})"
    params = state_lib.site_params(run, state, True)
    if run.data.cohorts is None:
      test_result = evaluation.evaluate(
          run.model, params,
          run.data.split_at("test", max(state.rounds_completed - 1, 0)),
          with_hd95=True)
    else:
      consortium = run.data.cohorts.consortium
      test_result = evaluation.evaluate_in_blocks(
          run.model, params,
          lambda block: consortium.site_arrays(block, "test"),
          run.data.test_ids, with_hd95=True)
    report = report_lib.build(run, state, test_result, stopped_reason,
                              time.time() - self.start_time,
                              self.round_times)
    report["final_params_sha256"] = artifacts.params_digest(
        state.server_state.params)
    if config.federated.ema_decay:
      report["metrics"]["evaluated_model"] = (
          f"EMA of the global model over rounds, decay "
          f"{config.federated.ema_decay}, debiased (post-processing)")
      report["evaluated_params_sha256"] = artifacts.params_digest(
          state_lib.evaluated_params(config, state))
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
      report_lib.write_outputs(self.workdir, report, state.history, run.plan,
                               report_lib.rounds_charged(state, run.plan))
    return report


def train_and_evaluate(config: config_lib.ExperimentConfig,
                       workdir: str | os.PathLike) -> dict:
  """Runs (or resumes) a simulation; returns the report (also written).

  The steps, over one `RunState`: setup (data, noise plan, model, trainer),
  restore or init, then per round: participants, callbacks before the round
  (budget), device round, record round (ledgers), history row, callbacks
  after it (validation, stopwatch, log, checkpoint, TensorBoard); at the end
  the test evaluation, the report (verified against the ledger by
  `fedjax_seg.verifier`), CSV and plots.
  """
  artifacts.enable_compilation_cache()
  sim = Simulation(config, workdir)
  while (part := sim.begin_round()) is not None:
    if not sim.end_round(part, *sim.run_round(part)):
      return dict(INTERRUPTED, rounds_completed=sim.state.rounds_completed)
  return sim.finish()


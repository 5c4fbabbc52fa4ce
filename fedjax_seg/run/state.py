"""What a run carries from round to round, and how it is restored.

`RunState` is the one state the loop steps over: the federated trainer's
state, the privacy ledgers, the history rows and validation scores, the
rounds done and the EMA of the released models. `restore_or_init` gives a
fresh state or the latest checkpoint's, refusing a resumption whose settings
or planned noise differ (it would rerun rounds with other noise under the
same keys, or end above its target epsilon).
"""

import dataclasses
import json
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import optax

from fedjax_seg import privacy
from fedjax_seg.federated import client as client_lib
from fedjax_seg.run import artifacts
from fedjax_seg.run import config as config_lib

# Settings that may change between a run and its resumption; any other change
# would make the resumed run a different experiment (and its ledger wrong).
RESUMABLE_CHANGES = ("performance", "eval_every", "checkpoint_every",
                     "stop_after_rounds", "release_training_diagnostics",
                     "tensorboard")
# Fields added after runs were checkpointed whose default has changed since:
# a checkpoint without the field ran with this value (its behaviour then).
_VALUE_BEFORE_THE_FIELD = {("federated", "ema_decay"): 0.0}


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
    """The checkpoint's JSON: ledgers, history, noise plan, settings."""
    return {"rounds_completed": self.rounds_completed,
            "ledger": self.ledger.to_dict(),
            "site_ledger": self.site_ledger.to_dict(),
            "charged_rounds": self.charged_rounds,
            "history": self.history, "evals": self.evals,
            "noise_plan": plan.to_meta(),
            "config": config.to_dict()}

  def main_ledger(self, plan) -> privacy.PrivacyLedger:
    """The ledger of the run's unit (`NoisePlan.main_ledger`)."""
    return plan.noise.main_ledger(self.ledger, self.site_ledger)

  def tree(self) -> dict:
    """The arrays a checkpoint holds."""
    tree = {"server": self.server_state, "sites": self.site_states}
    if self.averaged_params is not None:
      tree["averaged"] = self.averaged_params
    return tree


def average(config, state: RunState) -> None:
  """Folds this round's global model into the EMA (--ema_decay): only
  released models go in, so it is post-processing."""
  decay = config.federated.ema_decay
  if decay:
    state.averaged_params = optax.incremental_update(
        state.server_state.params, state.averaged_params, 1.0 - decay)


def evaluated_params(config, state: RunState):
  """The global model evaluated and reported: the debiased EMA with
  --ema_decay (after at least one round), else the last model."""
  return artifacts.evaluated_model(
      state.server_state.params, state.averaged_params,
      config.federated.ema_decay, state.rounds_completed)


def site_params(run, state, evaluated: bool = False, ids=None):
  """The params each site uses (FedBN: a function of the site index, or of
  the position in `ids` when given): the training model, or with `evaluated`
  the reported one (`state.evaluated_params`)."""
  params = (evaluated_params(run.config, state) if evaluated
            else state.server_state.params)
  if run.trainer.norm_mask is None:
    return params
  site = (lambda k: k) if ids is None else (lambda k: int(ids[k]))
  return lambda k: client_lib.merge_local(
      params, jax.tree.map(lambda x: x[site(k)],
                           state.site_states.local_params),
      run.trainer.norm_mask)


def comparable(config_dict: dict) -> dict:
  """A config dict with what may change on resumption left out (and fields
  a checkpoint predates read as they behaved then)."""
  # Through the config class, so that a checkpoint written before a field
  # existed compares with the behaviour it had: the field's value then
  # (_VALUE_BEFORE_THE_FIELD), else its default.
  from fedjax_seg.run import config_flags  # pylint: disable=g-import-not-at-top
  config_dict = json.loads(json.dumps(config_dict))
  for (section, name), value in _VALUE_BEFORE_THE_FIELD.items():
    if isinstance(config_dict.get(section), dict):
      config_dict[section].setdefault(name, value)
  try:
    config_dict = config_flags.config_from_dict(config_dict).to_dict()
  except (config_lib.ConfigError, KeyError, TypeError):
    pass  # Compared as stored (and so refused if it differs).
  d = json.loads(json.dumps(config_dict))
  for key in RESUMABLE_CHANGES:
    d.pop(key, None)
  # --rounds may change on resume only when the noise already planned for
  # the completed rounds stays the same (checked against the checkpoint).
  d.get("federated", {}).pop("rounds", None)
  return d


def check_same_run(stored: dict | None, plan, config, workdir) -> None:
  """Refuses to reuse the noise secret of a run that stopped before its
  first checkpoint for a run with other settings (it would draw the same
  noise at another scale, or under another plan)."""
  refusal = (f"--workdir={workdir} holds the noise secret of a run with "
             "other settings (stopped before its first checkpoint); reusing "
             "it would add the same noise under other settings. Use a new "
             "--workdir, or the same flags.")
  if stored is None:
    raise config_lib.ConfigError(refusal)
  check_resumable({"noise_plan": stored["noise_plan"],
                   "config": stored["config"], "rounds_completed": 0},
                  plan, config, refusal)


def check_resumable(meta, plan, config, refusal: str) -> None:
  """Refuses to continue the run `meta` records (a checkpoint's, or a noise
  secret's record) with `config`: other settings (ConfigError `refusal`),
  or other noise for the rounds it planned."""
  if comparable(meta["config"]) != comparable(config.to_dict()):
    raise config_lib.ConfigError(refusal)
  check_noise_plan_unchanged(meta, plan, config)


def check_noise_plan_unchanged(meta, plan, config) -> None:
  """Refuses a resumption whose noise for any already planned round differs
  (`NoisePlan.same_planned_noise`), or whose --init_from source changed."""
  old_rounds = meta["config"]["federated"]["rounds"]
  done = int(meta["rounds_completed"])
  saved = meta["noise_plan"]
  if saved.get("init_source_report_sha256") != plan.init_source_sha256:
    raise config_lib.ConfigError(
        f"--init_from={config.model.init_from}: that run's report changed "
        "since this run started (its ledger holds the events of the report "
        "then); use a new --workdir.")
  if config.federated.rounds < done:
    raise config_lib.ConfigError(
        f"--rounds={config.federated.rounds}: the checkpoint already holds "
        f"{done} completed rounds; resume with --rounds >= {done}.")
  if not plan.noise.same_planned_noise(saved):
    raise config_lib.ConfigError(
        f"--rounds: the checkpoint was planned for {old_rounds} rounds and "
        f"--rounds={config.federated.rounds} changes the noise of rounds it "
        "planned (site-adaptive calibration and noise schedules depend on "
        "the number of rounds). Resuming would rerun rounds with other noise "
        "under the same keys and miss the target epsilon. Resume with "
        f"--rounds={old_rounds}, or start a new --workdir.")


def restore_or_init(run, params) -> RunState:
  """A fresh state (ledgers holding a composed source's events), or the
  latest checkpoint's (refusing changed settings)."""
  config, plan = run.config, run.plan
  server_state, site_states = run.trainer.init(params, len(plan.site_names))
  ledger, site_ledger = plan.noise.new_ledgers()
  state = RunState(
      server_state, site_states, ledger, site_ledger, history=[], evals=[],
      charged_rounds={s: [] for s in plan.site_names},
      averaged_params=(jax.tree.map(jnp.zeros_like, params)
                       if config.federated.ema_decay else None))
  latest = run.checkpointer.latest()
  if latest is None:
    return state
  try:
    restored, meta = run.checkpointer.restore(latest, state.tree())
  except (ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(
        f"--workdir={run.workdir}: its checkpoint {latest} does not restore "
        f"into this run's state ({type(e).__name__}: {e}); it was made with "
        "other settings (e.g. --ema_decay) or is damaged. Use a new "
        "--workdir, or the run's flags.") from e
  check_resumable(
      meta, plan, config,
      f"--workdir={run.workdir} holds a run with other settings; resuming "
      "it with these would make its privacy ledger wrong. Use a new "
      "--workdir, or the same flags.")
  state = RunState(
      restored["server"], restored["sites"],
      privacy.PrivacyLedger.from_dict(meta["ledger"]),
      privacy.PrivacyLedger.from_dict(meta["site_ledger"]),
      meta["history"], meta["evals"], meta["charged_rounds"],
      int(meta["rounds_completed"]), restored.get("averaged"))
  logging.info("resumed %s at round %d", run.workdir, state.rounds_completed)
  return state

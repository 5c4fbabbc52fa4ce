"""A run's directory: its layout, atomic writes, checkpoints, its model.

  <workdir>/report.json      the report (`run.report`)
           rounds.csv        one row per round
           sites.csv         one row per site (more than 64 sites)
           *.png             plots (`run.plots`)
           events.*          TensorBoard scalars (--tensorboard)
           checkpoints/<r>/  orbax checkpoints after round r (the last two)
           checkpoints/noise_secret   the noise root (`run.noise_secret`)

Everything here is the one place that knows this layout: the loop writes
through `Checkpointer` and `atomic_write`, and prediction, --init_from,
sweeps and the attack study read a run's evaluated model through
`restore_evaluated` instead of setting the run up again.
"""

import hashlib
import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

REPORT = "report.json"
ROUNDS_CSV = "rounds.csv"
SITES_CSV = "sites.csv"  # With more than many_sites.PER_SITE_OUTPUTS_MAX sites.
CHECKPOINTS = "checkpoints"


class RunDirError(ValueError):
  """A run directory that cannot be read as asked; names the flag or file."""


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


def params_digest(params) -> str:
  """sha256 over every parameter's path, dtype, shape and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    leaf = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def debiased_average(averaged, decay: float, rounds: int):
  """An EMA started from zeros, after `rounds` updates with `decay`,
  divided by 1 - decay^rounds (the weight its models carry)."""
  correction = 1.0 - decay ** rounds
  return jax.tree.map(lambda e: e / jnp.asarray(correction, e.dtype),
                      averaged)


def evaluated_model(last, averaged, decay: float, rounds: int):
  """The global model a run evaluates and reports: the debiased EMA of its
  global models (`averaged`) with --ema_decay after at least one round,
  else the last global model."""
  if decay and rounds:
    return debiased_average(averaged, decay, rounds)
  return last


class _Quiet:
  """Orbax logs every file operation at INFO: keep the round log readable."""

  def __init__(self, level=logging.WARNING):
    self._quiet_level = level

  def __enter__(self):
    self._level = logging.get_verbosity()
    logging.set_verbosity(self._quiet_level)

  def __exit__(self, *exc):
    logging.set_verbosity(self._level)


class Checkpointer:
  """A run's orbax checkpoints behind three calls: latest, save, restore.

  The state is saved and restored as host (numpy) arrays: every host holds
  all of it (rounds gather their results to every host), and orbax refuses
  host-local jax.Arrays (e.g. the EMA, updated on each host's own device)
  over several processes, while numpy arrays are written once. With
  `read_only`, for reading another run's checkpoints: nothing is created or
  deleted.
  """

  def __init__(self, workdir: pathlib.Path, read_only: bool = False):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    directory = (pathlib.Path(workdir) / CHECKPOINTS).absolute()
    if read_only and not directory.is_dir():
      raise RunDirError(f"--workdir={workdir}: no {CHECKPOINTS}/ there; give "
                        "the --workdir of a simulate run that completed at "
                        "least one checkpointed round.")
    options = (ocp.CheckpointManagerOptions(read_only=True, create=False,
                                            save_interval_steps=0)
               if read_only else
               ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    with _Quiet(logging.ERROR):  # Orbax warns that read-only is so.
      self._manager = ocp.CheckpointManager(directory, options=options)
    self._workdir = workdir

  def latest(self) -> int | None:
    return self._manager.latest_step()

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, meta: dict) -> None:
    ocp = self._ocp
    with _Quiet():
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(jax.device_get(state)),
          meta=ocp.args.JsonSave(meta)))
      self._manager.wait_until_finished()

  def restore(self, step: int, target=None):
    """(state, meta) of checkpoint `step`: shaped like `target`, or without
    one as nested dicts of numpy arrays."""
    ocp = self._ocp
    state = (ocp.args.StandardRestore() if target is None
             else ocp.args.StandardRestore(jax.device_get(target)))
    with _Quiet():
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=state, meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]


def restore(workdir: pathlib.Path, round_index: int | None = None):
  """(state as nested dicts of numpy arrays, meta, step) of a committed
  checkpoint of the run in `workdir`: the latest, or that of `round_index`
  rounds. Raises RunDirError naming --workdir or --round."""
  checkpointer = Checkpointer(workdir, read_only=True)
  steps = checkpointer.steps()
  if not steps:
    raise RunDirError(f"--workdir={workdir}: no finished checkpoint in "
                      f"{CHECKPOINTS}/ (the run has not completed a "
                      "checkpointed round, or its only save was cut off).")
  step = steps[-1] if round_index is None else round_index
  if step not in steps:
    raise RunDirError(f"--round={round_index}: {workdir}/{CHECKPOINTS} has "
                      f"checkpoints of rounds {steps} only.")
  try:
    state, meta = checkpointer.restore(step)
  except Exception as e:  # Orbax raises many types for damaged files.
    raise RunDirError(f"--workdir={workdir}: checkpoint {step} does not "
                      f"restore ({type(e).__name__}: {e}).") from e
  return state, meta, step


def _key_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def shaped_like(template, restored, what: str):
  """`restored` (nested dicts as orbax gives them back without a target)
  in the structure of `template`, matched leaf by leaf by key path."""
  flat = {_key_str(p): np.asarray(v) for p, v in
          jax.tree_util.tree_flatten_with_path(restored)[0]}

  def leaf(path, t):
    key = _key_str(path)
    if key not in flat:
      raise RunDirError(f"{what}: the checkpoint has no parameter {key}.")
    value = flat[key]  # FedBN's site-local leaves have a site axis first.
    if value.shape[value.ndim - len(t.shape):] != tuple(t.shape):
      raise RunDirError(f"{what}: parameter {key} has shape "
                        f"{flat[key].shape}, the model wants {t.shape}.")
    return value

  return jax.tree_util.tree_map_with_path(leaf, template)


def evaluated_from_checkpoint(state, meta, ema_decay: float, template,
                              what: str):
  """(the evaluated global model in `template`'s structure, rounds done)
  of a restored checkpoint: the debiased EMA with --ema_decay after a
  round, else the last global model."""
  rounds = int(meta["rounds_completed"])
  if ema_decay and rounds and "averaged" not in state:
    raise RunDirError(f"{what}: the run averages its models (--ema_decay="
                      f"{ema_decay}) but the checkpoint holds no average.")
  averaged = (shaped_like(template, state["averaged"], what)
              if ema_decay and rounds else None)
  last = shaped_like(template, state["server"]["params"], what)
  return evaluated_model(last, averaged, ema_decay, rounds), rounds


def restore_evaluated(workdir: pathlib.Path, ema_decay: float, like):
  """(the evaluated global model of the run in `workdir`, shaped like
  `like`, rounds done) from its latest checkpoint, without setting the run
  up (its data, trainer and noise root are not needed)."""
  state, meta, step = restore(workdir)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          like)
  return evaluated_from_checkpoint(state, meta, ema_decay, template,
                                   f"--workdir={workdir} checkpoint {step}")

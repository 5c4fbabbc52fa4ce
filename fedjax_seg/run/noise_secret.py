"""A run's two roots: the public model root and the secret noise root.

Every draw of the DP mechanism (gradient and server noise, Poisson sampling of
units and sites, adaptive-clipping count noise, audit canaries, the attack
study's released update) derives from the run's noise root. Model
initialisation derives from the model root (`--seed`, public); data and
splits from `--data_seed`.

By default the noise root is secret: 256 bits drawn from the operating
system's entropy when the run starts, written before the first round to
`<workdir>/checkpoints/noise_secret` (JSON, mode 0600, atomically and
exclusively) and read back on resumption, so a killed and resumed run draws
the same keys. It is written nowhere else: not in report.json, rounds.csv,
the log, plots or sweep outputs. Writing it before round 1 matters: a run
killed before its first checkpoint and started again repeats the same noise,
so its earlier outputs are the same release, not a second one with fresh
noise; the file also records the run's settings and noise plan, so such a
restart with other settings (which would draw the same noise at another
scale) is refused.

`--noise_seed=INT` instead derives the noise root from that integer (and a
sweep member's index), which makes a run reproducible (the README's reference
figures use `--noise_seed=0`) but makes its noise known to anyone with the
seed: its epsilon then holds only while the seed stays secret, and two runs
sharing a noise seed must not both be released (their difference cancels the
noise). The report's `privacy.assumptions.secret` says which case a run is.

Several hosts: host 0 reads or draws the secret and sends it to the others.
"""

import json
import os
import pathlib

import jax
import numpy as np

from fedjax_seg.run import config as config_lib
from fedjax_seg import privacy

SECRET_FILE = "noise_secret"


def model_root(config: config_lib.ExperimentConfig) -> jax.Array:
  """The key of model initialisation: `--seed`, then a sweep member's index
  (public: the initial model depends on no private data)."""
  return _with_member(jax.random.key(config.seed), config)


def noise_root(config: config_lib.ExperimentConfig,
               checkpoint_dir: pathlib.Path, record: dict | None = None,
               check_reuse=None) -> jax.Array:
  """The run's noise root: from `--noise_seed` when given, else from the
  secret in `checkpoint_dir` (drawn and written there if the run has none).

  Args:
    config: the run's settings.
    checkpoint_dir: the run's checkpoint directory.
    record: what the run is (e.g. its comparable settings and noise plan),
      stored with a new secret.
    check_reuse: called with the stored record when an existing secret is
      read and the directory holds no checkpoint yet (a run stopped before
      its first checkpoint and started again): it must raise ConfigError if
      the new run differs in a way that would reuse the noise under other
      settings. With a checkpoint, resumption checks its own records.

  Raises:
    ConfigError: naming --workdir, if the directory holds checkpoints but no
      secret (a resumption would not be the same run), the secret file is
      malformed, or `check_reuse` refuses. Over several hosts every host
      raises (host 0 decides).
  """
  if config.noise_seed is not None:
    # A member's keys are five folds deep (member, round, site, step,
    # purpose), a plain run's four: they never coincide (up to hash
    # collisions) with a plain run's keys of the same seed.
    return _with_member(jax.random.key(config.noise_seed), config)
  secret, error = None, None
  if jax.process_index() == 0:
    try:
      secret, stored = _read_or_create(checkpoint_dir, record)
      if stored is not None and check_reuse is not None and not _has_steps(
          checkpoint_dir):
        check_reuse(stored)
    except config_lib.ConfigError as e:
      error = e
  if jax.process_count() > 1:
    secret = _from_host_0(secret, error is None)
  if error is not None:
    raise error
  if secret is None:
    raise config_lib.ConfigError(
        f"process {jax.process_index()}: host 0 could not read or create "
        "the run's noise secret (its log says why).")
  return privacy.key_from_secret(secret)


def is_public(config: config_lib.ExperimentConfig) -> bool:
  """True when the run's noise derives from a seed given on the command
  line (`--noise_seed`), i.e. is known to whoever has that seed."""
  return config.noise_seed is not None


def statement(config: config_lib.ExperimentConfig) -> str:
  """One sentence for the report and the log: whose the noise is."""
  if is_public(config):
    return (f"--noise_seed={config.noise_seed}: every noise, sampling and "
            "canary key derives from that seed, so the noise is known to "
            "anyone with the seed and this run's epsilon holds only while "
            "the seed stays secret; two runs that share a noise seed must "
            "not both be released (their difference cancels the noise). "
            "JAX's PRNG is not a cryptographic RNG.")
  return ("the noise root: 256 bits from the operating system's entropy, "
          "drawn when the run started and kept only in its checkpoint "
          "directory (checkpoints/noise_secret), never in an output; every "
          "noise, sampling and canary key derives from it through JAX's "
          "threefry PRNG (a 64-bit key; not a cryptographic RNG). Keep the "
          "checkpoint directory private.")


def _with_member(root: jax.Array, config) -> jax.Array:
  if config.sweep_member is not None:
    root = jax.random.fold_in(root, config.sweep_member)
  return root


def _has_steps(checkpoint_dir: pathlib.Path) -> bool:
  return checkpoint_dir.is_dir() and any(
      p.name.isdigit() for p in checkpoint_dir.iterdir())


def _read_or_create(checkpoint_dir: pathlib.Path,
                    record: dict | None) -> tuple[bytes, dict | None]:
  """(secret, the record stored with it, or None for a new secret)."""
  path = checkpoint_dir / SECRET_FILE
  if not path.is_file():
    if _has_steps(checkpoint_dir):
      raise config_lib.ConfigError(
          f"--workdir: {checkpoint_dir} holds checkpoints but no "
          f"{SECRET_FILE}, so this run cannot resume with its own noise. Use "
          "a new --workdir, or the run's --noise_seed if it had one.")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    secret = privacy.new_noise_secret()
    tmp = checkpoint_dir / f".{SECRET_FILE}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
      json.dump({"secret": secret.hex(), "run": record}, f)
    try:
      # Atomic and exclusive: of two processes starting the same workdir,
      # one secret wins and the other reads it.
      os.link(tmp, path)
      return secret, None
    except FileExistsError:
      pass
    finally:
      tmp.unlink()
  try:
    stored = json.loads(path.read_text())
    secret = bytes.fromhex(stored["secret"])
  except (ValueError, KeyError, TypeError) as e:
    raise config_lib.ConfigError(
        f"--workdir: {path} is not a noise secret ({e}).") from e
  if len(secret) != privacy.keys.NOISE_SECRET_BYTES:
    raise config_lib.ConfigError(
        f"--workdir: {path} holds {len(secret)} bytes, not "
        f"{privacy.keys.NOISE_SECRET_BYTES}.")
  return secret, stored.get("run")


def read_secret(checkpoint_dir: pathlib.Path) -> bytes | None:
  """The run's secret, or None if it has none (for tests and tools)."""
  path = checkpoint_dir / SECRET_FILE
  return (bytes.fromhex(json.loads(path.read_text())["secret"])
          if path.is_file() else None)


def _from_host_0(secret: bytes | None, ok: bool) -> bytes | None:
  """Host 0's secret on every host (None everywhere if host 0 failed)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  size = privacy.keys.NOISE_SECRET_BYTES
  local = np.zeros(size + 1, np.int32)
  if secret is not None and ok:
    local[0] = 1
    local[1:] = np.frombuffer(secret, np.uint8)
  value = np.asarray(multihost_utils.broadcast_one_to_all(
      local, is_source=jax.process_index() == 0))
  return value[1:].astype(np.uint8).tobytes() if value[0] == 1 else None

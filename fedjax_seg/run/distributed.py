"""Runs over several hosts: `jax.distributed`, one global device mesh, and
host 0 as the only writer.

Every host runs the same program on the same (deterministic) data and
derives every key from the same root seed, with no communication: the
sites are split over the global mesh (`FederatedTrainer` with the "shard"
backend over all hosts' devices), each round's results are gathered to
every host (`federated.rounds.host_values`), and every host then keeps the same state, ledger
and history. Host 0 alone writes the log, report, CSV and plots;
checkpoints go through orbax, whose managers coordinate the hosts (the
workdir must be on a file system all hosts share).

  # Two processes on one machine (what the tests do), or one per node:
  python -m experiments.simulate --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=0 --workdir=/shared/run &
  python -m experiments.simulate --coordinator_address=host0:1234 \
      --num_processes=2 --process_id=1 --workdir=/shared/run

Under SLURM (several tasks) and on multi-host Cloud TPU slices the three
flags can be left out: `jax.distributed.initialize()` reads the cluster's
environment (BUILD.md gives the commands).
"""

import os

from absl import logging
import jax

from fedjax_seg.run import config as config_lib


def cluster_environment() -> str | None:
  """"SLURM" or "Cloud TPU" when this process is one of several that a
  cluster started (so `jax.distributed.initialize()` can read its
  settings), else None."""
  # SLURM_STEP_ID: inside an `srun` step, not a batch script's own shell
  # (which also sees SLURM_NTASKS but is one process).
  if ("SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ
      and int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1):
    return "SLURM"
  if len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")
          if h]) > 1:
    return "Cloud TPU"
  return None


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> bool:
  """Starts `jax.distributed` when the flags or the environment ask for it.

  Must run before any JAX computation. Returns True if this is one of
  several processes.

  Raises:
    ConfigError: naming the flag, if only some of the three flags are
      given, or the values are out of range.
  """
  given = {"coordinator_address": coordinator_address,
           "num_processes": num_processes, "process_id": process_id}
  if any(v is not None for v in given.values()):
    missing = [f"--{k}" for k, v in given.items() if v is None]
    if missing:
      raise config_lib.ConfigError(
          f"{', '.join(missing)}: --coordinator_address, --num_processes and "
          "--process_id go together (or none, under SLURM or on Cloud TPU).")
    if num_processes < 1:
      raise config_lib.ConfigError("--num_processes: must be >= 1.")
    if not 0 <= process_id < num_processes:
      raise config_lib.ConfigError(
          f"--process_id: must be in [0, {num_processes}), got {process_id}.")
    if num_processes == 1:
      return False
    jax.distributed.initialize(coordinator_address, num_processes,
                               process_id)
  elif (where := cluster_environment()) is not None:
    logging.info("starting jax.distributed from the %s environment", where)
    jax.distributed.initialize()
  else:
    return False
  if jax.process_index() != 0:
    # Host 0 alone logs (and writes); the others say only what goes wrong.
    logging.set_verbosity(logging.ERROR)
  logging.info("process %d of %d: %d local and %d global devices",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return jax.process_count() > 1


def check_hosts_agree(what: str, digest: str) -> None:
  """Raises on every host unless all hosts hold the same `digest` (e.g. of
  the configuration and the restored ledger): hosts launched with other
  flags would train their sites with other keys, unnoticed."""
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  value = np.frombuffer(bytes.fromhex(digest), np.uint8)
  try:
    multihost_utils.assert_equal(value, f"hosts disagree on {what}")
  except AssertionError as e:
    raise config_lib.ConfigError(
        f"process {jax.process_index()}: the hosts disagree on {what}; "
        "start every process with the same flags and --workdir.") from e


def is_writer() -> bool:
  """True on the one process that writes outputs (host 0)."""
  return jax.process_index() == 0


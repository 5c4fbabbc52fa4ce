"""Tests for fedjax_seg.run.distributed: a run over two local CPU processes
(jax.distributed with a localhost coordinator) against the same run in one
process."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import distributed

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_FLAGS = ["--image_size=16", "--num_slices=2", "--patients_scale=0.0625",
              "--widths=4", "--rounds=2", "--local_steps=1", "--batch_size=4",
              "--learning_rate=0.5", "--ema_decay=0", "--eval_every=1",
              "--checkpoint_every=1", "--backend=shard"]


# Default flags otherwise (the EMA of the released models included): tiny
# data and model, batches the small sites hold.
DEFAULT_TINY_FLAGS = ["--image_size=16", "--num_slices=2",
                      "--patients_scale=0.0625", "--widths=4", "--rounds=6",
                      "--batch_size=4", "--eval_every=1",
                      "--checkpoint_every=1", "--backend=shard"]


def _simulate(workdir, devices, extra=(), flags=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.simulate",
       *(TINY_FLAGS + ["--noise_seed=0"] if flags is None else flags),
       f"--workdir={workdir}", *extra],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _hosts(workdir, devices, flags=None):
  port = _free_port()
  return [_simulate(workdir, devices, [
      f"--coordinator_address=localhost:{port}", "--num_processes=2",
      f"--process_id={i}"], flags) for i in range(2)]


def _assert_same_run(two, one):
  """Two reports of one run: the same ledger and epsilons, Dice to 1e-4
  (another device layout sums in another order)."""
  assert two["privacy"]["ledger"] == one["privacy"]["ledger"]
  assert two["privacy"]["epsilon_per_site"] == \
      one["privacy"]["epsilon_per_site"]
  assert two["privacy"]["verified"]["ok"] is True
  for site, dice in one["metrics"]["dice_per_site"].items():
    if dice is None:
      assert two["metrics"]["dice_per_site"][site] is None
    else:
      assert two["metrics"]["dice_per_site"][site] == pytest.approx(
          dice, abs=1e-4), site
  for a, b in zip(two["metrics"]["validation_history"],
                  one["metrics"]["validation_history"], strict=True):
    assert list(a["dice_per_site"].values()) == pytest.approx(
        list(b["dice_per_site"].values()), abs=1e-4, nan_ok=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_one_process_report(tmp_path):
  hosts = _hosts(tmp_path / "two", 2)
  # The same 4 devices in one process.
  alone = _simulate(tmp_path / "one", 4)
  outs = [p.communicate(timeout=600) for p in hosts + [alone]]
  for p, (_, err) in zip(hosts + [alone], outs):
    assert p.returncode == 0, err[-3000:]
  # Host 0 reports; host 1 says nothing unless something goes wrong.
  assert "rounds 2 (completed)" in outs[0][0]
  assert "rounds 2" not in outs[1][0]  # (gloo's connection lines only)
  assert "round 1/2" not in outs[1][1]
  two = json.loads((tmp_path / "two" / "report.json").read_text())
  one = json.loads((tmp_path / "one" / "report.json").read_text())
  # Every host derived the same keys and sampled the same units: the same
  # ledger, hence identical epsilons.
  _assert_same_run(two, one)
  assert (tmp_path / "two" / "checkpoints" / "2").is_dir()


@pytest.mark.slow
def test_one_device_per_process_with_default_flags_killed_and_resumed(
    tmp_path):
  # Default flags (the EMA is checkpointed too) and a secret noise root,
  # which host 0 draws and sends to host 1. Host 1 is killed once round 1
  # is checkpointed; host 0 then waits on it and is killed too.
  two = tmp_path / "two"
  hosts = _hosts(two, 1, DEFAULT_TINY_FLAGS)
  deadline = time.monotonic() + 600
  while not (two / "checkpoints" / "1").is_dir():
    assert all(p.poll() is None for p in hosts), hosts[0].communicate()[1][
        -3000:]
    assert time.monotonic() < deadline
    time.sleep(0.05)
  hosts[1].kill()
  hosts[1].communicate()
  try:
    hosts[0].communicate(timeout=10)
  except subprocess.TimeoutExpired:
    hosts[0].kill()
    hosts[0].communicate()
  assert not (two / "report.json").exists()
  resumed = _hosts(two, 1, DEFAULT_TINY_FLAGS)
  # One process, two devices, the same secret.
  secret = two / "checkpoints" / "noise_secret"
  (tmp_path / "one" / "checkpoints").mkdir(parents=True)
  shutil.copy(secret, tmp_path / "one" / "checkpoints" / "noise_secret")
  alone = _simulate(tmp_path / "one", 2, flags=DEFAULT_TINY_FLAGS)
  outs = [p.communicate(timeout=600) for p in resumed + [alone]]
  for p, (_, err) in zip(resumed + [alone], outs):
    assert p.returncode == 0, err[-3000:]
  assert "resumed" in outs[0][1] and "rounds 6 (completed)" in outs[0][0]
  report = json.loads((two / "report.json").read_text())
  assert report["config"]["federated"]["ema_decay"] > 0
  _assert_same_run(report, json.loads(
      (tmp_path / "one" / "report.json").read_text()))
  assert secret.read_text().strip() not in (two / "report.json").read_text()


def test_flags_go_together_and_clusters_are_recognised(monkeypatch):
  with pytest.raises(C.ConfigError, match="--num_processes, --process_id"):
    distributed.initialize("localhost:1234")
  with pytest.raises(C.ConfigError, match="--process_id: must be in"):
    distributed.initialize("localhost:1234", 2, 2)
  assert distributed.initialize("localhost:1234", 1, 0) is False
  for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID",
               "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert distributed.cluster_environment() is None
  monkeypatch.setenv("SLURM_PROCID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "4")
  # The batch script's own shell (no srun step) is one process.
  assert distributed.cluster_environment() is None
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert distributed.cluster_environment() is None  # One task: one process.
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.cluster_environment() == "SLURM"
  monkeypatch.delenv("SLURM_PROCID")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-0,t1v-1")
  assert distributed.cluster_environment() == "Cloud TPU"

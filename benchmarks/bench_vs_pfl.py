r"""Whole federated rounds against Apple's pfl-research (pfl + PyTorch).

The same task on both sides: the 8 built-in synthetic sites (their training
splits, every site every round), 2 local SGD steps of batch 8 slices at
learning rate 0.5, FedAvg with server learning rate 1, the tiny U-Net (same
widths, GroupNorm, 3 classes, 117,427 parameters on both sides), and either
DP-FedAvg (site clip 0.5, noise multiplier 2.5) or no DP.

  ours: `python -m experiments.simulate --unit=site` (or `--nodp
        --unit=example`), a fresh process per run, the whole round's wall
        time from its `rounds.csv` (participants, budget check, device round,
        accounting, logging, checkpoint decisions).
  pfl:  `benchmarks/pfl_side.py`, pfl 0.6.0's `FederatedAveraging` on a
        `SimulatedBackend` with a `PyTorchModel`, `WeightByUser()` and, with
        DP, `CentrallyAppliedPrivacyMechanism(GaussianMechanism(...))`; the
        wall time between its `after_central_iteration` callbacks.

Both are pinned to the same CPU cores (`os.sched_setaffinity`), torch with
`set_num_threads(T)`, XLA sizing its thread pool from the affinity; runs
alternate (ours, pfl, ours, pfl, ...), and each figure is the median round
after the first (which compiles, or for pfl evaluates). pfl needs
dp-accounting < 0.6, which jax-privacy (ours) cannot use, so it runs in its
own environment:

  python3 -m venv .venv-pfl
  .venv-pfl/bin/pip install -r benchmarks/requirements-pfl.txt
  python benchmarks/bench_vs_pfl.py --pfl_python=.venv-pfl/bin/python \
      --sizes=32,64,128 --threads=1,2 --output=vs_pfl.json

torch's OpenMP threads slow down badly when another process holds a core:
run on a quiet machine (the script records the load average before and
after).
"""

import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

_PFL_PYTHON = flags.DEFINE_string(
    "pfl_python", ".venv-pfl/bin/python",
    "A Python with benchmarks/requirements-pfl.txt installed.")
_SIZES = flags.DEFINE_list("sizes", ["32", "64", "128"], "Image sizes.")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "CPU threads per side.")
_MODES = flags.DEFINE_list("modes", ["dp", "nodp"],
                           "dp: site-level DP-FedAvg; nodp: no DP.")
_ROUNDS = flags.DEFINE_integer("rounds", 6, "Rounds per run (first dropped).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Runs per side and setting.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")

REPO = pathlib.Path(__file__).resolve().parents[1]
TASK = dict(local_steps=2, batch_size=8, learning_rate=0.5,
            server_learning_rate=1.0, clip=0.5, noise=2.5)


def export_sites(size: int, path: pathlib.Path) -> list[int]:
  """The built-in sites' training slices at `size`, as pfl_side.py reads
  them; the same arrays experiments.simulate trains on."""
  from fedjax_seg.run import config as config_lib  # pylint: disable=g-import-not-at-top
  from fedjax_seg.run import data as data_lib  # pylint: disable=g-import-not-at-top
  from fedjax_seg.data import sites  # pylint: disable=g-import-not-at-top
  splits = data_lib.load(config_lib.DataConfig(image_size=size), 0)
  train = sites.stack_sites(splits["train"])
  arrays = {"num_sites": np.int64(train.num_sites)}
  sizes = []
  for k in range(train.num_sites):
    n = int(train.num_examples[k])
    arrays[f"image_{k}"] = np.asarray(train.image[k, :n], np.float32)
    arrays[f"label_{k}"] = np.asarray(train.label[k, :n], np.int32)
    sizes.append(n)
  np.savez(path, **arrays)
  return sizes


def _pinned(threads: int):
  cores = sorted(os.sched_getaffinity(0))[:threads]
  return lambda: os.sched_setaffinity(0, cores)


def run_ours(size: int, threads: int, mode: str, workdir: pathlib.Path):
  flags_ = [f"--workdir={workdir}", f"--image_size={size}",
            f"--rounds={_ROUNDS.value}", f"--local_steps={TASK['local_steps']}",
            f"--batch_size={TASK['batch_size']}",
            f"--learning_rate={TASK['learning_rate']}",
            f"--server_learning_rate={TASK['server_learning_rate']}",
            f"--eval_every={_ROUNDS.value}",
            f"--checkpoint_every={_ROUNDS.value}"]
  if mode == "dp":
    flags_ += ["--unit=site", f"--site_clip_norm={TASK['clip']}",
               f"--site_noise_multiplier={TASK['noise']}",
               "--site_sampling_rate=1.0"]
  else:
    flags_ += ["--nodp", "--unit=example"]
  subprocess.run([sys.executable, "-m", "experiments.simulate"] + flags_,
                 cwd=REPO, check=True, capture_output=True,
                 preexec_fn=_pinned(threads))
  rows = (workdir / "rounds.csv").read_text().splitlines()
  header = rows[0].split(",")
  wall = header.index("wall_seconds")
  device = header.index("device_seconds")
  host = header.index("host_seconds")
  table = [r.split(",") for r in rows[1:]]
  return {"round_seconds": [float(r[wall]) for r in table],
          "device_seconds": [float(r[device]) for r in table],
          "host_seconds": [float(r[host]) for r in table]}


def run_pfl(data: pathlib.Path, threads: int, mode: str,
            out: pathlib.Path):
  cmd = [_PFL_PYTHON.value, str(REPO / "benchmarks" / "pfl_side.py"),
         f"--data={data}", f"--rounds={_ROUNDS.value}",
         f"--threads={threads}", f"--out={out}"] + [
             f"--{k}={v}" for k, v in TASK.items()]
  if mode == "nodp":
    cmd.append("--nodp")
  subprocess.run(cmd, cwd=REPO, check=True, capture_output=True,
                 preexec_fn=_pinned(threads))
  return json.loads(out.read_text())


def _median_after_first(values):
  return statistics.median(values[1:])


def main(argv):
  del argv
  if not pathlib.Path(_PFL_PYTHON.value).exists():
    sys.exit(f"--pfl_python={_PFL_PYTHON.value} does not exist; make it "
             "with: python3 -m venv .venv-pfl && .venv-pfl/bin/pip install "
             "-r benchmarks/requirements-pfl.txt")
  results = {"machine": {"platform": platform.platform(),
                         "processor": platform.processor(),
                         "cpu_count": os.cpu_count(),
                         "load_before": os.getloadavg()},
             "task": TASK, "rounds": _ROUNDS.value, "settings": []}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    for size in map(int, _SIZES.value):
      data = tmp / f"sites_{size}.npz"
      site_sizes = export_sites(size, data)
      for threads in map(int, _THREADS.value):
        for mode in _MODES.value:
          ours, theirs = [], []
          for rep in range(_REPEATS.value):  # Alternating.
            o = run_ours(size, threads, mode, tmp / f"ours_{size}_{threads}_"
                         f"{mode}_{rep}")
            ours.append(o)
            theirs.append(run_pfl(data, threads, mode,
                                  tmp / f"pfl_{size}_{threads}_{mode}_{rep}"
                                  ".json"))
          ours_s = [_median_after_first(o["round_seconds"]) for o in ours]
          pfl_s = [_median_after_first(t["round_seconds"]) for t in theirs]
          host = [_median_after_first(o["host_seconds"]) for o in ours]
          setting = {
              "image_size": size, "threads": threads, "mode": mode,
              "site_sizes": site_sizes,
              "ours_round_seconds": ours_s, "pfl_round_seconds": pfl_s,
              "ours_host_seconds": host,
              "ours_first_round_seconds": [o["round_seconds"][0]
                                           for o in ours],
              "pfl_parameters": theirs[0]["parameters"],
              "ratio_ours_over_pfl": statistics.median(ours_s) /
                                     statistics.median(pfl_s)}
          results["settings"].append(setting)
          print(f"{size:4d}px {threads} thr {mode:5s} ours "
                f"{statistics.median(ours_s):7.3f} s  pfl "
                f"{statistics.median(pfl_s):7.3f} s  ours/pfl "
                f"{setting['ratio_ours_over_pfl']:.2f}  (host "
                f"{statistics.median(host) * 1e3:.1f} ms)", flush=True)
  results["machine"]["load_after"] = os.getloadavg()
  results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  if _OUTPUT.value:
    pathlib.Path(_OUTPUT.value).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
  app.run(main)

r"""A federated round of K sites with each backend, against the loop backend.

One DP-SGD round (per-example clipping, noise, 1 local step, expected batch 8,
B_max 16) of the tiny U-Net on 32x32 synthetic slices of the 8 default sites,
timed after compilation, median of --repeats. Ratios are loop time / backend
time measured in the same run (> 1: faster than the loop).

  python benchmarks/bench_round.py --backends=loop,vmap,map --repeats=3
"""

import json
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import federated as fed
from fedjax_seg import models
from fedjax_seg.segmentation import task as segmentation_task
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic

_BACKENDS = flags.DEFINE_list("backends", ["loop", "vmap", "map"],
                              "Backends to time (loop is the baseline).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds per backend.")
_MODEL = flags.DEFINE_string("model", "tiny", "U-Net preset.")
_STEPS = flags.DEFINE_integer("local_steps", 1, "Local steps per round.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")


def main(argv):
  del argv
  data = synthetic.generate(synthetic.SyntheticConfig(image_size=32))
  train = sites.stack_sites(sites.split_by_patient(data)["train"])
  site_data = segmentation_task.site_data(train)
  model = models.SegmentationModel(models.preset(_MODEL.value))
  params = model.init(jax.random.key(0), (1, 32, 32, 1))
  num_sites = train.num_sites
  cfg = fed.SiteConfig(
      jnp.asarray(8.0 / np.asarray(train.num_examples), jnp.float32),
      jnp.full((num_sites,), 1.0, jnp.float32))
  client = fed.ClientConfig(local_steps=_STEPS.value, expected_batch_size=8,
                            max_batch_size=16, learning_rate=0.1)
  results = {}
  for backend in ["loop"] + [b for b in _BACKENDS.value if b != "loop"]:
    trainer = fed.FederatedTrainer(
        segmentation_task.example_loss(model), client,
        fed.LocalDPConfig(l2_clip_norm=1.0), fed.ServerConfig(),
        backend=backend)
    server_state, site_states = trainer.init(params, num_sites)
    part = np.ones(num_sites, bool)
    times = []
    for r in range(_REPEATS.value + 1):  # Round 0 compiles.
      start = time.perf_counter()
      server_state, site_states, _ = trainer.run_round(
          server_state, site_states, site_data, cfg, part, r,
          jax.random.key(0))
      jax.block_until_ready(server_state.params)
      times.append(time.perf_counter() - start)
    results[backend] = {"compile_and_first_round_s": times[0],
                        "round_s": statistics.median(times[1:])}
  base = results["loop"]["round_s"]
  for r in results.values():
    r["speedup_vs_loop"] = base / r["round_s"]
  report = {"sites": num_sites, "model": _MODEL.value,
            "params": models.count_params(params),
            "local_steps": _STEPS.value, "device": str(jax.devices()[0]),
            "device_count": jax.device_count(), "jax": jax.__version__,
            "python": sys.version.split()[0], "machine": platform.machine(),
            "results": results}
  for name, r in results.items():
    print(f"{name:6s} round {r['round_s']:.3f} s   "
          f"x{r['speedup_vs_loop']:.2f} vs loop   "
          f"(first round incl. compile {r['compile_and_first_round_s']:.1f} s)")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

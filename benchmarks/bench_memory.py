r"""Peak memory of the DP step against the plain step (issue: memory).

For the tiny U-Net on a batch of --batch slices at each --sizes, compiles
(no timing, so the figures do not depend on what else runs on the machine)
and reads XLA's buffer assignment (`Compiled.memory_analysis()`): the peak
is arguments + outputs + temporaries - aliased bytes, what the step needs
on the device at once. Steps:

* plain: the non-private batched gradient of the mean loss;
* dp_full: `privacy.clipped_grad` over the whole batch (vmap of per-example
  gradients, then clip and sum);
* dp_microbatch: the same in sequential microbatches of --microbatch;
* dp_chunked: `privacy.chunked_clipped_grad` with --chunk (the engine's
  default path: work follows the sample);

each DP step followed by the Gaussian noise. Ratios are against plain.

  python benchmarks/bench_memory.py --sizes=32,64,128 --batch=16
"""

import json

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from fedjax_seg import models
from fedjax_seg import privacy
from fedjax_seg.segmentation import task as segmentation_task

_BATCH = flags.DEFINE_integer("batch", 16, "Examples per step.")
_SIZES = flags.DEFINE_list("sizes", ["32", "64", "128"], "Image sizes.")
_MICROBATCH = flags.DEFINE_integer("microbatch", 4, "dp_microbatch size.")
_CHUNK = flags.DEFINE_integer("chunk", 4, "dp_chunked chunk size.")
_MODEL = flags.DEFINE_string("model", "tiny", "U-Net preset.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")


def peak_bytes(fn, *args) -> int:
  """Arguments + outputs + temporaries - aliased, of the compiled `fn`."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def measure(size: int) -> dict:
  model = models.SegmentationModel(models.preset(_MODEL.value))
  params = model.init(jax.random.key(0), (1, size, size, 1))
  loss = segmentation_task.example_loss(model)
  b = _BATCH.value
  batch = {"image": jnp.zeros((b, size, size, 1)),
           "label": jnp.zeros((b, size, size), jnp.int32)}
  padding = jnp.zeros((b,), bool)
  key = jax.random.key(3)
  noise = privacy.gaussian_noise(1.0, l2_clip_norm=1.0, expected_batch_size=b)
  mean_loss = lambda p, x: jnp.mean(jax.vmap(loss, (None, 0))(p, x))

  def with_noise(clip):
    def step(p, x, pad, k):
      grad_sum = clip(p, x, pad)
      return noise.update(grad_sum, noise.init(p), p, noise_key=k)[0]
    return step

  full = privacy.clipped_grad(loss, l2_clip_norm=1.0)
  micro = privacy.clipped_grad(loss, l2_clip_norm=1.0,
                               microbatch_size=_MICROBATCH.value)
  chunked = privacy.chunked_clipped_grad(loss, l2_clip_norm=1.0,
                                         chunk_size=_CHUNK.value)
  steps = {
      "plain": peak_bytes(jax.grad(mean_loss), params, batch),
      "dp_full": peak_bytes(with_noise(lambda p, x, m: full(p, x, m)[0]),
                            params, batch, padding, key),
      "dp_microbatch": peak_bytes(
          with_noise(lambda p, x, m: micro(p, x, m)[0]), params, batch,
          padding, key),
      "dp_chunked": peak_bytes(
          with_noise(lambda p, x, m: chunked(p, x, m)[0]), params, batch,
          padding, key),
  }
  return {"size": size, "batch": b, "params": models.count_params(params),
          "peak_bytes": steps,
          "ratio_vs_plain": {k: v / steps["plain"] for k, v in steps.items()}}


def main(argv):
  del argv
  rows = [measure(int(s)) for s in _SIZES.value]
  for row in rows:
    print(f"{row['size']}x{row['size']}, batch {row['batch']}: " + ", ".join(
        f"{k} {v / 2**20:.1f} MiB (x{row['ratio_vs_plain'][k]:.2f})"
        for k, v in row["peak_bytes"].items()))
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump({"model": _MODEL.value, "device": str(jax.devices()[0]),
                 "jax": jax.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  app.run(main)

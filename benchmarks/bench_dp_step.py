r"""DP-SGD gradient vs the non-private gradient, same model and batch.

Times (after compilation, median of --repeats) the gradient of the tiny U-Net
on a batch of --batch slices of --size: (a) the non-private batched gradient
of the mean loss, (b) per-example gradients with `jax.vmap`, (b') the same
per-example gradients from each layer's input and output gradient
(`privacy.layer_gradients`, `--per_example_grads=layers`), kernels by their
per-example VJP or by one contraction per tap, (c) our
`privacy.clipped_grad` (jax_privacy underneath) with clipping, (d) (c) plus
the Gaussian noise transform, (c') the same clipped sum from one batched
pass (`layer_gradients.ghost_clipped_grad`: ghost norms where
`ghost_is_cheaper`, or none, and the sum by book-keeping). Ratios are
against (a), measured in the same run.

  python benchmarks/bench_dp_step.py --batch=16 --size=32
"""

import json
import statistics
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from fedjax_seg import models
from fedjax_seg import privacy
from fedjax_seg.segmentation import task as segmentation_task

_BATCH = flags.DEFINE_integer("batch", 16, "Examples per step.")
_REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls.")
_MODEL = flags.DEFINE_string("model", "tiny", "U-Net preset.")
_SIZE = flags.DEFINE_integer("size", 32, "Image side in pixels.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")


def _time(fn, *args):
  jax.block_until_ready(fn(*args))  # Compile.
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv):
  del argv
  model = models.SegmentationModel(models.preset(_MODEL.value))
  size = _SIZE.value
  params = model.init(jax.random.key(0), (1, size, size, 1))
  loss = segmentation_task.example_loss(model)
  batch = {"image": jax.random.normal(jax.random.key(1),
                                      (_BATCH.value, size, size, 1)),
           "label": jax.random.randint(jax.random.key(2),
                                       (_BATCH.value, size, size), 0, 3)}
  layered = {how: privacy.layer_gradients.per_example_value_and_grad(
      lambda p, x, tape: model.apply(p, x, tape=tape),
      segmentation_task.logits_loss(), kernel_method=how)
             for how in ("vjp", "taps", "auto")}
  mean_loss = lambda p, b: jnp.mean(jax.vmap(loss, (None, 0))(p, b))
  clipped = privacy.clipped_grad(loss, l2_clip_norm=1.0)
  ghost = {how: privacy.layer_gradients.ghost_clipped_grad(
      lambda p, x, tape: model.apply(p, x, tape=tape),
      segmentation_task.logits_loss(), norm_method=how)
           for how in ("auto", "materialize")}
  noise = privacy.gaussian_noise(1.0, l2_clip_norm=1.0,
                                 expected_batch_size=_BATCH.value)

  def dp_step(p, b, key):
    grad_sum, _ = clipped(p, b)
    return noise.update(grad_sum, noise.init(p), p, noise_key=key)[0]

  results = {
      "non_private_grad": _time(jax.jit(jax.grad(mean_loss)), params, batch),
      "per_example_grads_vmap": _time(jax.jit(jax.vmap(
          jax.grad(loss), (None, 0))), params, batch),
      "per_example_grads_layers_vjp": _time(jax.jit(
          lambda p, b: layered["vjp"](p, b)[1]), params, batch),
      "per_example_grads_layers_taps": _time(jax.jit(
          lambda p, b: layered["taps"](p, b)[1]), params, batch),
      "per_example_grads_layers_auto": _time(jax.jit(
          lambda p, b: layered["auto"](p, b)[1]), params, batch),
      "clipped_grad": _time(jax.jit(lambda p, b: clipped(p, b)[0]), params,
                            batch),
      "clipped_sum_ghost_auto": _time(jax.jit(lambda p, b: ghost["auto"](
          p, b, l2_clip_norm=1.0)[0]), params, batch),
      "clipped_sum_bookkeeping_no_ghost": _time(jax.jit(
          lambda p, b: ghost["materialize"](p, b, l2_clip_norm=1.0)[0]),
                                                params, batch),
      "dp_step_clip_and_noise": _time(jax.jit(dp_step), params, batch,
                                      jax.random.key(3)),
  }
  base = results["non_private_grad"]
  report = {"model": _MODEL.value, "batch": _BATCH.value, "size": size,
            "device": str(jax.devices()[0]), "jax": jax.__version__,
            "seconds": results,
            "ratio_vs_non_private": {k: v / base for k, v in results.items()}}
  for k, v in results.items():
    print(f"{k:30s} {1e3 * v:8.1f} ms   x{v / base:.2f}")
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

r"""Where a U-Net step's time goes on CPU: each layer's forward + backward in
JAX (XLA) and, when torch is importable, in PyTorch, at the tiny U-Net's
shapes.

Every layer of the tiny U-Net (widths 16, 32, 64) at a batch of 8 slices of
`--size`: the 3x3 convolutions of the blocks, the 2x2 stride-2 upsampling
(ours: `unet._upsample2`, one matmul; torch: ConvTranspose2d), max pooling
(ours: `unet._max_pool2`) and GroupNorm. Each figure is the median of
`--repeats` calls of `grad(sum(layer(x) * r))` with respect to the input and
the weights (jitted on the JAX side), in milliseconds. Each 3x3 convolution
is also timed as patches + one matmul (`lax.conv_general_dilated_patches`
and a dot, checked equal to the convolution). torch's ops run in
NCHW (its native layout), ours in NHWC (XLA's CPU convolution layout).

  python benchmarks/profile_layers.py --size=64 --threads=2

With --per_example, times instead each 3x3 convolution's per-example kernel
gradients from its input A and output gradient B, both ways
`privacy.layer_gradients` forms them (the kernel VJP per example, as
`vmap(grad)` does, and one contraction per tap), and says which one
`layer_gradients.auto_kernel_method` picks from the channel counts:

  python benchmarks/profile_layers.py --per_example --size=128 --batch=4
"""

import argparse
import math
import os
import statistics
import time


def _timed(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def layers(size: int, widths=(16, 32, 64)):
  """(name, kind, spatial size, in channels, out channels), in step order."""
  out, cin = [], 1
  for i, w in enumerate(widths):
    s = size // 2 ** i
    if i:
      out.append((f"pool {2 * s}px x{cin}", "pool", 2 * s, cin, cin))
    out.append((f"conv3 {s}px {cin}->{w}", "conv", s, cin, w))
    out.append((f"norm {s}px x{w}", "norm", s, w, w))
    out.append((f"conv3 {s}px {w}->{w}", "conv", s, w, w))
    out.append((f"norm {s}px x{w}", "norm", s, w, w))
    cin = w
  for i in reversed(range(len(widths) - 1)):
    s = size // 2 ** i
    out.append((f"up2 {s // 2}px {widths[i + 1]}->{widths[i]}", "up",
                 s // 2, widths[i + 1], widths[i]))
    out.append((f"conv3 {s}px {2 * widths[i]}->{widths[i]}", "conv", s,
                 2 * widths[i], widths[i]))
    out.append((f"norm {s}px x{widths[i]}", "norm", s, widths[i], widths[i]))
    out.append((f"conv3 {s}px {widths[i]}->{widths[i]}", "conv", s,
                 widths[i], widths[i]))
    out.append((f"norm {s}px x{widths[i]}", "norm", s, widths[i], widths[i]))
  return out


def jax_times(spec, batch, repeats):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_seg.models import unet  # pylint: disable=g-import-not-at-top
  times = {}
  for name, kind, s, cin, cout in spec:
    x = jax.random.normal(jax.random.key(0), (batch, s, s, cin))
    rngs = nnx.Rngs(0)
    if kind == "conv":
      layer = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
      apply = lambda m, x: m(x)
    elif kind == "up":
      layer = nnx.ConvTranspose(cin, cout, (2, 2), strides=(2, 2), rngs=rngs)
      apply = lambda m, x: unet._upsample2(m, x, jnp.float32)  # pylint: disable=protected-access
    elif kind == "norm":
      layer = nnx.GroupNorm(cin, num_groups=math.gcd(cin, 8), rngs=rngs)
      apply = lambda m, x: m(x)
    else:
      layer = nnx.Linear(1, 1, rngs=rngs)  # Unused: pooling has no weights.
      apply = lambda m, x: unet._max_pool2(x)  # pylint: disable=protected-access
    graph, state = nnx.split(layer)
    r = jax.random.normal(jax.random.key(1),
                          jax.eval_shape(lambda st, x: apply(
                              nnx.merge(graph, st), x), state, x).shape)
    grad = jax.jit(jax.grad(lambda st, x: jnp.sum(
        apply(nnx.merge(graph, st), x) * r), argnums=(0, 1)))
    times[name] = _timed(lambda: jax.block_until_ready(grad(state, x)),
                         repeats)
    if kind == "conv":
      # The same convolution as patches + one matmul.
      kernel = layer.kernel[...]
      bias = layer.bias[...]

      def patches_conv(k, b, x):
        p = jax.lax.conv_general_dilated_patches(
            x, (3, 3), (1, 1), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        # Patch features are ordered (channel, kh, kw).
        w = jnp.transpose(k, (2, 0, 1, 3)).reshape(-1, k.shape[-1])
        return p @ w + b

      np.testing.assert_allclose(
          patches_conv(kernel, bias, x), layer(x), rtol=1e-4, atol=1e-4)
      pgrad = jax.jit(jax.grad(lambda k, b, x: jnp.sum(
          patches_conv(k, b, x) * r), argnums=(0, 1, 2)))
      times[name + " (patches)"] = _timed(
          lambda: jax.block_until_ready(pgrad(kernel, bias, x)), repeats)
  return times


def per_example_times(spec, batch, repeats):
  """{conv layer: (kernel VJP ms, per-tap ms, auto's choice)}."""
  import jax  # pylint: disable=g-import-not-at-top
  from fedjax_seg.privacy import layer_gradients  # pylint: disable=g-import-not-at-top
  times = {}
  for name, kind, s, cin, cout in spec:
    if kind != "conv":
      continue
    a = jax.random.normal(jax.random.key(0), (batch, s, s, cin))
    b = jax.random.normal(jax.random.key(1), (batch, s, s, cout))
    per_method = []
    for fn in (layer_gradients.conv_kernel_grad_vjp,
               layer_gradients.conv_kernel_grad):
      grad = jax.jit(lambda a, b, fn=fn: fn(a, b, (3, 3)))
      per_method.append(_timed(
          lambda grad=grad: jax.block_until_ready(grad(a, b)), repeats))
    times[name] = (*per_method,
                   layer_gradients.auto_kernel_method(cin, cout))
  return times


def print_per_example(args, spec):
  times = per_example_times(spec, args.batch, args.repeats)
  print(f"| conv layer ({args.size}px, batch {args.batch}) | kernel VJP ms "
        "| per tap ms | auto picks | auto ms |")
  print("| --- | ---: | ---: | --- | ---: |")
  total = [0.0, 0.0, 0.0, 0.0]
  for name, (vjp, taps, pick) in times.items():
    auto = taps if pick == "taps" else vjp
    for i, t in enumerate((vjp, taps, auto, min(vjp, taps))):
      total[i] += t
    print(f"| {name} | {vjp:.2f} | {taps:.2f} | {pick} | {auto:.2f} |")
  print(f"| all | {total[0]:.1f} | {total[1]:.1f} | (best per layer "
        f"{total[3]:.1f}) | {total[2]:.1f} |")


def torch_times(spec, batch, repeats):
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  times = {}
  for name, kind, s, cin, cout in spec:
    x = torch.randn(batch, cin, s, s, requires_grad=True)
    if kind == "conv":
      layer = nn.Conv2d(cin, cout, 3, padding=1)
    elif kind == "up":
      layer = nn.ConvTranspose2d(cin, cout, 2, stride=2)
    elif kind == "norm":
      layer = nn.GroupNorm(math.gcd(cin, 8), cin)
    else:
      layer = nn.MaxPool2d(2)
    r = torch.randn_like(layer(x))

    def step():
      layer.zero_grad(set_to_none=True)
      x.grad = None
      (layer(x) * r).sum().backward()

    times[name] = _timed(step, repeats)
  return times


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--size", type=int, default=32)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--per_example", action="store_true",
                      help="Per-example kernel gradients instead.")
  args = parser.parse_args()
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  spec = layers(args.size)
  if args.per_example:
    print_per_example(args, spec)
    return
  ours = jax_times(spec, args.batch, args.repeats)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(args.threads)
    theirs = torch_times(spec, args.batch, args.repeats)
  except ImportError:
    theirs = {}
  print(f"| layer ({args.size}px, batch {args.batch}, {args.threads} threads)"
        " | JAX ms | JAX patches+matmul ms | torch ms | JAX / torch |")
  print("| --- | ---: | ---: | ---: | ---: |")
  total = [0.0, 0.0, 0.0]
  for name, *_ in spec:
    t = theirs.get(name)
    patches = ours.get(name + " (patches)")
    total[0] += ours[name]
    total[1] += min(ours[name], patches) if patches else ours[name]
    total[2] += t or 0.0
    ratio = f"{ours[name] / t:.2f}x" if t else "-"
    print(f"| {name} | {ours[name]:.2f} | "
          f"{f'{patches:.2f}' if patches else '-'} | "
          f"{f'{t:.2f}' if t else '-'} | {ratio} |")
  print(f"| all layers | {total[0]:.1f} | {total[1]:.1f} (faster of the two "
        f"per conv) | {total[2]:.1f} | "
        f"{f'{total[0] / total[2]:.2f}x' if theirs else '-'} |")


if __name__ == "__main__":
  main()

r"""Our DP-SGD step against Opacus's, same U-Net, batch and image size.

One process, interleaved: at each --sizes the five steps below run in turn,
--repeats rounds of one call each (the order rotates every round, so a slow
spell of the machine hits every step alike), and each figure is the median.
Every step is a whole optimizer step on one fixed batch of --batch slices:
forward, backward, (DP: per-example gradients, clipping to L2 norm 1 per
slice, the sum, Gaussian noise of std 1 x C, divided by the batch), SGD
update.

  ours plain   jit(grad of the mean loss) + optax.sgd.
  ours DP      jit(privacy.clipped_grad (vmap(grad) under jax_privacy's
               clipping) + privacy.gaussian_noise) + optax.sgd.
  torch plain  loss.backward() + torch.optim.SGD.
  opacus hooks Opacus's PrivacyEngine (grad_sample_mode="hooks": per-sample
               gradients from module hooks, functorch for layers without a
               hook, e.g. ConvTranspose2d) + DPOptimizer(SGD).
  opacus ghost Opacus's fast gradient clipping (grad_sample_mode="ghost"):
               per-sample gradient norms (ghost norms for Linear layers,
               per-sample gradients for the rest), then a second backward of
               the norm-weighted loss; no per-sample gradient is stored.

Both sides: the tiny U-Net (widths 16, 32, 64, GroupNorm, 117,427
parameters; `benchmarks/torch_unet.py`), soft Dice + cross-entropy per slice,
float32, Poisson sampling off (a fixed batch; sampling is not what is timed).
torch uses --threads intra-op threads; XLA's CPU client uses every core.

  pip install -e '.[bench]'   # opacus and torch==2.13.0 (CPU build)
  python benchmarks/bench_vs_opacus.py --sizes=32,64,128 --batch=16 --threads=2
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch  # pylint: disable=g-import-not-at-top,g-bad-import-order
from torch.utils import data as torch_data  # pylint: disable=g-import-not-at-top
import opacus  # pylint: disable=g-import-not-at-top
import torch_unet  # pylint: disable=g-import-not-at-top

from fedjax_seg.run import artifacts  # pylint: disable=g-import-not-at-top
from fedjax_seg import models  # pylint: disable=g-import-not-at-top
from fedjax_seg import privacy  # pylint: disable=g-import-not-at-top
from fedjax_seg.segmentation import task as segmentation_task  # pylint: disable=g-import-not-at-top

CLIP = 1.0
NOISE = 1.0
LEARNING_RATE = 0.1


def _batch(size: int, batch: int, seed: int = 0):
  """A fixed batch: images N(0, 1) [B, S, S, 1], labels in {0, 1, 2}."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, size, size, 1)).astype(np.float32)
  label = rng.integers(0, 3, size=(batch, size, size)).astype(np.int32)
  return image, label


def our_steps(image, label):
  """{name: zero-argument callable running one step}, JAX side."""
  model = models.SegmentationModel(models.preset("tiny"))
  size = image.shape[1]
  params = model.init(jax.random.key(0), (1, size, size, 1))
  assert models.count_params(params) == torch_unet.EXPECTED_PARAMETERS
  loss = segmentation_task.example_loss(model)
  batch = {"image": jnp.asarray(image), "label": jnp.asarray(label)}
  optimizer = optax.sgd(LEARNING_RATE)
  clipped = privacy.clipped_grad(loss, l2_clip_norm=CLIP)
  noise = privacy.gaussian_noise(NOISE, l2_clip_norm=CLIP,
                                 expected_batch_size=image.shape[0])

  @jax.jit
  def plain(p, o, b):
    mean_loss = lambda q: jnp.mean(jax.vmap(loss, (None, 0))(q, b))
    updates, o = optimizer.update(jax.grad(mean_loss)(p), o, p)
    return optax.apply_updates(p, updates), o

  @jax.jit
  def private(p, o, b, key):
    grad_sum, _ = clipped(p, b)
    grad, _ = noise.update(grad_sum, noise.init(p), p, noise_key=key)
    updates, o = optimizer.update(grad, o, p)
    return optax.apply_updates(p, updates), o

  state = {"plain": (params, optimizer.init(params)),
           "dp": (params, optimizer.init(params)), "step": 0}

  def run_plain():
    state["plain"] = jax.block_until_ready(plain(*state["plain"], batch))

  def run_dp():
    state["step"] += 1
    key = jax.random.fold_in(jax.random.key(1), state["step"])
    state["dp"] = jax.block_until_ready(private(*state["dp"], batch, key))

  return {"ours_plain": run_plain, "ours_dp": run_dp}


class _DiceCELoss(torch.nn.Module):
  """torch_unet's per-slice loss as a criterion with a `reduction` (what
  Opacus's fast gradient clipping needs)."""

  def __init__(self, reduction="mean"):
    super().__init__()
    self.reduction = reduction

  def forward(self, logits, target):
    losses = torch_unet.dice_ce_losses(logits, target)
    if self.reduction == "none":
      return losses
    return losses.mean() if self.reduction == "mean" else losses.sum()


def _fresh_net(in_channels=1):
  torch.manual_seed(0)
  net = torch_unet.UNet(in_channels=in_channels)
  torch_unet.flax_like_init_(net)
  assert torch_unet.count_parameters(net) == torch_unet.EXPECTED_PARAMETERS
  return net


def torch_steps(image, label, modes=("hooks", "ghost")):
  """{name: zero-argument callable running one step}, PyTorch side."""
  x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
  y = torch.from_numpy(label.astype(np.int64))
  batch = x.shape[0]
  steps = {}

  net = _fresh_net()
  sgd = torch.optim.SGD(net.parameters(), lr=LEARNING_RATE)

  def run_plain():
    sgd.zero_grad(set_to_none=True)
    net.example_losses(x, y).mean().backward()
    sgd.step()

  steps["torch_plain"] = run_plain
  loader = torch_data.DataLoader(torch_data.TensorDataset(x, y),
                                 batch_size=batch)
  for mode in modes:
    dp_net = _fresh_net()
    optimizer = torch.optim.SGD(dp_net.parameters(), lr=LEARNING_RATE)
    criterion = _DiceCELoss()
    engine = opacus.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Secure-RNG and Poisson-off notices.
      made = engine.make_private(
          module=dp_net, optimizer=optimizer, criterion=criterion,
          data_loader=loader, noise_multiplier=NOISE, max_grad_norm=CLIP,
          poisson_sampling=False, grad_sample_mode=mode)
    if mode == "ghost":
      module, dp_optimizer, dp_criterion, _ = made

      def run_ghost(module=module, dp_optimizer=dp_optimizer,
                    dp_criterion=dp_criterion):
        dp_optimizer.zero_grad(set_to_none=True)
        dp_criterion(module(x), y).backward()
        dp_optimizer.step()

      steps["opacus_ghost"] = run_ghost
    else:
      module, dp_optimizer, _ = made

      def run_hooks(module=module, dp_optimizer=dp_optimizer,
                    criterion=criterion):
        dp_optimizer.zero_grad(set_to_none=True)
        criterion(module(x), y).backward()
        dp_optimizer.step()

      steps[f"opacus_{mode}"] = run_hooks
  return steps


def measure(size: int, batch: int, repeats: int, warmup: int = 2):
  """Median seconds per step of every step at one size, interleaved."""
  image, label = _batch(size, batch)
  steps = {**our_steps(image, label), **torch_steps(image, label)}
  names = list(steps)
  for name in names:
    start = time.perf_counter()
    for _ in range(warmup):
      steps[name]()
    if name.startswith("ours"):
      print(f"  {size}px {name}: first {warmup} calls (incl. compile) "
            f"{time.perf_counter() - start:.1f} s", flush=True)
  times = {name: [] for name in names}
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      start = time.perf_counter()
      steps[name]()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="32,64,128")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--threads", type=int, default=2)
  parser.add_argument("--output", default=None, help="Write JSON here.")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  results = {"machine": {"platform": platform.platform(),
                         "processor": platform.processor(),
                         "cpus": os.cpu_count(),
                         "torch_threads": torch.get_num_threads(),
                         "jax": jax.__version__, "torch": torch.__version__,
                         "opacus": opacus.__version__,
                         "jax_devices": [str(d) for d in jax.devices()]},
             "batch": args.batch, "repeats": args.repeats, "sizes": {}}
  print(f"batch {args.batch}, {args.repeats} interleaved repeats, torch "
        f"threads {torch.get_num_threads()}, {jax.devices()[0].platform}")
  for size in (int(s) for s in args.sizes.split(",")):
    t = measure(size, args.batch, args.repeats)
    ratios = {"ours_dp_over_plain": t["ours_dp"] / t["ours_plain"],
              "opacus_hooks_over_plain": t["opacus_hooks"] / t["torch_plain"],
              "opacus_ghost_over_plain": t["opacus_ghost"] / t["torch_plain"],
              "ours_dp_over_opacus_hooks": t["ours_dp"] / t["opacus_hooks"],
              "ours_dp_over_best_opacus": t["ours_dp"] / min(
                  t["opacus_hooks"], t["opacus_ghost"]),
              "ours_plain_over_torch_plain": t["ours_plain"] /
                                             t["torch_plain"]}
    results["sizes"][size] = {"ms": {k: 1e3 * v for k, v in t.items()},
                              "ratios": ratios}
    print(f"{size}x{size}: " + ", ".join(f"{k} {1e3 * v:.1f} ms"
                                         for k, v in t.items()))
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()),
          flush=True)
  if args.output:
    artifacts.atomic_write(pathlib.Path(args.output),
                            json.dumps(results, indent=1).encode())


if __name__ == "__main__":
  main()

r"""The pfl-research side of the fedjax_seg vs pfl benchmark (own process).

pfl 0.6.0 (Apple's pfl-research, PyTorch backend) cannot share an environment
with fedjax_seg (it pins dp-accounting<0.6, jax-privacy needs >=0.6), so the
pfl half of the comparison runs here, in a Python that has pfl, torch and
numpy, and hands its timings back as JSON. This file imports only the
standard library, numpy, torch, pfl and benchmarks/torch_unet.py.

The task mirrors the fedjax_seg one: every site trains every round (cohort =
all sites, one pfl user per site), `--local_steps` plain SGD steps (no
momentum) of `--batch_size` examples at `--learning_rate`, per-site updates
weighted equally (`WeightByUser`), the averaged update applied by plain SGD
at `--server_learning_rate`. With DP (the default) each site's model update
is clipped to L2 norm `--clip` and Gaussian noise of std `--noise * --clip`
is added to the sum of the clipped updates before averaging (site-level DP:
`CentrallyAppliedPrivacyMechanism(GaussianMechanism(...))`); `--nodp` drops
the mechanism. The model is the tiny U-Net of fedjax_seg/models/unet.py
(widths 16, 32, 64, GroupNorm, 117,427 parameters) with the same loss (soft
Dice without background + mean pixel cross-entropy, per example, mean over
the batch), initialised like Flax (LeCun-normal kernels, zero biases).

How pfl is driven, and why (from pfl 0.6.0's source):
  * `PyTorchModel.do_multiple_epochs_of` makes one pass over the user's
    `Dataset` in order (no shuffling) and stops after `local_num_steps`
    batches, so a user with fewer than steps * B examples would take fewer or
    smaller steps. Each round's user dataset is therefore the next steps * B
    examples of a per-site random epoch order (a fresh permutation whenever
    one runs out, like fedjax_seg's `sampling.shuffled_batch`): exactly
    `local_num_steps` batches of `batch_size`, different examples each round.
    The images are NCHW torch tensors from load time; a round only indexes.
  * pfl evaluates every user before and after local training when
    `iteration % evaluation_frequency == 0`, so always at iteration 0. Here
    evaluation_frequency = rounds + 1: it evaluates at iteration 0 only, so
    round 1 is slower and not representative (the caller drops it). No
    validation population is sampled (val_cohort_size=None); the backend's
    val_data is a one-example dataset that is never read.
  * Metrics are not sent to pfl's platform (`send_metrics_to_platform=False`),
    which otherwise prints ~20 lines to stdout every round.
  * Seeding: pfl's algorithm, backend and federated dataset each draw their
    random state from numpy's global RNG when constructed, and the central
    noise is drawn from a torch.Generator seeded from the algorithm's state
    (`central_context.seed`), so `np.random.seed` + `torch.manual_seed` before
    construction (`--seed`) makes a run repeatable.

Round times come from a `TrainingProcessCallback` that stamps
`after_central_iteration`; the first is measured from just before
`FederatedAveraging.run`.

  python benchmarks/pfl_side.py --data=SITES.npz --rounds=R --threads=T \
      [--nodp] --local_steps=2 --batch_size=8 --learning_rate=0.5 \
      --server_learning_rate=1.0 --clip=0.5 --noise=2.5 --out=RESULT.json

SITES.npz holds `num_sites` and, per site k, `image_k` float32 [N_k, H, W, 1]
(NHWC) and `label_k` int32 [N_k, H, W] with classes 0, 1, 2.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

# pfl picks cuda/mps when available unless told otherwise; the comparison is
# on CPU. Must be set before pfl is imported.
os.environ.setdefault("PFL_PYTORCH_DEVICE", "cpu")

import numpy as np
import torch

# Imported first so that pfl selects its PyTorch ops for the other modules.
from pfl.model.pytorch import PyTorchModel  # pylint: disable=g-bad-import-order
import pfl
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByUser
from pfl.algorithm import FederatedAveraging
from pfl.algorithm import NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams
from pfl.hyperparam import NNTrainHyperParams
from pfl.metrics import Metrics
from pfl.metrics import Weighted
from pfl.privacy import CentrallyAppliedPrivacyMechanism
from pfl.privacy import GaussianMechanism

# The model and its loss: benchmarks/torch_unet.py (shared with Opacus's
# benchmark); pfl drives it through `loss` and `metrics`.
from torch_unet import EXPECTED_PARAMETERS  # pylint: disable=g-bad-import-order
from torch_unet import WIDTHS
from torch_unet import count_parameters
from torch_unet import flax_like_init_
import torch_unet


class UNet(torch_unet.UNet):
  """The shared U-Net with pfl's loss/metrics interface."""

  # pfl calls loss(*raw_data, **train_kwargs) and
  # metrics(*raw_data, **eval_kwargs). No layer depends on train/eval mode
  # (GroupNorm, no dropout), so neither switches it.
  def loss(self, x, y, eval=False):  # pylint: disable=redefined-builtin
    del eval
    return self.example_losses(x, y).mean()

  @torch.no_grad()
  def metrics(self, x, y, eval=True):  # pylint: disable=redefined-builtin
    del eval
    losses = self.example_losses(x, y)
    return {"loss": Weighted(float(losses.sum()), len(losses))}


# ---------------------------------------------------------------------------
# Data.


def load_sites(path: str):
  """[(images NCHW float32 tensor, labels int64 tensor)] per site."""
  with np.load(path) as npz:
    num_sites = int(npz["num_sites"])
    sites = []
    for k in range(num_sites):
      image = np.asarray(npz[f"image_{k}"], np.float32)
      label = np.asarray(npz[f"label_{k}"])
      if image.ndim != 4 or label.shape != image.shape[:3]:
        raise ValueError(f"site {k}: image {image.shape} (want [N, H, W, C]) "
                         f"and label {label.shape} (want [N, H, W]) differ.")
      x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))
      y = torch.from_numpy(label.astype(np.int64))
      sites.append((x, y))
  return sites


class EpochOrderSites:
  """`make_dataset_fn(user_id)` for pfl: each call, the next steps * B examples.

  A site's examples are read in a random order, epoch after epoch (a new
  permutation when one is used up), so the `local_num_steps` batches pfl
  takes in order from the returned `Dataset` are distinct examples within an
  epoch. A site smaller than B repeats examples within a batch (still B).
  """

  def __init__(self, sites, per_round: int, seed: int):
    self._sites = sites
    self._per_round = per_round
    self._rng = np.random.default_rng(seed)
    self._orders = [np.empty(0, np.int64) for _ in sites]

  def __call__(self, user_id: str) -> Dataset:
    k = int(user_id)
    x, y = self._sites[k]
    order = self._orders[k]
    while len(order) < self._per_round:
      order = np.concatenate([order, self._rng.permutation(len(x))])
    take, self._orders[k] = order[:self._per_round], order[self._per_round:]
    idx = torch.from_numpy(take)
    return Dataset((x[idx], y[idx]), user_id=user_id,
                   eval_kwargs={"eval": True})


class RoundTimer(TrainingProcessCallback):
  """Wall-clock stamps at the end of every central iteration."""

  def __init__(self):
    self.start = None
    self.stamps = []

  def after_central_iteration(self, aggregate_metrics, model, *,
                              central_iteration):
    del aggregate_metrics, model, central_iteration
    self.stamps.append(time.perf_counter())
    return False, Metrics()

  def round_seconds(self):
    times = [self.start] + self.stamps
    return [b - a for a, b in zip(times[:-1], times[1:])]


# ---------------------------------------------------------------------------
# The run.


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data", required=True, help="SITES.npz (see docstring).")
  p.add_argument("--rounds", type=int, required=True,
                 help="Central iterations.")
  p.add_argument("--threads", type=int, required=True,
                 help="torch intra-op threads.")
  p.add_argument("--nodp", action="store_true",
                 help="No clipping or noise (plain FedAvg).")
  p.add_argument("--local_steps", type=int, default=2)
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--learning_rate", type=float, default=0.5)
  p.add_argument("--server_learning_rate", type=float, default=1.0)
  p.add_argument("--clip", type=float, default=0.5,
                 help="L2 bound of each site's model update.")
  p.add_argument("--noise", type=float, default=2.5,
                 help="Noise std of the update sum, relative to --clip.")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", required=True, help="Result JSON.")
  args = p.parse_args(argv)
  for name in ("rounds", "threads", "local_steps", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name} must be >= 1.")
  return args


def run_benchmark(args):
  """Trains with pfl; returns (result dict, trained torch model, init params).

  Set the torch thread counts before calling (`main` does).
  """
  np.random.seed(args.seed)  # pfl's internal random states are drawn from it
  torch.manual_seed(args.seed)

  sites = load_sites(args.data)
  num_sites = len(sites)
  image_size = int(sites[0][0].shape[2])
  if any(x.shape[1:] != sites[0][0].shape[1:] for x, _ in sites):
    raise ValueError("all sites must share one image shape.")
  factor = 2 ** (len(WIDTHS) - 1)
  if any(s % factor for s in sites[0][0].shape[2:]):
    raise ValueError(f"image size must be a multiple of {factor}, got "
                     f"{tuple(sites[0][0].shape[2:])}.")

  net = UNet(in_channels=int(sites[0][0].shape[1]))
  flax_like_init_(net)
  num_parameters = count_parameters(net)
  assert num_parameters == EXPECTED_PARAMETERS, (
      f"U-Net has {num_parameters} parameters, fedjax_seg's has "
      f"{EXPECTED_PARAMETERS}.")
  print(f"parameters: {num_parameters}", flush=True)
  initial = {k: v.detach().clone() for k, v in net.named_parameters()}

  user_ids = [str(k) for k in range(num_sites)]
  make_dataset = EpochOrderSites(sites, args.local_steps * args.batch_size,
                                 seed=args.seed + 1)
  training_data = FederatedDataset(
      make_dataset, get_user_sampler("minimize_reuse", user_ids))
  x0, y0 = sites[0]
  val_data = FederatedDataset(  # never sampled: val_cohort_size=None
      lambda uid: Dataset((x0[:1], y0[:1]), user_id=uid,
                          eval_kwargs={"eval": True}),
      get_user_sampler("minimize_reuse", ["0"]))

  postprocessors = [WeightByUser()]
  if not args.nodp:
    postprocessors.append(CentrallyAppliedPrivacyMechanism(
        GaussianMechanism(clipping_bound=args.clip,
                          relative_noise_stddev=args.noise)))
  backend = SimulatedBackend(training_data=training_data, val_data=val_data,
                             postprocessors=postprocessors)

  model = PyTorchModel(
      model=net, local_optimizer_create=torch.optim.SGD,
      central_optimizer=torch.optim.SGD(net.parameters(),
                                        lr=args.server_learning_rate))
  algorithm_params = NNAlgorithmParams(
      central_num_iterations=args.rounds,
      evaluation_frequency=args.rounds + 1,  # iteration 0 only (unavoidable)
      train_cohort_size=num_sites,
      val_cohort_size=None)
  train_params = NNTrainHyperParams(
      local_batch_size=args.batch_size, local_num_epochs=None,
      local_learning_rate=args.learning_rate,
      local_num_steps=args.local_steps)
  eval_params = NNEvalHyperParams(local_batch_size=args.batch_size)

  timer = RoundTimer()
  algorithm = FederatedAveraging()
  timer.start = time.perf_counter()
  trained = algorithm.run(
      algorithm_params=algorithm_params, backend=backend, model=model,
      model_train_params=train_params, model_eval_params=eval_params,
      callbacks=[timer], send_metrics_to_platform=False)

  result = {
      "round_seconds": timer.round_seconds(),
      "parameters": num_parameters,
      "threads": args.threads,
      "dp": not args.nodp,
      "image_size": image_size,
      "site_sizes": [int(x.shape[0]) for x, _ in sites],
      "torch": torch.__version__,
      "pfl": pfl.__version__,
      "rounds": args.rounds,
      "local_steps": args.local_steps,
      "batch_size": args.batch_size,
      "learning_rate": args.learning_rate,
      "server_learning_rate": args.server_learning_rate,
      "clip": None if args.nodp else args.clip,
      "noise": None if args.nodp else args.noise,
      "seed": args.seed,
      "device": str(next(net.parameters()).device),
      "python": platform.python_version(),
      "machine": platform.machine(),
  }
  return result, trained.pytorch_model, initial


def main(argv=None):
  args = parse_args(argv)
  # Before any torch work, so that both pools take these sizes.
  torch.set_num_threads(args.threads)
  torch.set_num_interop_threads(1)
  result, _, _ = run_benchmark(args)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  rounds = result["round_seconds"]
  later = rounds[1:] or rounds
  print(f"pfl {result['pfl']} torch {result['torch']}: "
        f"{len(result['site_sizes'])} sites, {result['image_size']}px, "
        f"dp={result['dp']}, threads={result['threads']}, "
        f"{result['parameters']} params: median round "
        f"{statistics.median(later):.4f}s (excl. round 1, "
        f"{rounds[0]:.4f}s); rounds "
        f"[{', '.join(f'{t:.4f}' for t in rounds)}] -> {args.out}",
        flush=True)


if __name__ == "__main__":
  sys.exit(main())

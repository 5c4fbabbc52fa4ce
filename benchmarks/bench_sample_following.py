r"""Work that follows the realised Poisson sample, not the padded capacity.

Tiny U-Net, 32x32 slices of the built-in synthetic sites (split by patient,
stacked as `fedjax_seg/run/data.py` does), DP-SGD with 1 local step. Every
figure is a ratio of times measured in this run, the variants interleaved
call by call (so contention from other work hits all of them alike), each
timed with `jax.block_until_ready` after compilation.

(a) One slice-level DP step of the largest site (expected batch B=8,
    q = 8 / N, B_max from `max_batch_size_for` over the sites, as the
    experiment sizes it): the sample-following path (`chunk_size` c) and the
    full-capacity path (`chunk_size=None`) against a DP step on a batch of
    exactly B=8 slices with no padding (clipped sum + noise + SGD). A step's
    time depends on the realised sample, so each variant is timed on
    `--draws` samples (rounds 0..draws-1); the figure is the mean over draws
    of the per-draw median over `--repeats`, i.e. the expected step time.
(b) A DP round of all sites (loop backend), patient-level against
    slice-level, both with the same expected number of slices per site and
    step (8): slice q_k = 8 / N_k slices; patient q_k = 8 / N_k as well, which
    samples each patient (all its slices) with the rate that gives 8 expected
    slices. Also the brief's variant, B = ceil(8 / mean slices per patient)
    patients (q_k = B / P_k), which samples more slices at sites with long
    patients. Medians over `--rounds` rounds.
(c) Why the chunks run in a `lax.while_loop` with `canonicalize_convs`: one
    clipped gradient of 8 slices in the entry computation, inside a
    `lax.cond` branch, inside a `lax.while_loop`, each with and without the
    conv rewrite.

  python benchmarks/bench_sample_following.py --chunk_sizes=2,4,8
"""

import json
import math
import platform
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_seg import federated as fed
from fedjax_seg import models
from fedjax_seg import privacy
from fedjax_seg import xla_cpu
from fedjax_seg.data import sites
from fedjax_seg.data import synthetic
from fedjax_seg.privacy import plan as privacy_plan
from fedjax_seg.segmentation import task as segmentation_task

_CHUNKS = flags.DEFINE_list("chunk_sizes", ["2", "4", "8"],
                            "Chunk sizes of the sample-following path.")
_DRAWS = flags.DEFINE_integer("draws", 12, "(a): Poisson samples timed.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "(a), (c): calls per sample.")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "(b): timed rounds per variant.")
_ROUND_CHUNK = flags.DEFINE_integer("round_chunk_size", 4,
                                    "(b): chunk size of the new path.")
_SECTIONS = flags.DEFINE_list("sections", ["a", "b", "c"], "What to run.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the figures as JSON.")

BATCH = 8  # Expected slices per step.


def _timed(fn, *args):
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _site(tree, k):
  return jax.tree.map(lambda x: jnp.asarray(x)[k], tree)


def _slice_step(loss, site_data, train, params):
  """(a): the expected DP step time of each variant, in seconds."""
  n = np.asarray(train.num_examples)
  rates = np.minimum(1.0, BATCH / n)
  max_batch = max(privacy_plan.max_batch_size_for(int(a), float(q))
                  for a, q in zip(n, rates))
  k = int(np.argmax(n))
  data = _site(site_data, k)
  cfg = fed.SiteConfig(jnp.float32(rates[k]), jnp.float32(1.0))
  dp = fed.LocalDPConfig(l2_clip_norm=1.0)
  state = fed.init_site_state(params, dp)
  variants = {}
  for c in [None] + [int(c) for c in _CHUNKS.value]:
    client = fed.ClientConfig(local_steps=1, expected_batch_size=BATCH,
                              max_batch_size=max_batch, learning_rate=0.1,
                              chunk_size=c)
    update = jax.jit(fed.make_client_update(loss, client, dp))
    name = "full capacity" if c is None else f"chunk {c}"
    variants[name] = (lambda r, u=update: u(params, state, data, cfg,
                                            jnp.int32(r), jnp.int32(k),
                                            jax.random.key(0)))
  # Baseline: a DP step on exactly B slices, no padding, no sampling.
  exact = jax.tree.map(lambda x: x[:BATCH], data.examples)
  clipped = privacy.clipped_grad(loss, l2_clip_norm=1.0)
  noise = privacy.gaussian_noise(1.0, l2_clip_norm=1.0,
                                 expected_batch_size=BATCH)
  sgd = optax.sgd(0.1)

  @jax.jit
  def exact_step(p, batch, key):
    grad_sum, _ = clipped(p, batch)
    grad, _ = noise.update(grad_sum, noise.init(p), p, noise_key=key)
    updates, _ = sgd.update(grad, sgd.init(p), p)
    return optax.apply_updates(p, updates)

  variants = {"exact batch of 8 (baseline)":
                  lambda r: exact_step(params, exact, jax.random.key(r)),
              **variants}
  for fn in variants.values():
    jax.block_until_ready(fn(0))  # Compile.
  sizes = []
  for r in range(_DRAWS.value):
    key = privacy.derive_key(jax.random.key(0), round_index=r, site=k, step=0,
                             purpose=privacy.Purpose.SAMPLE_BATCH)
    _, mask = fed.poisson_sample(key, data.num_examples,
                                 data.examples["image"].shape[0],
                                 cfg.sampling_rate, max_batch)
    sizes.append(int(mask.sum()))
  times = {name: [[] for _ in range(_DRAWS.value)] for name in variants}
  for _ in range(_REPEATS.value):
    for r in range(_DRAWS.value):
      for name, fn in variants.items():
        times[name][r].append(_timed(fn, r))
  expected = {name: statistics.mean(statistics.median(t) for t in per_draw)
              for name, per_draw in times.items()}
  return {"site": train.site_names[k], "num_examples": int(n[k]),
          "max_batch_size": max_batch, "realised_sizes": sizes,
          "seconds": expected}


def _rounds(loss, site_data, train, params):
  """(b): median round time of slice- and patient-level rounds."""
  num_sites = train.num_sites
  slices = np.asarray(train.num_examples, np.float64)
  patients = np.asarray(train.num_patients, np.float64)
  mean_slices = slices.sum() / patients.sum()
  ceil_batch = math.ceil(BATCH / mean_slices)
  plans = {
      "slice, B=8": ("example", BATCH / slices, BATCH, slices),
      "patient, q=8/N_slices": ("patient", BATCH / slices, 1, patients),
      f"patient, B={ceil_batch}": ("patient", ceil_batch / patients,
                                   ceil_batch, patients),
  }
  trainers, info = {}, {}
  for plan, (unit, rates, expected, units) in plans.items():
    rates = np.minimum(1.0, rates)
    max_batch = max(privacy_plan.max_batch_size_for(int(a), float(q))
                    for a, q in zip(units, rates))
    cfg = fed.SiteConfig(jnp.asarray(rates, jnp.float32),
                         jnp.ones((num_sites,), jnp.float32))
    per_site = rates * (units if unit == "example" else slices)
    info[plan] = {"max_batch_size": max_batch,
                  "expected_slices_per_step": float(per_site.sum())}
    for c in (None, _ROUND_CHUNK.value):
      client = fed.ClientConfig(local_steps=1, expected_batch_size=expected,
                                max_batch_size=max_batch, learning_rate=0.1,
                                chunk_size=c)
      tr = fed.FederatedTrainer(loss, client,
                                fed.LocalDPConfig(unit=unit, l2_clip_norm=1.0),
                                fed.ServerConfig(), backend="loop")
      server_state, site_states = tr.init(params, num_sites)
      trainers[(plan, "full capacity" if c is None else f"chunk {c}")] = (
          tr, cfg, server_state, site_states)
  part = np.ones(num_sites, bool)
  times = {name: [] for name in trainers}
  compile_s = {}
  for r in range(_ROUNDS.value + 1):  # Round 0 compiles.
    for name, (tr, cfg, server_state, site_states) in trainers.items():
      start = time.perf_counter()
      out = tr.run_round(server_state, site_states, site_data, cfg, part, r,
                         jax.random.key(0))
      jax.block_until_ready(out[0].params)
      elapsed = time.perf_counter() - start
      if r == 0:
        compile_s[name] = elapsed
      else:
        times[name].append(elapsed)
  return {"plans": info, "mean_slices_per_patient": mean_slices,
          "round_s": {f"{p} / {v}": statistics.median(t)
                      for (p, v), t in times.items()},
          "first_round_incl_compile_s": {f"{p} / {v}": s
                                         for (p, v), s in compile_s.items()}}


def _loop_bodies(loss, site_data, params):
  """(c): one clipped gradient of 8 slices in and out of control flow."""
  batch = jax.tree.map(lambda x: x[:BATCH], _site(site_data, 0).examples)
  clipped = privacy.clipped_grad(loss, l2_clip_norm=1.0)
  grad = lambda p, b: clipped(p, b)[0]
  zeros = lambda p: jax.tree.map(jnp.zeros_like, p)

  def in_cond(g):
    return jax.jit(lambda p, b, t: jax.lax.cond(t, lambda: g(p, b),
                                                lambda: zeros(p)))

  def in_while(g):
    return jax.jit(lambda p, b, t: jax.lax.while_loop(
        lambda s: s[0] < t.astype(jnp.int32),
        lambda s: (s[0] + 1, g(p, b)), (jnp.int32(0), zeros(p)))[1])

  canon = xla_cpu.canonicalize_convs(grad)
  variants = {
      "entry computation (baseline)": jax.jit(lambda p, b, t: grad(p, b)),
      "lax.cond branch": in_cond(grad),
      "lax.cond branch + canonicalize_convs": in_cond(canon),
      "lax.while_loop body": in_while(grad),
      "lax.while_loop body + canonicalize_convs": in_while(canon),
  }
  for fn in variants.values():
    jax.block_until_ready(fn(params, batch, jnp.bool_(True)))
  times = {name: [] for name in variants}
  for _ in range(max(_REPEATS.value, 5)):
    for name, fn in variants.items():
      times[name].append(_timed(fn, params, batch, jnp.bool_(True)))
  return {name: statistics.median(t) for name, t in times.items()}


def _print_ratios(title, seconds, base):
  print(title)
  for name, s in seconds.items():
    print(f"  {name:45s} {1e3 * s:9.1f} ms   x{s / seconds[base]:.2f}")


def main(argv):
  del argv
  data = synthetic.generate(synthetic.SyntheticConfig(image_size=32))
  train = sites.stack_sites(sites.split_by_patient(data)["train"])
  site_data = segmentation_task.site_data(train)
  model = models.SegmentationModel(models.preset("tiny"))
  params = model.init(jax.random.key(0), (1, 32, 32, 1))
  loss = segmentation_task.example_loss(model)
  report = {"model": "tiny", "params": models.count_params(params),
            "device": str(jax.devices()[0]), "jax": jax.__version__,
            "python": sys.version.split()[0], "machine": platform.machine(),
            "date": time.strftime("%Y-%m-%d")}
  if "c" in _SECTIONS.value:
    report["loop_bodies_s"] = _loop_bodies(loss, site_data, params)
    _print_ratios("(c) clipped gradient of 8 slices", report["loop_bodies_s"],
                  "entry computation (baseline)")
  if "a" in _SECTIONS.value:
    report["slice_step"] = step = _slice_step(loss, site_data, train,
                                              params)
    print(f"(a) slice-level DP step, site {step['site']} "
          f"(N={step['num_examples']}, B_max={step['max_batch_size']}), "
          f"realised sizes {step['realised_sizes']}")
    _print_ratios("", step["seconds"], "exact batch of 8 (baseline)")
  if "b" in _SECTIONS.value:
    report["rounds"] = rounds = _rounds(loss, site_data, train, params)
    print(f"(b) rounds; plans {rounds['plans']}")
    _print_ratios("", rounds["round_s"], "slice, B=8 / full capacity")
    print("  first round incl. compile:",
          {k: round(v, 1) for k, v in
           rounds["first_round_incl_compile_s"].items()})
  if _OUTPUT.value:
    with open(_OUTPUT.value, "w") as f:
      json.dump(report, f, indent=1)


if __name__ == "__main__":
  app.run(main)

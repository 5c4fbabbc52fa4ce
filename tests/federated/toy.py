"""A tiny linear-regression federation for the federated tests."""

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import federated as fed

DIM = 3
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)


def loss_fn(params, example):
  """Per-example squared error (plus a 'norm' parameter for FedBN tests)."""
  pred = example["x"] @ params["w"] * params["norm"]["scale"] + params["b"]
  return (pred - example["y"]) ** 2


def init_params():
  return {"w": jnp.zeros(DIM), "b": jnp.zeros(()),
          "norm": {"scale": jnp.ones(())}}


def site_data(sizes=(12, 8, 5, 10), capacity=None, seed=0, patients=False):
  """Stacked, padded sites; padding holds garbage (it must never matter).

  `patients`: False (one slice per unit), True (patients of 2 consecutive
  slices) or "ragged" (consecutive patients of 1, 3, 2, 1, 3, 2, ... slices,
  the last one cut by the site's size).
  """
  if patients == "ragged":
    return _ragged_site_data(sizes, capacity, seed)
  sizes = np.asarray(sizes, np.int32)
  m = capacity or int(sizes.max())
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(len(sizes), m, DIM)).astype(np.float32)
  y = (x @ W_TRUE + 0.1 * rng.normal(size=(len(sizes), m))).astype(np.float32)
  pad = np.arange(m)[None, :] >= sizes[:, None]
  x[pad] = 1e6
  y[pad] = np.nan
  if patients:  # Patients of 2 consecutive slices.
    p = (m + 1) // 2
    groups = np.stack([np.arange(p) * 2, np.minimum(np.arange(p) * 2 + 1,
                                                    m - 1)], -1)
    groups = np.broadcast_to(groups, (len(sizes), p, 2)).astype(np.int32)
    group_mask = groups < sizes[:, None, None]
    group_mask[:, :, 1] &= groups[:, :, 1] != groups[:, :, 0]
    num_groups = group_mask[:, :, 0].sum(1).astype(np.int32)
  else:
    groups = np.broadcast_to(np.arange(m)[None, :, None],
                             (len(sizes), m, 1)).astype(np.int32)
    group_mask = ~pad[..., None]
    num_groups = sizes
  return fed.SiteData({"x": x, "y": y}, sizes, groups, group_mask, num_groups)


def _ragged_site_data(sizes, capacity, seed):
  base = site_data(sizes, capacity, seed)
  sizes = np.asarray(sizes, np.int32)
  m = base.examples["x"].shape[1]
  per_site = []
  for n in sizes:
    patients, start = [], 0
    while start < n:
      length = min((1, 3, 2)[len(patients) % 3], n - start)
      patients.append(np.arange(start, start + length))
      start += length
    per_site.append(patients)
  p = max(len(x) for x in per_site)
  groups = np.zeros((len(sizes), p, 3), np.int32)
  group_mask = np.zeros((len(sizes), p, 3), bool)
  for k, patients in enumerate(per_site):
    for j, positions in enumerate(patients):
      groups[k, j, :len(positions)] = positions
      group_mask[k, j, :len(positions)] = True
  assert groups.max() < m
  return base._replace(groups=groups, group_mask=group_mask,
                       num_groups=np.array([len(x) for x in per_site],
                                           np.int32))


def site_config(data, batch=4, sigma=1.0):
  n = np.asarray(data.num_groups, np.float32)
  return fed.SiteConfig(jnp.asarray(np.minimum(1.0, batch / n)),
                        jnp.full(n.shape, sigma, jnp.float32))


def trainer(backend="loop", dp=True, steps=3, **kwargs):
  client = kwargs.pop("client", fed.ClientConfig(
      local_steps=steps, expected_batch_size=4, max_batch_size=12,
      learning_rate=0.05))
  local_dp = kwargs.pop("local_dp", fed.LocalDPConfig(enabled=dp,
                                                     l2_clip_norm=1.0))
  server = kwargs.pop("server", fed.ServerConfig())
  return fed.FederatedTrainer(loss_fn, client, local_dp, server,
                              backend=backend, **kwargs)


def run(tr, data, cfg, rounds=3, participating=None, seed=0):
  num_sites = data.num_examples.shape[0]
  if participating is None:
    participating = np.ones(num_sites, bool)
  server_state, site_states = tr.init(init_params(), num_sites)
  outputs = []
  for r in range(rounds):
    server_state, site_states, out = tr.run_round(
        server_state, site_states, data, cfg, participating, r,
        jax.random.key(seed))
    outputs.append(out)
  return server_state, site_states, outputs


REPO = pathlib.Path(__file__).resolve().parents[2]


def run_on_8_cpu_devices(code: str) -> subprocess.CompletedProcess:
  """Runs `code` in a fresh Python with 8 forced CPU devices (the device
  count must be set before jax starts, so not in this process)."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, check=False)


def member_rounds_match_alone(shard=False, num_members=3, rounds=2):
  """Runs `num_members` members (different sigma, clip norm, learning
  rates, seeds) alone through `run_round` and together through
  `run_member_rounds`; asserts equal parameters and metrics."""
  import chex  # pylint: disable=g-import-not-at-top
  data = site_data()
  part = np.array([True, True, False, True])
  base = site_config(data)
  configs = [base._replace(
      noise_multiplier=base.noise_multiplier * (0.5 + m),
      l2_clip_norm=jnp.full_like(base.noise_multiplier, 0.5 + 0.25 * m),
      learning_rate=jnp.full_like(base.noise_multiplier, 0.05 / (1 + m)))
             for m in range(num_members)]
  server_lrs = [jnp.float32(1.0 - 0.2 * m) for m in range(num_members)]
  roots = [jax.random.fold_in(jax.random.key(0), m)
           for m in range(num_members)]
  tr = trainer("vmap")
  alone = []
  for m in range(num_members):
    server_state, site_states = tr.init(init_params(), 4)
    for r in range(rounds):
      server_state, site_states, out = tr.run_round(
          server_state, site_states, data, configs[m], part, r, roots[m],
          server_lrs[m])
    alone.append((server_state, site_states, out))
  stack = lambda trees: jax.tree.map(lambda *x: jnp.stack(x), *trees)
  server_state, site_states = tr.init(init_params(), 4)
  servers = stack([server_state] * num_members)
  sites = stack([site_states] * num_members)
  for r in range(rounds):
    servers, sites, out = tr.run_member_rounds(
        servers, sites, data, stack(configs), np.stack([part] * num_members),
        r, jnp.stack(roots), jnp.stack(server_lrs), shard=shard)
  for m in range(num_members):
    take = lambda tree: jax.tree.map(lambda x: x[m], tree)
    chex.assert_trees_all_close(take(servers).params, alone[m][0].params,
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(take(out), alone[m][2], rtol=1e-5, atol=1e-5)
  # Members differ (no shared key, different settings).
  assert not np.allclose(alone[0][0].params["w"], alone[1][0].params["w"])

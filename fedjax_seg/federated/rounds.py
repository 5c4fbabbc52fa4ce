"""One federated round over all sites, with interchangeable backends.

The backend is a performance-only choice; every backend computes the same
round (up to float summation order):

* "vmap": all sites in one batched program (`jax.vmap` of the client update).
* "map": `lax.map` over sites inside one jitted program (low memory).
* "shard": sites split over devices with `jax.shard_map` on a 1-D mesh
  ("sites" axis), vmap inside each device; the site axis is padded with
  non-participating dummy sites to a multiple of the device count.
* "loop": a Python loop over one jitted single-site update (the reference;
  measured fastest on CPU, where batched per-site weights become slow grouped
  convolutions). Sites that do not take part are skipped.
* "auto": "loop" on CPU, "shard" on several accelerators, else "vmap";
  "shard" whenever the run spans several processes (hosts).

Over several processes (`jax.distributed`), "shard" splits the sites over
the global mesh of all hosts' devices; every process passes the same host
inputs and gets every site's results back (`host_values`), so each holds
the same state after a round.

Non-participating sites never change the result: their deltas get weight 0
and their state is kept as it was.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg.federated import client as client_lib
from fedjax_seg.federated import server as server_lib

BACKENDS = ("auto", "vmap", "map", "shard", "loop")


class RoundOutput(NamedTuple):
  """Per-site client metrics ([S] leaves; zeros for sites that did not run)
  and the server's site-level DP values."""

  client: client_lib.ClientMetrics
  server: server_lib.ServerMetrics


def resolve_backend(backend: str) -> str:
  """The concrete backend for "auto" on this platform."""
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
  if jax.process_count() > 1:
    if backend not in ("auto", "shard"):
      raise ValueError(
          f"backend {backend!r}: a run over {jax.process_count()} processes "
          "splits its sites over all hosts' devices; use shard (or auto).")
    return "shard"
  if backend != "auto":
    return backend
  if jax.default_backend() == "cpu":
    return "loop"
  return "shard" if jax.device_count() > 1 else "vmap"


def host_values(tree):
  """Every array leaf as a host value that every process holds in full:
  arrays split over several hosts are gathered, replicated ones read from a
  local copy; PRNG keys and non-array leaves are left as they are.

  Collective when a leaf is split over hosts: every process must call it
  with the same tree.
  """
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def leaf(x):
    if not isinstance(x, jax.Array) or jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key):
      return x
    if x.is_fully_addressable:
      return np.asarray(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(leaf, tree)


def _select(mask, new, old):
  """Per-site where: leaves [S, ...], mask [S]."""
  def pick(n, o):
    m = mask.reshape(mask.shape + (1,) * (n.ndim - 1))
    return jnp.where(m, n, o)
  return jax.tree.map(pick, new, old)


class FederatedTrainer:
  """Runs rounds of federated training with local DP-SGD.

  Args:
    task: what to train (`task.Task`), or a bare per-example loss
      `(params, example) -> scalar`.
    client: local training settings.
    local_dp: record-level DP settings.
    server: server optimizer settings.
    site_dp: optional site-level DP (DP-FedAvg).
    norm_mask: optional FedBN mask (pytree of bools like params).
    trainable_mask: optional pytree of bools like params: only True leaves
      are trained (the others get no gradient, so per-unit clipping and the
      clip norm's budget cover only the trained ones, and no update).
    backend: one of BACKENDS (performance only).
  """

  def __init__(self, task, client: client_lib.ClientConfig,
               local_dp: client_lib.LocalDPConfig,
               server: server_lib.ServerConfig,
               site_dp: server_lib.SiteLevelDPConfig | None = None,
               norm_mask=None, backend: str = "auto", trainable_mask=None):
    self.client_config = client
    self.local_dp = local_dp
    self.server_config = server
    self.site_dp = site_dp
    self.norm_mask = norm_mask
    self.backend = resolve_backend(backend)
    self.trainable_mask = trainable_mask
    self._client_update = client_lib.make_client_update(
        task, client, local_dp, norm_mask, trainable_mask)
    self._jit_client = jax.jit(self._client_update)
    self._jit_finish = jax.jit(self._finish)
    self._placeholders = {}
    self._jit_round = jax.jit(self._round, static_argnames=("backend",))
    self._jit_members = {}
    self._mesh = None
    if self.backend == "shard":
      # Auto axis: XLA moves the (replicated) inputs into the site layout.
      self._mesh = jax.make_mesh(
          (jax.device_count(),), ("sites",),
          axis_types=(jax.sharding.AxisType.Auto,))

  # -- state ------------------------------------------------------------------

  def init(self, params, num_sites: int):
    """(ServerState, site states stacked over [S]) before the first round."""
    server_state = server_lib.init_server_state(params, self.server_config,
                                                self.site_dp)
    one = client_lib.init_site_state(params, self.local_dp, self.norm_mask)
    sites = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_sites,)
                                                    + jnp.shape(x)), one)
    return server_state, sites

  # -- the round --------------------------------------------------------------

  def _server(self, server_state, deltas, participating, num_examples,
              round_index, root_key, server_learning_rate):
    return server_lib.server_update(
        server_state, deltas, participating, num_examples, self.server_config,
        self.site_dp, round_index, root_key, server_learning_rate)

  def _all_sites(self, params, site_states, data, site_config, round_index,
                 root_key, backend=None, site_ids=None):
    backend = backend or self.backend
    num_sites = data.num_examples.shape[0]
    if site_ids is None:
      site_ids = jnp.arange(num_sites, dtype=jnp.int32)
    per_site = lambda st, d, c, k: self._client_update(
        params, st, d, c, round_index, k, root_key)
    if backend == "vmap":
      return jax.vmap(per_site)(site_states, data, site_config, site_ids)
    if backend == "map":
      return jax.lax.map(lambda xs: per_site(*xs),
                         (site_states, data, site_config, site_ids))
    # shard: each device vmaps over its block of sites.
    spec = jax.sharding.PartitionSpec("sites")
    rep = jax.sharding.PartitionSpec()
    block = jax.shard_map(
        lambda p, st, d, c, k, r, rk: jax.vmap(
            lambda st1, d1, c1, k1: self._client_update(p, st1, d1, c1, r, k1,
                                                        rk))(st, d, c, k),
        mesh=self._mesh, in_specs=(rep, spec, spec, spec, spec, rep, rep),
        out_specs=spec, check_vma=False)
    return block(params, site_states, data, site_config, site_ids, round_index,
                 root_key)

  def _round(self, server_state, site_states, data, site_config,
             participating, round_index, root_key, server_learning_rate=None,
             backend=None, site_ids=None):
    out = self._all_sites(server_state.params, site_states, data, site_config,
                          round_index, root_key, backend, site_ids)
    new_sites = _select(participating, out.site_state, site_states)
    metrics = _select(participating, out.metrics,
                      jax.tree.map(jnp.zeros_like, out.metrics))
    server_state, server_metrics = self._server(
        server_state, out.delta, participating, data.num_examples,
        round_index, root_key, server_learning_rate)
    return server_state, new_sites, RoundOutput(metrics, server_metrics)

  def run_round(self, server_state, site_states, data: client_lib.SiteData,
                site_config: client_lib.SiteConfig, participating,
                round_index: int, root_key, server_learning_rate=None,
                site_ids=None):
    """One round. `participating` is [S] bool (host or device array).

    Returns (server_state, site_states, RoundOutput). The round index is
    passed as an int32 array, so rounds never recompile.
    `server_learning_rate` ([] array) overrides the server config's.
    `site_ids` ([S] int, default 0..S-1) are the sites' ids in the
    consortium, from which their keys derive: a round over a cohort of a
    larger consortium passes the cohort's ids, so that a site's keys are its
    own whichever cohort it is in.
    """
    participating = jnp.asarray(participating, bool)
    r = jnp.int32(round_index)
    num_sites = participating.shape[0]
    site_ids = (np.arange(num_sites) if site_ids is None
                else np.asarray(site_ids))
    if site_ids.shape != (num_sites,) or len(set(site_ids.tolist())) != \
        num_sites:
      raise ValueError(f"site_ids must be {num_sites} distinct ids, got "
                       f"{site_ids.tolist()}.")
    site_ids = site_ids.astype(np.int32)
    if self.backend == "loop":
      return self._loop_round(server_state, site_states, data, site_config,
                              participating, r, root_key,
                              server_learning_rate, site_ids)
    multi = jax.process_count() > 1
    if multi:  # Host values in: jit treats them as the same on every host.
      server_state, site_states, data, site_config = host_values(
          (server_state, site_states, data, site_config))
    pad = 0
    if self.backend == "shard":
      pad = (-num_sites) % jax.device_count()
    if pad:
      grow = lambda x: jnp.concatenate(
          [x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
      site_states, data, site_config = jax.tree.map(
          grow, (site_states, data, site_config))
      participating = jnp.concatenate([participating,
                                       jnp.zeros((pad,), bool)])
      # Padding sites do not take part; their ids only need to be distinct.
      site_ids = np.concatenate([site_ids, site_ids.max() + 1
                                 + np.arange(pad, dtype=np.int32)])
    server_state, site_states, output = self._jit_round(
        server_state, site_states, data, site_config, participating, r,
        root_key, server_learning_rate, site_ids=jnp.asarray(site_ids))
    if multi:  # Every site's results on every host.
      server_state, site_states, output = host_values(
          (server_state, site_states, output))
    if pad:
      site_states, client_metrics = jax.tree.map(
          lambda x: x[:num_sites], (site_states, output.client))
      output = RoundOutput(client_metrics, output.server)
    return server_state, site_states, output

  def _loop_round(self, server_state, site_states, data, site_config,
                  participating, r, root_key, server_learning_rate,
                  site_ids):
    num_sites = participating.shape[0]
    take = lambda tree, k: jax.tree.map(lambda x: x[k], tree)
    host_part = np.asarray(participating)
    placeholder = None
    outputs = []
    for k in range(num_sites):
      if host_part[k]:
        outputs.append(self._jit_client(
            server_state.params, take(site_states, k), take(data, k),
            take(site_config, k), r, jnp.int32(site_ids[k]), root_key))
        continue
      if placeholder is None:
        placeholder = self._placeholder(server_state.params, site_states,
                                        data, site_config, r, root_key)
      outputs.append(placeholder)
    return self._jit_finish(server_state, site_states, tuple(outputs),
                            participating, data.num_examples, r, root_key,
                            server_learning_rate)

  def _placeholder(self, params, site_states, data, site_config, r, root_key):
    """A zero `ClientOutput` for sites that sit a round out (loop backend),
    made once per shape: its delta and metrics are selected away."""
    inputs = (params, site_states, data, site_config)
    key = str(jax.tree.map(lambda x: (jnp.shape(x), str(jnp.result_type(x))),
                           inputs))
    if key not in self._placeholders:
      take = lambda tree: jax.tree.map(lambda x: x[0], tree)
      shapes = jax.eval_shape(self._client_update, params, take(site_states),
                              take(data), take(site_config), r, jnp.int32(0),
                              root_key)
      self._placeholders[key] = jax.tree.map(
          lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return self._placeholders[key]

  def _finish(self, server_state, site_states, outputs, participating,
              num_examples, round_index, root_key, server_learning_rate):
    """The loop backend's round end as one program: stack the S sites'
    outputs, keep the states of sites that did not run, serve."""
    out = jax.tree.map(lambda *x: jnp.stack(x), *outputs)
    new_sites = _select(participating, out.site_state, site_states)
    metrics = _select(participating, out.metrics,
                      jax.tree.map(jnp.zeros_like, out.metrics))
    server_state, server_metrics = self._server(
        server_state, out.delta, participating, num_examples, round_index,
        root_key, server_learning_rate)
    return server_state, new_sites, RoundOutput(metrics, server_metrics)

  def run_member_rounds(self, server_states, site_states,
                        data: client_lib.SiteData,
                        site_configs: client_lib.SiteConfig, participating,
                        round_index: int, root_keys,
                        server_learning_rates=None, shard: bool = False):
    """One round of M sweep members in one program (`jax.vmap` over a
    leading member axis of every argument but `data` and `round_index`).

    The members share the data and every static setting of this trainer;
    they differ in what is an array: noise multipliers, clip norms, learning
    rates (`site_configs`, [M, S] leaves), server learning rates ([M]), root
    keys ([M]) and states. The sites run batched inside ("vmap"), or with
    `lax.map` when this trainer's backend is "map".

    With `shard`, the member axis is split over all devices (`jax.shard_map`
    on a 1-D "members" mesh; each device vmaps over its block of members and
    holds a copy of the data). The member axis is padded to a multiple of
    the device count with copies of member 0, computed and dropped: members
    never exchange values, so the result is that of the unsharded program.
    """
    backend = "map" if self.backend == "map" else "vmap"
    num_members = jax.tree.leaves(root_keys)[0].shape[0]
    pad = (-num_members) % jax.device_count() if shard else 0
    args = (server_states, site_states, site_configs,
            jnp.asarray(participating, bool), root_keys,
            server_learning_rates)
    if pad:
      grow = lambda x: jnp.concatenate(
          [x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
      args = jax.tree.map(grow, args)
    if (backend, shard) not in self._jit_members:
      round_fn = lambda ss, st, d, c, p, r, k, lr: self._round(
          ss, st, d, c, p, r, k, lr, backend)
      members_fn = jax.vmap(round_fn, in_axes=(0, 0, None, 0, 0, None, 0, 0))
      if shard:
        mesh = jax.make_mesh((jax.device_count(),), ("members",),
                             axis_types=(jax.sharding.AxisType.Auto,))
        spec = jax.sharding.PartitionSpec("members")
        rep = jax.sharding.PartitionSpec()
        members_fn = jax.shard_map(
            members_fn, mesh=mesh,
            in_specs=(spec, spec, rep, spec, spec, rep, spec, spec),
            out_specs=spec, check_vma=False)
      self._jit_members[(backend, shard)] = jax.jit(members_fn)
    ss, st, c, p, k, lr = args
    out = self._jit_members[(backend, shard)](
        ss, st, data, c, p, jnp.int32(round_index), k, lr)
    if pad:
      out = jax.tree.map(lambda x: x[:num_members], out)
    return out

  def compilations(self) -> int:
    """How many programs the jitted round has compiled (for recompile tests)."""
    if self.backend == "loop":
      return self._jit_client._cache_size() + self._jit_finish._cache_size()
    return self._jit_round._cache_size()

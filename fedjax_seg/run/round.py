"""One round: who takes part, the device round, and what it charges.

`participants` draws the round's sites (from the noise root and the round
alone, independently of the data); `device_round` runs the round on the
device for one run or for several sweep members sharing one compiled
program (the one entry point: all sites in memory, a --num_sites cohort, or
members vmapped or sharded together); `record` checks that the device
applied exactly the planned noise and charges the ledgers
(`privacy.plan.NoisePlan.charge`).
"""

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_seg import federated as fed
from fedjax_seg.run import setup as setup_lib
from fedjax_seg.run import state as state_lib


def participants(run: setup_lib.Run, round_index: int) -> np.ndarray:
  """[S] bool: the sites that train this round (training sites in the
  federation this round, sampled as the settings say)."""
  config, noise = run.config, run.plan.noise
  p, f = config.privacy, config.federated
  root = run.root
  num_sites = len(noise.site_names)
  # Training sites, and with a scenario those in the federation this round.
  eligible = noise.training_sites if noise.active is None else (
      noise.active[round_index] & noise.training_sites)
  if noise.site_mechanism is not None:
    # Correlated noise at the server: the round's cyclic group of sites,
    # Poisson-sampled at the group's rate.
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=noise.site_group_rate,
                                   dropout_rate=f.dropout_rate)
    cycle = int(noise.site_mechanism.cycles[0])
    part &= fed.server_groups(root, num_sites, cycle) == round_index % cycle
  elif p.use_site_level:
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=p.site_sampling_rate,
                                   dropout_rate=f.dropout_rate)
  elif f.sites_per_round and noise.active is not None:
    # A scenario: the cohort is drawn among the sites in the federation
    # this round (from the noise root and round alone).
    members = np.flatnonzero(eligible)
    chosen = fed.sample_participants(
        root, round_index, len(members),
        num_per_round=min(f.sites_per_round, len(members)),
        dropout_rate=f.dropout_rate)
    part = np.zeros(num_sites, bool)
    part[members[chosen]] = True
  elif f.sites_per_round:
    part = fed.sample_participants(
        root, round_index, num_sites,
        num_per_round=min(f.sites_per_round, num_sites),
        dropout_rate=f.dropout_rate)
  elif f.dropout_rate:
    part = fed.sample_participants(root, round_index, num_sites,
                                   sampling_rate=1.0,
                                   dropout_rate=f.dropout_rate)
  else:
    part = np.ones(num_sites, bool)
  return part & eligible


def round_arrays(config, noise, round_index: int):
  """(SiteConfig, server learning rate) of a round: every per-round value the
  device program reads as an array, so that runs that differ only in these
  (sweep members) share one compiled program."""
  f, p = config.federated, config.privacy
  num_sites = len(noise.site_names)
  full = lambda v: jnp.full((num_sites,), v, jnp.float32)  # noqa: E731
  site_config = fed.SiteConfig(
      jnp.asarray(noise.sampling_rates, jnp.float32),
      jnp.asarray(noise.applied_sigma[round_index], jnp.float32),
      l2_clip_norm=full(p.l2_clip_norm), learning_rate=full(f.learning_rate),
      cycle=(None if noise.mechanism is None else jnp.asarray(
          noise.mechanism.cycles, jnp.int32)),
      noise_params=(None if noise.mechanism is None else jnp.asarray(
          noise.mechanism.stream_params())),
      expected_batch_size=_expected_batch_sizes(noise))
  return site_config, jnp.float32(f.server_learning_rate)


def _expected_batch_sizes(noise):
  """[S] per-site divisors of the noised sum, or None for --batch_size."""
  sizes = (None if noise.mechanism is None
           else noise.mechanism.expected_batch_sizes(noise.units))
  return None if sizes is None else jnp.asarray(sizes, jnp.float32)


def _stack(trees):
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


def device_round(runs: Sequence[setup_lib.Run],
                 states: Sequence[state_lib.RunState], round_index: int,
                 parts: Sequence[np.ndarray], shard_members: bool = False
                 ) -> list[tuple[state_lib.RunState, fed.RoundOutput, float]]:
  """Round `round_index` of each run on the device: [(new state, output as
  numpy, device seconds)].

  One run: its sites (all in memory, or a --num_sites cohort, of which only
  the cohort's data go to the device; the output is then as the all-sites
  round's, zeros for sites not in the cohort). Several runs (sweep members
  with one trainer and the same data): one program, `jax.vmap` over a
  leading member axis (`shard_members`: split over the devices); each
  member is charged the whole program's time.
  """
  arrays = [round_arrays(r.config, r.plan.noise, round_index) for r in runs]
  if len(runs) == 1:
    run, state, part = runs[0], states[0], parts[0]
    if run.data.cohorts is not None:
      return [_cohort_round(run, state, round_index, part, *arrays[0])]
    t0 = time.perf_counter()
    server_state, site_states, out = run.trainer.run_round(
        state.server_state, state.site_states,
        run.data.training_at(round_index), arrays[0][0], part, round_index,
        run.root, arrays[0][1])
    jax.block_until_ready(server_state.params)
    seconds = time.perf_counter() - t0
    return [(dataclasses.replace(state, server_state=server_state,
                                 site_states=site_states),
             jax.tree.map(np.asarray, out), seconds)]
  trainer = runs[0].trainer
  t0 = time.perf_counter()
  server, sites, out = trainer.run_member_rounds(
      _stack([s.server_state for s in states]),
      _stack([s.site_states for s in states]),
      runs[0].data.training_at(round_index), _stack([a[0] for a in arrays]),
      np.stack(parts), round_index, jnp.stack([r.root for r in runs]),
      jnp.stack([a[1] for a in arrays]), shard=shard_members)
  jax.block_until_ready(server.params)
  seconds = time.perf_counter() - t0
  out = jax.tree.map(np.asarray, out)
  take = lambda tree, m: jax.tree.map(lambda x: x[m], tree)  # noqa: E731
  return [(dataclasses.replace(state, server_state=take(server, m),
                               site_states=take(sites, m)),
           take(out, m), seconds) for m, state in enumerate(states)]


def _cohort_round(run, state, round_index, part, site_config, server_lr):
  cohort = np.flatnonzero(part)
  # Rendering the cohort is host work (the row's host_seconds).
  data, states, configs, participating, ids = run.data.cohorts.round_inputs(
      cohort, state.site_states, site_config)
  t0 = time.perf_counter()
  server_state, new_states, out = run.trainer.run_round(
      state.server_state, states, data, configs, participating, round_index,
      run.root, server_lr, site_ids=ids)
  jax.block_until_ready(server_state.params)
  seconds = time.perf_counter() - t0
  site_states, client = run.data.cohorts.scatter(
      state.site_states, new_states, cohort, out.client, len(part))
  state = dataclasses.replace(state, server_state=server_state,
                              site_states=site_states)
  return state, fed.RoundOutput(client, jax.tree.map(np.asarray,
                                                     out.server)), seconds


def record(run: setup_lib.Run, state: state_lib.RunState, round_index: int,
           part: np.ndarray, out: fed.RoundOutput) -> None:
  """Charges the round in the ledgers, after checking that the device
  applied exactly the planned noise."""
  noise = run.plan.noise
  m = out.client
  noise.check_applied(round_index, part, noise_multiplier=m.noise_multiplier,
                      steps=m.steps, sampling_rate=m.sampling_rate,
                      server_noise_multiplier=out.server.noise_multiplier)
  stream = state.server_state.noise
  if noise.site_mechanism is not None and int(stream.count) != (
      round_index + 1):
    # The server's stream must be at this round's release: one per round.
    raise AssertionError(f"server: noise stream at release {int(stream.count)}"
                         f" after round {round_index + 1}")
  for k in noise.charge(state.ledger, state.site_ledger, round_index, part):
    state.charged_rounds[noise.site_names[k]].append(round_index)

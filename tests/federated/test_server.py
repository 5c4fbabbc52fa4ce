"""Tests for fedjax_seg.federated.server: absent sites never reach the model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import federated as fed
from fedjax_seg.federated import server as server_lib
from tests.federated import toy

PART = np.array([True, True, False, True])


def _poisoned(data, site):
  """`data` with every real example of `site` NaN (its delta is NaN)."""
  x = np.array(data.examples["x"])
  x[site] = np.nan
  return data._replace(examples={"x": x, "y": data.examples["y"]})


@pytest.mark.parametrize("site_dp", [None, fed.SiteLevelDPConfig(
    l2_clip_norm=0.5, noise_multiplier=1.0, expected_sites=3.0)])
def test_server_update_ignores_non_finite_delta_of_absent_site(site_dp):
  params = toy.init_params()
  config = fed.ServerConfig()
  state = server_lib.init_server_state(params, config, site_dp)
  deltas = jax.tree.map(lambda p: jnp.stack([jnp.full_like(p, 0.1)] * 4),
                        params)
  bad = jax.tree.map(lambda d: d.at[2].set(jnp.nan), deltas)
  worse = jax.tree.map(lambda d: d.at[2].set(jnp.inf), deltas)
  part = jnp.asarray(PART)
  sizes = jnp.array([12, 8, 5, 10])
  ref, _ = server_lib.server_update(state, deltas, part, sizes, config,
                                    site_dp, 0, jax.random.key(0))
  for poisoned in (bad, worse):
    got, _ = server_lib.server_update(state, poisoned, part, sizes, config,
                                      site_dp, 0, jax.random.key(0))
    chex.assert_tree_all_finite(got.params)
    chex.assert_trees_all_close(got.params, ref.params, rtol=1e-6)


@pytest.mark.parametrize("backend", ["loop", "vmap", "map"])
def test_absent_site_with_nan_delta_changes_nothing(backend):
  data = toy.site_data()
  cfg = toy.site_config(data)
  tr = toy.trainer(backend, dp=False, steps=1)
  ref = toy.run(tr, data, cfg, rounds=1, participating=PART)
  got = toy.run(tr, _poisoned(data, 2), cfg, rounds=1, participating=PART)
  chex.assert_tree_all_finite(got[0].params)
  chex.assert_trees_all_close(got[0].params, ref[0].params, rtol=1e-6)


@pytest.mark.slow
def test_absent_site_with_nan_delta_on_8_sharded_cpu_devices():
  code = """
import numpy as np, jax, chex
from tests.federated import toy
from tests.federated.test_server import PART, _poisoned
assert jax.device_count() == 8
data = toy.site_data()
cfg = toy.site_config(data)
tr = toy.trainer("shard", dp=False, steps=1)
ref = toy.run(tr, data, cfg, rounds=1, participating=PART)
got = toy.run(tr, _poisoned(data, 2), cfg, rounds=1, participating=PART)
chex.assert_tree_all_finite(got[0].params)
chex.assert_trees_all_close(got[0].params, ref[0].params, rtol=1e-6)
print("shard ok")
"""
  result = toy.run_on_8_cpu_devices(code)
  assert result.returncode == 0 and "shard ok" in result.stdout, (
      result.stderr[-3000:])

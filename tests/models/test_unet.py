"""Tests for fedjax_seg.models.unet."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg import models
from fedjax_seg.models import unet

TINY = models.SegmentationModel(models.preset("tiny"))
# XLA's CPU convolutions compile slowly: most tests use a 2-level net.
SMALLEST = models.SegmentationModel(models.UNetConfig(widths=(4, 8)))


@pytest.mark.parametrize("name,low,high", [("tiny", 0.08e6, 0.15e6),
                                           ("small", 0.8e6, 1.3e6),
                                           ("base", 6e6, 10e6)])
def test_preset_param_counts(name, low, high):
  model = models.SegmentationModel(models.preset(name))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             (1, 32, 32, 1)))
  assert low <= models.count_params(shapes) <= high


@pytest.mark.slow
def test_shapes_2d_and_3d():
  params = TINY.init(jax.random.key(0), (1, 8, 8, 1))
  chex.assert_shape(jax.jit(TINY.apply)(params, jnp.ones((3, 8, 8, 1))),
                    (3, 8, 8, 3))
  model3d = models.SegmentationModel(models.preset(
      "tiny", spatial_dims=3, widths=(4, 8), in_channels=2, num_classes=4,
      residual=True, norm="instance"))
  p3 = model3d.init(jax.random.key(0), (1, 2, 4, 4, 2))
  out = jax.jit(model3d.apply)(p3, jnp.ones((2, 2, 4, 4, 2)))
  chex.assert_shape(out, (2, 2, 4, 4, 4))
  chex.assert_tree_all_finite(out)


@pytest.mark.slow
def test_init_is_deterministic_in_the_key():
  a = TINY.init(jax.random.key(1), (1, 32, 32, 1))
  b = TINY.init(jax.random.key(1), (1, 32, 32, 1))
  c = TINY.init(jax.random.key(2), (1, 32, 32, 1))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a["head"]["kernel"], c["head"]["kernel"])


@pytest.mark.slow
def test_vmap_over_stacked_site_params_equals_per_site_apply():
  sites = 3
  params = jax.tree.map(lambda *p: jnp.stack(p), *[
      SMALLEST.init(k, (1, 8, 8, 1))
      for k in jax.random.split(jax.random.key(0), sites)])
  x = jax.random.normal(jax.random.key(1), (sites, 2, 8, 8, 1))
  batched = jax.jit(jax.vmap(SMALLEST.apply))(params, x)
  apply = jax.jit(SMALLEST.apply)
  for s in range(sites):
    single = apply(jax.tree.map(lambda p: p[s], params), x[s])
    np.testing.assert_allclose(batched[s], single, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_grad_through_pure_apply():
  params = SMALLEST.init(jax.random.key(0), (1, 8, 8, 1))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(SMALLEST.apply(
      p, jnp.ones((1, 8, 8, 1))) ** 2)))(params)
  chex.assert_trees_all_equal_shapes(grads, params)


@pytest.mark.slow
def test_norm_params_are_identifiable():
  params = TINY.init(jax.random.key(0), (1, 16, 16, 1))
  mask = models.norm_param_mask(params)
  flat = jax.tree_util.tree_leaves_with_path(mask)
  norm_paths = [jax.tree_util.keystr(p) for p, m in flat if m]
  assert norm_paths and all("norm" in p for p in norm_paths)
  assert not mask["head"]["kernel"]
  assert sum(jax.tree.leaves(mask)) == 4 * (2 * 3 - 1)  # 2 norms x 2 per block.


@pytest.mark.slow
def test_dropout_needs_a_key_and_is_off_without_one():
  model = models.SegmentationModel(models.UNetConfig(widths=(4, 8),
                                                     dropout=0.5))
  params = model.init(jax.random.key(0), (1, 8, 8, 1))
  x = jnp.ones((1, 8, 8, 1))
  apply = jax.jit(model.apply)
  np.testing.assert_array_equal(apply(params, x), apply(params, x))
  assert not np.allclose(apply(params, x, jax.random.key(1)),
                         apply(params, x, jax.random.key(2)))


def test_bad_configs_and_inputs_are_refused():
  with pytest.raises(ValueError, match="BatchNorm"):
    models.UNetConfig(norm="batch")
  with pytest.raises(ValueError, match="preset"):
    models.preset("huge")
  with pytest.raises(ValueError, match="multiple of 4"):
    TINY.init(jax.random.key(0), (1, 30, 30, 1))
  with pytest.raises(ValueError, match="channels"):
    TINY.init(jax.random.key(0), (1, 32, 32, 2))
  assert unet.is_norm_param(("down", 0, "norm1", "scale"))


@pytest.mark.slow
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_upsampling_and_pooling_equal_flax_layers(spatial_dims):
  """The matmul upsampling and reshape pooling compute what
  nnx.ConvTranspose / nnx.max_pool compute (values and gradients)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  d = spatial_dims
  upconv = nnx.ConvTranspose(6, 4, (2,) * d, strides=(2,) * d,
                             rngs=nnx.Rngs(3))
  upconv.bias[...] = jax.random.normal(jax.random.key(5), (4,))
  x = jax.random.normal(jax.random.key(0), (3,) + (4,) * d + (6,))
  chex.assert_trees_all_close(unet._upsample2(upconv, x, jnp.float32),
                              upconv(x), atol=1e-5)
  graph, state = nnx.split(upconv)
  def loss(state, x, ours):
    layer = nnx.merge(graph, state)
    y = unet._upsample2(layer, x, jnp.float32) if ours else layer(x)
    return jnp.sum(jnp.sin(y))
  chex.assert_trees_all_close(
      jax.grad(loss, argnums=(0, 1))(state, x, True),
      jax.grad(loss, argnums=(0, 1))(state, x, False), atol=1e-4)
  window = (2,) * d
  pool = lambda x: nnx.max_pool(x, window, strides=window)
  np.testing.assert_array_equal(unet._max_pool2(x), pool(x))
  pool_loss = lambda f: jax.grad(lambda x: jnp.sum(jnp.sin(f(x))))(x)
  chex.assert_trees_all_close(pool_loss(unet._max_pool2), pool_loss(pool),
                              atol=1e-6)

"""Tests for fedjax_seg.models.independence."""

from flax import nnx
import jax
import jax.numpy as jnp
import pytest

from fedjax_seg import models


@pytest.mark.slow
def test_our_unets_are_per_example():
  for cfg in (models.preset("tiny"),
              models.preset("tiny", norm="instance", residual=True)):
    model = models.SegmentationModel(cfg)
    params = model.init(jax.random.key(0), (1, 8, 8, 1))
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    models.check_per_example_independence(jax.jit(model.apply), params, x)


class _BatchNormNet(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, use_running_average=False, rngs=rngs)

  def __call__(self, x):
    return self.bn(self.conv(x))


def test_a_batchnorm_model_fails():
  module = _BatchNormNet(nnx.Rngs(0))
  graphdef, state = nnx.split(module)

  def apply(state, x):
    return nnx.merge(graphdef, state)(x)

  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 1))
  with pytest.raises(models.NotPerExampleError, match="BatchNorm"):
    models.check_per_example_independence(apply, state, x)


def test_needs_two_examples():
  with pytest.raises(ValueError):
    models.check_per_example_independence(lambda p, x: x, None,
                                          jnp.ones((1, 2)))

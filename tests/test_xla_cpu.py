"""Tests for fedjax_seg.xla_cpu: the convolution rewrite keeps values."""

import chex
import jax
import jax.numpy as jnp

from fedjax_seg import xla_cpu


def test_canonicalize_convs_keeps_values_and_removes_other_layouts():
  key = jax.random.key(0)
  x = jax.random.normal(key, (3, 2, 9, 8))  # NCHW
  w = jax.random.normal(jax.random.fold_in(key, 1), (4, 2, 3, 3))  # OIHW

  def loss(w, x):
    y = jax.lax.conv_general_dilated(
        x, w, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2),
        dimension_numbers=("NCHW", "OIHW", "NCHW"))
    z = jax.lax.conv_general_dilated(
        jnp.tanh(y), jnp.ones((2, 2, 2, 2)), (1, 1), "SAME",
        dimension_numbers=("NCHW", "OIHW", "NHWC"), feature_group_count=2)
    return jnp.sum(z ** 2)

  def per_example(w, x):
    return jax.vmap(jax.value_and_grad(
        lambda w, xi: loss(w, xi[None]), argnums=(0, 1)), (None, 0))(w, x)

  fast = xla_cpu.canonicalize_convs(jax.jit(per_example))
  chex.assert_trees_all_close(jax.jit(fast)(w, x), per_example(w, x),
                              rtol=1e-5, atol=1e-5)
  canon = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
  convs = [e for e in jax.make_jaxpr(fast)(w, x).eqns
           if e.primitive is jax.lax.conv_general_dilated_p]
  assert len(convs) >= 4  # Forward and backward convolutions.
  for eqn in convs:
    dn = eqn.params["dimension_numbers"]
    assert (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
        canon), dn

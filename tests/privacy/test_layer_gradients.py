"""Per-layer per-example gradients equal vmap(value_and_grad) for every layer
type of the U-Nets (2D/3D convolutions, 1x1 head and residual skips, 2x2
upsampling, GroupNorm and InstanceNorm scales and biases)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.segmentation import task as segmentation_task
from fedjax_seg.models import unet
from fedjax_seg.privacy import layer_gradients
from tests import numerics

CASES = {
    "2d_group_two_channels": dict(widths=(4, 8), in_channels=2),
    "2d_instance_residual": dict(widths=(4, 8), norm="instance",
                                 residual=True),
    "3d_group": dict(widths=(2, 4), spatial_dims=3),
}


def _setup(case, n=3):
  config = unet.UNetConfig(**CASES[case])
  model = unet.SegmentationModel(config)
  d = config.spatial_dims
  shape = (n,) + (8,) * d + (config.in_channels,)
  params = model.init(jax.random.key(0), (1,) + shape[1:])
  # Move norm scales/biases off their init (1, 0) so their gradients are
  # not special.
  params = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.3 * jax.random.normal(
          jax.random.key(hash(str(p)) % 2**31), v.shape), params)
  k1, k2 = jax.random.split(jax.random.key(1))
  batch = {"image": jax.random.normal(k1, shape),
           "label": jax.random.randint(k2, shape[:-1], 0, 3)}
  return model, params, batch


def test_auto_kernel_method_follows_the_channels():
  # Taps where the channels stay or grow, the kernel VJP where they shrink
  # (the U-Net's decoder), as measured per layer on CPU.
  assert layer_gradients.auto_kernel_method(16, 16) == "taps"
  assert layer_gradients.auto_kernel_method(16, 32) == "taps"
  assert layer_gradients.auto_kernel_method(64, 32) == "vjp"
  with pytest.raises(ValueError, match="kernel_method"):
    layer_gradients.layer_grads("conv", None, None, {}, "fastest")


@pytest.mark.slow
@pytest.mark.parametrize("case,kernel_method", [
    ("2d_group_two_channels", "taps"), ("2d_instance_residual", "auto"),
    ("3d_group", "taps")])
def test_equals_vmap_of_value_and_grad(case, kernel_method):
  model, params, batch = _setup(case, n=2)
  loss_fn = segmentation_task.example_loss(model)
  want_losses, want = jax.jit(jax.vmap(jax.value_and_grad(loss_fn),
                                       in_axes=(None, 0)))(params, batch)
  layered = layer_gradients.per_example_value_and_grad(
      lambda p, x, tape: model.apply(p, x, tape=tape),
      segmentation_task.logits_loss(), kernel_method=kernel_method)
  got_losses, got = jax.jit(layered)(params, batch)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got_losses, want_losses, rtol=1e-5, atol=1e-6)
  # Per example, relative to that example's whole gradient (float32 sums in
  # another order; a conv bias before a norm has a gradient of 0 up to the
  # rounding of the others).
  for i in range(2):
    numerics.assert_trees_close(jax.tree.map(lambda x: x[i], got),
                                jax.tree.map(lambda x: x[i], want), 1e-5)


@pytest.mark.slow
def test_each_example_gets_only_its_own_gradient():
  model, params, batch = _setup("2d_group_two_channels", n=2)
  fn = jax.jit(segmentation_task.task(model).per_example_value_and_grad)
  _, both = fn(params, batch)
  _, first = fn(params, jax.tree.map(lambda x: x[:1], batch))
  chex.assert_trees_all_close(jax.tree.map(lambda x: x[:1], both), first,
                              rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_taps_and_vjp_kernel_gradients_agree_in_3d():
  a = jax.random.normal(jax.random.key(0), (2, 4, 4, 4, 3))
  b = jax.random.normal(jax.random.key(1), (2, 4, 4, 4, 5))
  chex.assert_trees_all_close(
      layer_gradients.conv_kernel_grad(a, b, (3, 3, 3)),
      layer_gradients.conv_kernel_grad_vjp(a, b, (3, 3, 3)), atol=1e-4)


def test_normalized_matches_groupnorm_before_its_affine():
  from flax import nnx  # pylint: disable=g-import-not-at-top
  norm = nnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
  x = 3.0 + jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
  chex.assert_trees_all_close(layer_gradients.normalized(norm, x), norm(x),
                              atol=1e-5)


@pytest.mark.slow
def test_unrecorded_parameters_are_refused():
  model, params, batch = _setup("2d_group_two_channels", n=1)
  params = dict(params, extra={"kernel": jnp.zeros((2, 2))})
  fn = layer_gradients.per_example_value_and_grad(
      lambda p, x, tape: model.apply(
          {k: v for k, v in p.items() if k != "extra"}, x, tape=tape),
      segmentation_task.logits_loss())
  with pytest.raises(ValueError, match="extra"):
    fn(params, batch)


def test_ghost_norm_is_the_materialised_norm():
  a = jax.random.normal(jax.random.key(3), (3, 5, 6, 4))
  b = jax.random.normal(jax.random.key(4), (3, 5, 6, 7))
  want = jnp.sum(jnp.square(layer_gradients.conv_kernel_grad(a, b, (3, 3))),
                 axis=(1, 2, 3, 4))
  sq, upper, _ = layer_gradients.conv_ghost_norm_bounds(a, b, (3, 3))
  chex.assert_trees_all_close(sq, want, rtol=1e-4)
  assert np.all(np.asarray(upper) >= np.asarray(want))
  summed = jnp.sum(layer_gradients.conv_kernel_grad(a, b, (3, 3)), axis=0)
  chex.assert_trees_all_close(
      layer_gradients.conv_kernel_grad_sum(a, b, (3, 3)), summed, rtol=1e-4,
      atol=1e-4)
  # The cost model: ghost on small, wide layers, never at full resolution.
  assert layer_gradients.ghost_is_cheaper(16, 96 * 9, 192)
  assert not layer_gradients.ghost_is_cheaper(32 * 32, 16 * 9, 16)


def _one_conv(c_in=64, c_out=128, size=8):
  """A 'model' of one 3x3 convolution through the tape, and a loss linear in
  its output with a zero-mean weight: the near-constant inputs below make
  the ghost norm's sums cancel (found by review)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  conv = nnx.Conv(c_in, c_out, (3, 3), rngs=nnx.Rngs(0))
  graph, state = nnx.split(conv, nnx.Param)
  params = {"conv": nnx.to_pure_dict(state)}

  def apply_with_tape(p, x, tape):
    module = nnx.merge(graph, p["conv"])
    return tape.record(("conv",), "conv", module, x, module(x))

  rng = np.random.default_rng(0)

  def example(level, noise):
    x = level + noise * rng.normal(size=(size, size, c_in))
    w = np.zeros((size, size, c_out))
    inner = rng.normal(size=(size - 2, size - 2, c_out))
    w[1:-1, 1:-1] = inner - inner.mean(axis=(0, 1))
    return x.astype(np.float32), w.astype(np.float32)

  return params, apply_with_tape, example


def test_ghost_clipping_bounds_a_cancelling_example():
  params, apply_with_tape, example = _one_conv()
  assert layer_gradients.ghost_is_cheaper(64, 64 * 9, 128)
  fn = jax.jit(lambda p, b, pad: layer_gradients.ghost_clipped_grad(
      apply_with_tape, lambda y, ex: jnp.sum(y * ex["w"]),
      trainable_mask={"conv": {"kernel": True, "bias": False}})(
          p, b, pad, l2_clip_norm=1.0))
  for level, noise in [(10.0, 1e-2), (30.0, 1e-3), (100.0, 1e-3),
                       (50.0, 1e-1)]:
    x, w = example(level, noise)
    x0, w0 = example(0.0, 1.0)
    batch = {"image": jnp.asarray(np.stack([x, x0, x0])),
             "w": jnp.asarray(np.stack([w, w0, w0]))}
    # The cancelling example alone: its contribution is at most C.
    alone, stats = fn(params, batch, jnp.array([False, True, True]))
    kernel = np.asarray(alone["conv"]["kernel"], np.float64)
    assert np.isfinite(kernel).all()
    assert np.sqrt(np.sum(kernel ** 2)) <= 1.0 + 1e-5, (level, noise)
    # Among others it does not turn the sum into NaN.
    together, stats = fn(params, batch, jnp.array([False, False, False]))
    assert np.isfinite(np.asarray(together["conv"]["kernel"])).all()
    assert int(stats.num_nonfinite) == 0


def _round_to_tf32(x):
  """x (float32) rounded to nearest with a 10-bit mantissa, as NVIDIA's TF32
  (JAX's default matmul precision on those GPUs) rounds its operands."""
  bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
  bits = (bits + jnp.uint32(1 << 12)) & jnp.uint32(0xFFFFE000)
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _as_on_a_gpu(fn):
  """`fn` evaluated with every DEFAULT-precision contraction's operands
  rounded to TF32 (the jaxpr, interpreted; HIGHEST operands kept)."""
  from jax.extend import core as jex_core  # pylint: disable=g-import-not-at-top
  highest = jax.lax.Precision.HIGHEST

  def run(jaxpr, consts, *args):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jex_core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      invals = [read(v) for v in eqn.invars]
      if eqn.primitive.name in ("jit", "pjit"):
        sub = eqn.params["jaxpr"]
        outs = run(sub.jaxpr, sub.consts, *invals)
      else:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
          precision = eqn.params.get("precision")
          if not isinstance(precision, tuple):
            precision = (precision, precision)
          invals = [x if p == highest or x.dtype != jnp.float32
                    else _round_to_tf32(x)
                    for x, p in zip(invals[:2], precision)] + invals[2:]
        outs = eqn.primitive.bind(*invals, **eqn.params)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  def wrapped(*args):
    closed = jax.make_jaxpr(fn)(*args)
    flat = run(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(jax.eval_shape(fn, *args)),
                              flat)

  return wrapped


@pytest.mark.parametrize("norm_method", ["ghost", "materialize"])
def test_clipping_holds_when_contractions_round_as_on_a_gpu(norm_method):
  # A GPU's default TF32 contractions round operands to a 10-bit mantissa;
  # every contraction that enters a norm or a clipped sum asks for float32,
  # so each example's contribution stays within C (1 + 1e-6) even when the
  # model's own convolutions round.
  params, apply_with_tape, example = _one_conv(c_in=16, c_out=32)
  clipped = layer_gradients.ghost_clipped_grad(
      apply_with_tape, lambda y, ex: jnp.sum(y * ex["w"]),
      norm_method=norm_method,
      trainable_mask={"conv": {"kernel": True, "bias": False}})
  fn = jax.jit(_as_on_a_gpu(lambda p, b, pad, clip: clipped(
      p, b, pad, l2_clip_norm=clip)))
  x0, w0 = example(0.0, 1.0)
  # An output gradient that TF32 rounds up by 4.9e-4 everywhere, clipped
  # by a power of two (so its scaled copy rounds up too): the same direction
  # for every product, nothing averages out. Then the cancelling and random
  # examples.
  up = np.float32(1 + 2.0 ** -11 + 2.0 ** -20)
  cases = [(np.ones_like(x0), np.full_like(w0, up))] + [
      example(level, noise) for level, noise in [(10.0, 1e-2), (1.0, 1.0)]]
  for i, (x, w) in enumerate(cases):
    batch = {"image": jnp.asarray(np.stack([x, x0])),
             "w": jnp.asarray(np.stack([w, w0]))}
    padding = jnp.array([False, True])
    _, stats = fn(params, batch, padding, jnp.float32(np.inf))
    # Clip factor exactly 1/16: C is the norm clipped by, over 16.
    clip = np.float32(stats.per_example_norms[0]) / np.float32(16)
    alone, stats = fn(params, batch, padding, jnp.float32(clip))
    kernel = np.asarray(alone["conv"]["kernel"], np.float64)
    assert np.sqrt(np.sum(kernel ** 2)) <= clip * (1 + 1e-6), i


@pytest.mark.slow
@pytest.mark.parametrize("case,norm_method", [
    ("2d_instance_residual", "ghost"), ("3d_group", "auto"),
    ("2d_group_two_channels", "materialize")])
def test_ghost_clipped_sum_is_clipped_grad(case, norm_method):
  from fedjax_seg import privacy  # pylint: disable=g-import-not-at-top
  model, params, batch = _setup(case, n=4)
  # Example 2 is padding (garbage content), example 3 has a NaN pixel.
  image = batch["image"].at[2].set(1e6).at[3, 0].set(jnp.nan)
  batch = dict(batch, image=image)
  padding = jnp.array([False, False, True, False])
  loss_fn = segmentation_task.example_loss(model)
  _, want_stats = jax.jit(lambda p, b: privacy.clipped_grad(
      loss_fn, l2_clip_norm=0.05)(p, b, padding))(params, batch)
  ghost = layer_gradients.ghost_clipped_grad(
      lambda p, x, tape: model.apply(p, x, tape=tape),
      segmentation_task.logits_loss(), norm_method=norm_method)
  got, stats = jax.jit(lambda p, b: ghost(p, b, padding, l2_clip_norm=0.05))(
      params, batch)
  # The norms clipped by are bounds of the true ones, tight to 2%, and
  # exactly the true ones where no layer took a ghost norm.
  true = np.asarray(want_stats.per_example_norms)
  bound = np.asarray(stats.per_example_norms)
  real = np.isfinite(true) & (true > 0)
  assert np.all(bound[real] >= true[real] * (1 - 1e-5))
  assert np.all(bound[real] <= true[real] * 1.02)
  if norm_method == "materialize":
    np.testing.assert_allclose(bound[real], true[real], rtol=1e-4)
  assert np.isinf(bound[3]) and bound[2] == 0.0
  # The sum is exactly sum_i min(1, C / bound_i) g_i over the kept examples.
  grads = jax.jit(jax.vmap(jax.grad(loss_fn), in_axes=(None, 0)))(params,
                                                                  batch)
  factor = np.where(real, np.minimum(1.0, 0.05 / np.where(real, bound, 1.0)),
                    0.0)
  want = jax.tree.map(lambda g: jnp.einsum(
      "n,n...->...", jnp.asarray(factor, jnp.float32),
      jnp.where(jnp.asarray(real).reshape((-1,) + (1,) * (g.ndim - 1)), g,
                0.0)), grads)
  numerics.assert_trees_close(got, want, 1e-5)
  assert int(stats.num_nonfinite) == int(want_stats.num_nonfinite) == 1
  assert int(stats.num_clipped) == int(want_stats.num_clipped) == 2
  assert int(stats.num_real) == 3

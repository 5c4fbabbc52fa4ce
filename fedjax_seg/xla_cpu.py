"""XLA's CPU backend: keeping its fast convolutions inside loop bodies.

A compile helper, not a privacy concept (performance only: the same values):
the chunked clipping functions of `fedjax_seg.privacy` take it as their
`chunk_transform`, and the federated client applies it to its non-private
steps on CPU. It imports nothing of this project.
"""

import functools
from typing import Any, Callable

import jax
from jax.extend import core as jax_core


def _canonical_conv_dimension_numbers(
    num_spatial: int,
) -> jax.lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC (generalised to any number of spatial dims)."""
  spatial = tuple(range(1, num_spatial + 1))
  feature_last = (0, num_spatial + 1) + spatial
  return jax.lax.ConvDimensionNumbers(
      lhs_spec=feature_last,
      rhs_spec=(num_spatial + 1, num_spatial) + tuple(range(num_spatial)),
      out_spec=feature_last,
  )


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, params: dict[str, Any]):
  """`conv_general_dilated` with explicit transposes to NHWC / HWIO / NHWC.

  Returns None when the convolution already has that form. Dimensions are
  identified by role (batch, feature, spatial i), so permuting the operands
  and the dimension numbers together computes exactly the same convolution,
  feature and batch groups included.
  """
  dn = params["dimension_numbers"]
  canon = _canonical_conv_dimension_numbers(len(dn.lhs_spec) - 2)
  if (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
      canon.lhs_spec, canon.rhs_spec, canon.out_spec):
    return None
  lhs = jax.lax.transpose(
      lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
  rhs = jax.lax.transpose(
      rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
  out = jax.lax.conv_general_dilated_p.bind(
      lhs, rhs, **dict(params, dimension_numbers=canon))
  # Axis j of `out` is the role that the original output keeps at order[j].
  order = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
  inverse = tuple(sorted(range(len(order)), key=lambda j: order[j]))
  return jax.lax.transpose(out, inverse)


_INLINED_CALLS = ("pjit", "jit", "closed_call", "core_call")


def _eval_canonical(jaxpr, consts, *args) -> list[Any]:
  """Evaluates `jaxpr` with every convolution in canonical form."""
  env = {}

  def read(v):
    return v.val if isinstance(v, jax_core.Literal) else env[v]

  for var, val in zip(jaxpr.constvars, consts):
    env[var] = val
  for var, val in zip(jaxpr.invars, args):
    env[var] = val
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    outvals = None
    if eqn.primitive is jax.lax.conv_general_dilated_p:
      out = _canonical_conv(*invals, eqn.params)
      outvals = None if out is None else [out]
    elif eqn.primitive.name in _INLINED_CALLS:
      inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
      if isinstance(inner, jax_core.ClosedJaxpr):
        outvals = _eval_canonical(inner.jaxpr, inner.consts, *invals)
    if outvals is None:  # Anything else runs as it was traced.
      with eqn.ctx.manager:
        out = eqn.primitive.bind(
            *invals, **eqn.primitive.get_bind_params(eqn.params))
      outvals = out if eqn.primitive.multiple_results else [out]
    for var, val in zip(eqn.outvars, outvals):
      env[var] = val
  return [read(v) for v in jaxpr.outvars]


def canonicalize_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn` with every convolution rewritten to NHWC / HWIO / NHWC form.

  Performance only: the result is the same function (same values, up to the
  summation order inside a convolution). Why: XLA's CPU backend implements a
  convolution with its fast (Eigen) kernel only in that form, and its pass
  that rewrites other forms into it (`ConvCanonicalization`) visits only the
  entry computation. Gradients of convolutions come in other forms (a weight
  gradient contracts the batch axis), so inside a loop or a conditional body
  (`lax.while_loop`, `lax.scan`, `lax.cond`) they fall back to a naive loop
  nest, measured 6-15x slower (BENCHMARKS.md; the pass is
  `xla/service/cpu/conv_canonicalization.cc`, which iterates
  `module->entry_computation()` only). Rewriting them with explicit
  transposes before XLA sees them keeps the fast kernel everywhere.

  `fn` is traced to a jaxpr at each call (its arguments may be tracers) and
  re-evaluated with the convolutions replaced; nested `jit` calls are
  inlined. Other higher-order primitives (loops, conditionals, custom
  derivative rules) are kept as they are, convolutions inside them
  unchanged: apply this to a loop's body, not to the loop. Take derivatives
  inside `fn`: the result is differentiable, but the convolutions of its
  derivative are not rewritten.

  Args:
    fn: any function of arrays (pytrees allowed) to arrays.

  Returns:
    A function with the same signature and outputs.
  """

  @functools.wraps(fn)
  def wrapped(*args):
    flat, tree = jax.tree.flatten(args)
    closed, out_shape = jax.make_jaxpr(
        lambda *xs: fn(*jax.tree.unflatten(tree, xs)), return_shape=True)(
            *flat)
    out = _eval_canonical(closed.jaxpr, closed.consts, *flat)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out)

  return wrapped


def resolve_canonicalize(canonicalize: bool | None) -> bool:
  """A `canonicalize` setting resolved: None means "on CPU only"."""
  if canonicalize is None:
    return jax.default_backend() == "cpu"
  return canonicalize


def chunk_transform(canonicalize: bool | None):
  """`canonicalize_convs` where `canonicalize` resolves to True, else None
  (for a clipping function's `chunk_transform`)."""
  return canonicalize_convs if resolve_canonicalize(canonicalize) else None

"""Numerical check that a model never mixes examples of a batch."""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


class NotPerExampleError(ValueError):
  """A model's output for one example depends on other examples."""


def check_per_example_independence(
    apply: Callable[[object, jax.Array], jax.Array], params, x: jax.Array, *,
    num_probes: int = 2, atol: float = 1e-5, seed: int = 0) -> None:
  """Raises unless changing example j leaves every other output unchanged.

  For `num_probes` examples j, replaces x[j] by fresh noise and compares
  `apply(params, x)[i]` for all i != j. Per-example DP (clipping each
  example's gradient) is only valid for models that pass: BatchNorm in
  training mode, for example, fails.

  Args:
    apply: `(params, x) -> outputs` with a leading batch axis.
    params: model params.
    x: a batch of at least 2 examples.
    num_probes: how many examples to perturb.
    atol: tolerance on the outputs of unperturbed examples.
    seed: seed of the perturbations.

  Raises:
    NotPerExampleError: naming the perturbed and the affected example.

  Example:
    >>> import jax.numpy as jnp
    >>> check_per_example_independence(lambda p, x: x * p, 2.0, jnp.ones((3, 2)))
    >>> check_per_example_independence(lambda p, x: x - x.mean(0), 0.0,
    ...                                jnp.arange(6.0).reshape(3, 2))
    Traceback (most recent call last):
    ...
    fedjax_seg.models.independence.NotPerExampleError: changing example ...
  """
  if x.shape[0] < 2:
    raise ValueError("need a batch of at least 2 examples.")
  base = np.asarray(apply(params, x))
  rng = np.random.default_rng(seed)
  for j in rng.choice(x.shape[0], size=min(num_probes, x.shape[0]),
                      replace=False):
    noise = jnp.asarray(rng.normal(size=x.shape[1:]) * 3.0 + 1.0, x.dtype)
    out = np.asarray(apply(params, x.at[j].set(noise)))
    others = np.arange(x.shape[0]) != j
    diff = np.abs(out[others] - base[others]).reshape(others.sum(), -1).max(1)
    if (diff > atol).any():
      i = int(np.flatnonzero(others)[np.argmax(diff)])
      raise NotPerExampleError(
          f"changing example {int(j)} changed the output of example {i} "
          f"(max abs change {diff.max():.3g} > {atol}): the model mixes "
          "examples (e.g. BatchNorm), which breaks per-example and "
          "per-patient DP. Use GroupNorm or InstanceNorm.")

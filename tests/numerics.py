"""Float tolerances for comparing two float32 computations of one quantity.

Two float32 paths to the same gradient (vmap of grad against per-layer
gradients, a vmapped round against a loop) sum in other orders; their
difference is rounding of the WHOLE quantity's size, not of each leaf's: a
leaf whose true value is about 0 (a conv bias before a norm) differs by the
rounding of its neighbours. So tolerances scale with the whole tree's norm
(the same on every x86-64 CPU and XLA version), never with a leaf's own size.
"""

import chex
import jax
import numpy as np


def tree_norm(tree) -> float:
  """The L2 norm of every leaf together, in float64."""
  return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                           for x in jax.tree.leaves(tree))))


def assert_trees_close(got, want, rtol: float = 1e-5) -> None:
  """Every element of `got` within rtol * ||want|| (the whole tree's L2
  norm) of `want`'s; shapes and structure equal."""
  chex.assert_trees_all_equal_shapes(got, want)
  scale = rtol * tree_norm(want)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    diff = float(np.max(np.abs(np.asarray(g, np.float64)
                               - np.asarray(w, np.float64)), initial=0.0))
    assert diff <= scale, (
        f"{jax.tree_util.keystr(path)}: max difference {diff:.3g} > "
        f"{rtol:g} x the whole tree's norm ({scale:.3g})")

"""Evaluation helpers: the global model on every site, leave-one-site-out.

`evaluate_sites` applies any per-site evaluation function to every site's
data with the global params (with FedBN, each site's own normalisation
params substituted), one jitted program reused for all sites.
"""

from typing import Callable, Sequence

import jax
import numpy as np

from fedjax_seg.federated import client as client_lib


def evaluate_sites(eval_fn: Callable, params, data: client_lib.SiteData,
                   site_states=None, norm_mask=None) -> list:
  """[eval_fn(params_k, examples_k, num_examples_k) for each site k].

  Args:
    eval_fn: `(params, examples [M, ...], num_examples []) -> pytree`.
    params: global params.
    data: every site's evaluation split.
    site_states: stacked `SiteState`s (needed with FedBN).
    norm_mask: FedBN mask; each site is evaluated with its local leaves.
  """
  run = jax.jit(eval_fn)
  out = []
  for k in range(int(data.num_examples.shape[0])):
    site_params = params
    if norm_mask is not None and site_states is not None:
      local = jax.tree.map(lambda x: x[k], site_states.local_params)
      site_params = client_lib.merge_local(params, local, norm_mask)
    examples = jax.tree.map(lambda x: x[k], data.examples)
    out.append(run(site_params, examples, data.num_examples[k]))
  return out


def exclude_sites(participating: np.ndarray,
                  held_out: Sequence[int]) -> np.ndarray:
  """Leave-one-site-out: `participating` with the held-out sites removed
  (they never train, never spend budget, and are only evaluated)."""
  participating = np.array(participating, bool)
  participating[list(held_out)] = False
  return participating

"""The Gaussian mechanism on a sum of clipped gradients, as an optax transform."""

from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

Scalar = float | jax.Array
ScalarOrSchedule = Scalar | Callable[[jax.Array], Scalar]


class GaussianNoiseState(NamedTuple):
  """State of `gaussian_noise`.

  Attributes:
    count: [] int32, number of updates applied so far (the schedules' step).
    noise_multiplier: [] float32, sigma applied at the last update (0 before
      the first). The accountant reads this back.
    l2_clip_norm: [] float32, C applied at the last update (0 before the
      first).
  """

  count: jax.Array
  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array


def _at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array:
  if callable(value):
    value = value(count)
  return jnp.asarray(value, dtype=jnp.float32)


def _is_static_number(value) -> bool:
  """A Python/NumPy scalar we can check now (a jax array may be traced)."""
  return isinstance(value, (int, float, np.number)) or (
      isinstance(value, np.ndarray) and value.ndim == 0)


def _check_static_non_negative(name: str, value: ScalarOrSchedule) -> None:
  if _is_static_number(value) and not float(value) >= 0:
    raise ValueError(f"{name} must be >= 0, got {float(value)}.")


def gaussian_noise(
    noise_multiplier: ScalarOrSchedule,
    *,
    l2_clip_norm: ScalarOrSchedule | None,
    expected_batch_size: Scalar,
) -> optax.GradientTransformationExtraArgs:
  """Adds N(0, (sigma_t * C_t)^2) to each coordinate, then divides by B.

  The input `updates` must be the SUM of clipped per-unit gradients (e.g. from
  `clipped_grad`) with clip norm C_t. The output is the noisy mean gradient
  `(sum + noise) / expected_batch_size`, ready for any optax optimizer:
  `optax.chain(gaussian_noise(...), optax.adam(1e-3))`.

  The noise key is an extra argument, `update(..., noise_key=key)`, that the
  caller derives with `fedjax_seg.privacy.derive_key`; the transform holds no
  key state, so nothing is split off and carried between steps, and a resumed
  run draws the same noise.

  Formal guarantees:
    * If `updates` has L2 sensitivity C_t with respect to adding or removing
      one unit (example or patient), this update is the Gaussian mechanism
      with noise multiplier sigma_t = std / sensitivity; with the batch
      Poisson-sampled at rate q it is the event
      `PoissonSampledDpEvent(q, GaussianDpEvent(sigma_t))` that
      `PrivacyLedger.record` composes. sigma_t and C_t are stored in the state
      so the accountant records what was applied.
    * Dividing by the public `expected_batch_size` (never the realised batch
      size, which is private under Poisson sampling) and any optimizer after it
      are post-processing.
    * A schedule must depend on the step count only (public), never on data.
    * Not covered: JAX's PRNG is not a cryptographically secure RNG, and
      floating-point implementations of Gaussian sampling admit known attacks
      (Mironov 2012; Jin et al. 2022) that this simulator does not defend
      against. Noise is drawn in float32 and added in float32.

  Args:
    noise_multiplier: sigma >= 0, a scalar or a schedule `step -> sigma`.
    l2_clip_norm: C, a scalar or a schedule `step -> C`, or None, in which case
      every update must pass the clip norm it used as the extra argument
      `l2_clip_norm=` (adaptive clipping).
    expected_batch_size: the public expected batch size (q * N), > 0.

  Returns:
    An `optax.GradientTransformationExtraArgs` with state `GaussianNoiseState`.
    It works under jit, vmap (over sites, or over schedules whose parameters
    are traced), `optax.chain` and `optax.inject_hyperparams`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> tx = optax.chain(
    ...     gaussian_noise(1.0, l2_clip_norm=0.5, expected_batch_size=4),
    ...     optax.sgd(0.1))
    >>> params = jnp.zeros(3)
    >>> state = tx.init(params)
    >>> grad_sum = jnp.array([1.0, 0.0, -1.0])
    >>> updates, state = tx.update(grad_sum, state, params,
    ...                            noise_key=jax.random.key(0))
    >>> updates.shape, float(state[0].noise_multiplier)
    ((3,), 1.0)
  """
  _check_static_non_negative("noise_multiplier", noise_multiplier)
  if l2_clip_norm is not None:
    _check_static_non_negative("l2_clip_norm", l2_clip_norm)
  if _is_static_number(expected_batch_size) and not expected_batch_size > 0:
    raise ValueError(
        f"expected_batch_size must be > 0, got {expected_batch_size}.")

  def init_fn(params):
    del params
    return GaussianNoiseState(
        count=jnp.zeros([], jnp.int32),
        noise_multiplier=jnp.zeros([], jnp.float32),
        l2_clip_norm=jnp.zeros([], jnp.float32),
    )

  def update_fn(updates, state, params=None, *, noise_key=None, **extra_args):
    del params
    if noise_key is None:
      raise TypeError(
          "gaussian_noise.update needs the extra argument noise_key= (derive it"
          " with fedjax_seg.privacy.derive_key; never reuse a key)."
      )
    clip_override = extra_args.get("l2_clip_norm")
    if l2_clip_norm is None:
      if clip_override is None:
        raise TypeError(
            "gaussian_noise(l2_clip_norm=None) needs the extra argument "
            "l2_clip_norm= at every update: the clip norm the sum was built "
            "with."
        )
      clip = jnp.asarray(clip_override, jnp.float32)
    else:
      clip = _at(l2_clip_norm, state.count)
    sigma = _at(noise_multiplier, state.count)
    # sigma = 0 means no noise even when C = inf (no clipping): not 0 * inf.
    stddev = jnp.where(sigma > 0, sigma * clip, 0.0)
    batch = jnp.asarray(expected_batch_size, jnp.float32)

    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(noise_key, len(leaves))
    noisy = [
        ((leaf.astype(jnp.float32)
          + stddev * jax.random.normal(k, leaf.shape, jnp.float32))
         / batch).astype(leaf.dtype)
        for leaf, k in zip(leaves, keys)
    ]
    new_state = GaussianNoiseState(
        count=optax.safe_increment(state.count),
        noise_multiplier=sigma,
        l2_clip_norm=clip,
    )
    return jax.tree.unflatten(treedef, noisy), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noise_state(opt_state: chex.ArrayTree) -> GaussianNoiseState:
  """Finds the (single) `GaussianNoiseState` inside an optax state tree.

  Works through `optax.chain`, `optax.inject_hyperparams` and vmapped states.

  Raises:
    ValueError: if there is none or more than one.
  """
  found = [
      s
      for s in jax.tree.leaves(
          opt_state, is_leaf=lambda x: isinstance(x, GaussianNoiseState)
      )
      if isinstance(s, GaussianNoiseState)
  ]
  if len(found) != 1:
    raise ValueError(
        f"expected exactly one GaussianNoiseState in the optimizer state, "
        f"found {len(found)}."
    )
  return found[0]

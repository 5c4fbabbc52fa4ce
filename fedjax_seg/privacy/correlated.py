"""Correlated noise (DP-FTRL / the matrix mechanism) as an optax transform.

The matrix mechanism releases the gradients x_t = g_t + (C^{-1} z)_t of a
stream of steps, z_t ~ N(0, (sigma C_clip)^2) fresh per step: with C the
identity this is DP-SGD's independent noise; with a lower-triangular C whose
inverse has negative off-diagonal entries, the noise of step t partly cancels
that of earlier steps, so the model (a prefix sum of the releases) carries
far less accumulated noise at the same privacy (Denisov et al. 2022;
Choquette-Choo et al. 2023; McMahan et al. 2024).

Two strategies C, both lower-triangular Toeplitz with non-negative,
non-increasing coefficients, from jax_privacy's optimizers:

  * ``banded``: b bands c_0..c_{b-1}, ||c|| = 1
    (`toeplitz.optimize_banded_toeplitz`). With each unit in one of b groups
    and group t mod b Poisson-sampled at step t, a unit's participations are
    b apart, its columns of C do not overlap, and the mechanism is as private
    as DP-SGD on its group for ceil(n / b) steps (amplified banded MF,
    Choquette-Choo et al. 2023, Thm. 4). b = 1 is DP-SGD.
  * ``blt``: a buffered linear Toeplitz C (`buffered_toeplitz.optimize`,
    McMahan, Xu & Zhang 2024): dense, a few buffers of state. Not banded, so
    no amplification: a unit's group trains every b-th step in full, and the
    whole stream is one Gaussian mechanism whose sensitivity is the largest
    norm of a sum of b-separated columns (`sensitivity_squared`).

`correlated_noise` is the transform (the same interface as
`gaussian_noise`); `Strategy` holds C, its sensitivity and its JSON form.
Memory: the transform's state holds b - 1 (banded) or the number of buffers
(BLT) copies of the parameters.

Example:
  >>> import jax, jax.numpy as jnp, optax
  >>> strategy = Strategy.banded((0.8, 0.6))
  >>> tx = optax.chain(
  ...     correlated_noise(strategy, 1.0, l2_clip_norm=0.5,
  ...                      expected_batch_size=4),
  ...     optax.sgd(0.1))
  >>> params = jnp.zeros(3)
  >>> state = tx.init(params)
  >>> for step in range(3):
  ...   updates, state = tx.update(jnp.ones(3), state, params,
  ...                              noise_key=jax.random.key(step))
  >>> int(state[0].count)
  3
"""

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax_privacy.matrix_factorization import buffered_toeplitz
from jax_privacy.matrix_factorization import streaming_matrix
from jax_privacy.matrix_factorization import toeplitz
import numpy as np
import optax

from fedjax_seg.privacy import noise as noise_lib

MECHANISMS = ("independent", "banded", "blt")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A lower-triangular Toeplitz strategy matrix C.

  Attributes:
    kind: "banded" or "blt".
    coefs: banded: the b coefficients c_0..c_{b-1} of C's first column
      (float32 values, as a device applies them).
    buf_decay, output_scale: blt: C's parameters (float32 values): C's
      first column is 1, then sum_j output_scale_j buf_decay_j^(i-1).
  """

  kind: str
  coefs: tuple = ()
  buf_decay: tuple = ()
  output_scale: tuple = ()

  def __post_init__(self):
    if self.kind not in ("banded", "blt"):
      raise ValueError(f"kind must be 'banded' or 'blt', got {self.kind!r}.")
    if self.kind == "banded" and not (self.coefs and self.coefs[0] > 0):
      raise ValueError("a banded strategy needs coefs with c_0 > 0.")
    if self.kind == "blt" and (len(self.buf_decay) != len(self.output_scale)
                               or not self.buf_decay):
      raise ValueError("a BLT needs buf_decay and output_scale of one length.")
    column = self.toeplitz_coefs(64)
    if np.any(column < 0) or np.any(np.diff(column) > 0):
      raise ValueError(
          "C's coefficients must be non-negative and non-increasing (the "
          f"sensitivity below relies on it): {column[:8]}")

  @classmethod
  def banded(cls, coefs: Sequence[float]) -> "Strategy":
    """From b coefficients, rescaled to norm 1 and rounded to float32."""
    c = np.asarray(coefs, np.float64)
    return cls("banded", coefs=tuple(
        float(v) for v in np.float32(c / np.linalg.norm(c))))

  @classmethod
  def optimized_banded(cls, steps: int, bands: int) -> "Strategy":
    """The banded Toeplitz C with `bands` bands of least mean squared error
    of the prefix sums over `steps` steps (jax_privacy's optimizer)."""
    if not 1 <= bands <= steps:
      raise ValueError(f"bands must be in [1, {steps}], got {bands}.")
    if bands == 1:
      return cls.banded((1.0,))
    return cls.banded(np.asarray(
        toeplitz.optimize_banded_toeplitz(n=steps, bands=bands)))

  @classmethod
  def optimized_blt(cls, steps: int, min_sep: int,
                    max_buffers: int = 4) -> "Strategy":
    """The BLT of least mean squared prefix-sum error over `steps` steps for
    participations `min_sep` apart (jax_privacy's optimizer, float64)."""
    with jax.enable_x64():
      blt = buffered_toeplitz.optimize(
          n=steps, min_sep=min_sep, max_participations=None, error="mean",
          min_buffers=1, max_buffers=max_buffers)
      decay, scale = np.asarray(blt.buf_decay), np.asarray(blt.output_scale)
    return cls("blt", buf_decay=tuple(float(v) for v in np.float32(decay)),
               output_scale=tuple(float(v) for v in np.float32(scale)))

  # -- the matrix -----------------------------------------------------------

  def toeplitz_coefs(self, n: int) -> np.ndarray:
    """[n] float64, the first column of C (of the float32 parameters)."""
    if self.kind == "banded":
      out = np.zeros(n)
      c = np.asarray(self.coefs, np.float64)[:n]
      out[:len(c)] = c
      return out
    decay = np.asarray(self.buf_decay, np.float64)
    scale = np.asarray(self.output_scale, np.float64)
    powers = decay[None, :] ** np.arange(max(n - 1, 0))[:, None]
    return np.concatenate([[1.0], powers @ scale])[:n]

  def sensitivity_squared(self, n: int, min_sep: int) -> float:
    """Largest ||C u||^2 over participation vectors u in {0, 1}^n with ones
    at least `min_sep` apart, for the first n steps.

    For non-negative, non-increasing Toeplitz coefficients the worst case is
    the most participations, exactly `min_sep` apart from step 0 (McMahan et
    al. 2024, arXiv 2405.13763, Thm. 2): jax_privacy's
    `toeplitz.minsep_sensitivity_squared`.
    """
    if n < 1:
      return 0.0
    with jax.enable_x64():
      return float(toeplitz.minsep_sensitivity_squared(
          jnp.asarray(self.toeplitz_coefs(n)), min_sep=min_sep, n=n))

  def inverse(self) -> streaming_matrix.StreamingMatrix:
    """C^{-1} as a float32 `StreamingMatrix` (jax_privacy's streaming
    algorithms: Choquette-Choo et al. 2023 Alg. 9 for banded, McMahan et
    al. 2024 Alg. 3 for BLT)."""
    if self.kind == "banded":
      return toeplitz.inverse_as_streaming_matrix(
          jnp.asarray(self.coefs, jnp.float32))
    return buffered_toeplitz.StreamingMatrixBuilder(
        buf_decay=np.asarray(self.buf_decay, np.float32),
        output_scale=np.asarray(self.output_scale, np.float32),
    ).build_inverse()

  def mean_prefix_rows(self, n: int) -> float:
    """mean_t ||row t of A C^{-1}||^2, A the prefix sums over n steps: the
    mean variance of the noise the model accumulates per unit variance of
    the fresh noise (DP-SGD, C = I: (n + 1) / 2).

    C^{-1} is lower-triangular Toeplitz too; its first column d solves
    sum_j c_j d_{t-j} = [t = 0] (O(n b) banded, O(n^2) BLT). Row t of
    A C^{-1} is (D_t, ..., D_0) with D the prefix sums of d."""
    c = self.toeplitz_coefs(n)
    nonzero = np.flatnonzero(c[1:]) + 1
    d = np.zeros(n)
    d[0] = 1.0 / c[0]
    for t in range(1, n):
      js = nonzero[nonzero <= t]
      d[t] = -float(c[js] @ d[t - js]) / c[0]
    prefix = np.cumsum(d)
    return float(np.mean(np.cumsum(prefix ** 2)))

  # -- JSON ---------------------------------------------------------------

  def to_dict(self) -> dict:
    out = {"kind": self.kind}
    if self.kind == "banded":
      out["coefs"] = list(self.coefs)
    else:
      out["buf_decay"] = list(self.buf_decay)
      out["output_scale"] = list(self.output_scale)
    return out


@dataclasses.dataclass(frozen=True)
class StreamShape:
  """The static shape of C^{-1}'s streaming state, one for all sites.

  Sites may use different strategies (e.g. fewer bands for a small site):
  each strategy's parameters are padded to `size` (zero coefficients, or
  buffers with zero decay and scale, which change nothing), so one compiled
  program streams them all, each site's parameters an array it reads.

  Attributes:
    kind: "banded" or "blt".
    size: bands (banded) or buffers (blt).
  """

  kind: str
  size: int

  @classmethod
  def of(cls, strategies: Sequence[Strategy]) -> "StreamShape":
    kinds = {s.kind for s in strategies}
    if len(kinds) != 1:
      raise ValueError(f"one kind of strategy per run, got {kinds}.")
    kind = kinds.pop()
    # A banded stream keeps at least one copy (a zero coefficient if every C
    # has one band: DP-SGD's noise), so its state is never an empty array.
    return cls(kind, max([2 if kind == "banded" else 1] + [
        len(s.coefs) if kind == "banded" else len(s.buf_decay)
        for s in strategies]))

  def params(self, strategy: Strategy) -> np.ndarray:
    """float32 [size] banded coefficients, or [2, size] BLT decay and
    scale, zero-padded."""
    if strategy.kind != self.kind:
      raise ValueError(f"a {strategy.kind} strategy in a {self.kind} stream.")
    if self.kind == "banded":
      out = np.zeros(self.size, np.float32)
      out[:len(strategy.coefs)] = strategy.coefs
      return out
    out = np.zeros((2, self.size), np.float32)
    out[0, :len(strategy.buf_decay)] = strategy.buf_decay
    out[1, :len(strategy.output_scale)] = strategy.output_scale
    return out

  @property
  def copies(self) -> int:
    """Copies of the parameters the state holds per site."""
    return self.size - 1 if self.kind == "banded" else self.size

  def init(self, tree):
    """The stream's state before step 0: per leaf [copies, *leaf.shape]."""
    return jax.tree.map(
        lambda x: jnp.zeros((self.copies,) + jnp.shape(x), jnp.float32), tree)

  def next(self, params: jax.Array, fresh, state):
    """(C^{-1} z)_t and the new state from z_t (`fresh`, a pytree): banded,
    Choquette-Choo et al. 2023 Alg. 9, w_t = (z_t - sum_j c_j w_{t-j}) /
    c_0; blt, McMahan et al. 2024 Alg. 3, x_t = z_t - sum_j s_j buf_j and
    buf_j <- d_j buf_j + x_t (jax_privacy's algorithms, with the
    parameters as arrays; tests check them against jax_privacy's)."""
    leaves, treedef = jax.tree.flatten(fresh)
    states = treedef.flatten_up_to(state)
    outs, new_states = [], []
    for z, st in zip(leaves, states):
      if self.kind == "banded":
        inner = jnp.tensordot(params[1:], st, axes=1)
        w = (z - inner) / params[0]
        new = (jnp.concatenate([w[None], st[:-1]]) if self.copies else st)
        outs.append(w)
      else:
        decay, scale = params[0], params[1]
        x = z - jnp.tensordot(scale, st, axes=1)
        new = decay.reshape((-1,) + (1,) * z.ndim) * st + x[None]
        outs.append(x)
      new_states.append(new)
    return (jax.tree.unflatten(treedef, outs),
            jax.tree.unflatten(treedef, new_states))


class CorrelatedNoiseState(NamedTuple):
  """State of `correlated_noise`.

  Attributes:
    count: [] int32, steps released so far (the stream's index; never reset
      between rounds).
    noise_multiplier: [] float32, sigma of the fresh noise z at the last
      step (0 before the first).
    l2_clip_norm: [] float32, C_clip at the last step.
    stream: the state of C^{-1}: per parameter leaf, [b - 1, ...] (banded)
      or [buffers, ...] (BLT) float32.
  """

  count: jax.Array
  noise_multiplier: jax.Array
  l2_clip_norm: jax.Array
  stream: Any


def correlated_noise(
    strategy: Strategy | StreamShape,
    noise_multiplier: noise_lib.ScalarOrSchedule,
    *,
    l2_clip_norm: noise_lib.Scalar | None,
    expected_batch_size: noise_lib.Scalar,
) -> optax.GradientTransformationExtraArgs:
  """Adds (C^{-1} z)_t, z_t ~ N(0, (sigma C_clip)^2), then divides by B.

  Like `gaussian_noise`, the input is the SUM of clipped per-unit gradients
  and the key is the extra argument `noise_key=` (one fresh key per step,
  from `fedjax_seg.privacy.derive_key`): z_t is drawn from it exactly as
  `gaussian_noise` draws its noise, then passed through C^{-1}, whose
  streaming state (the last b - 1 noise vectors, or the BLT's buffers) is in
  `CorrelatedNoiseState.stream`. The state must be carried across rounds:
  the stream's step t is `count`, not the local step.

  Formal guarantees:
    * The releases are x_t = g_t + (C^{-1} z)_t, the matrix mechanism with
      strategy C; its privacy is that of C G + Z under the participation
      pattern of the units (`Strategy.sensitivity_squared`, or amplified
      banded MF with cyclic Poisson sampling, `privacy.correlated_plan`).
      sigma must be constant over the stream (the analyses assume one noise
      scale).
    * Not covered: C^{-1} is applied in float32 (relative error about 1e-6
      of the noise), besides `gaussian_noise`'s caveats on JAX's PRNG and
      floating-point Gaussian sampling.

  Args:
    strategy: C; or a `StreamShape`, and then every update passes the
      site's padded parameters as the extra argument `stream_params=`
      (`StreamShape.params`; sites of one program with different C).
    noise_multiplier: sigma >= 0 of the fresh noise z (a scalar, or a
      schedule that the caller keeps constant).
    l2_clip_norm: C_clip, or None to pass `l2_clip_norm=` at every update.
    expected_batch_size: the public expected batch size, > 0.
  """
  noise_lib._check_static_non_negative("noise_multiplier", noise_multiplier)
  if isinstance(strategy, Strategy):
    shape = StreamShape.of([strategy])
    fixed = jnp.asarray(shape.params(strategy))
  else:
    shape, fixed = strategy, None

  def init_fn(params):
    return CorrelatedNoiseState(
        count=jnp.zeros([], jnp.int32),
        noise_multiplier=jnp.zeros([], jnp.float32),
        l2_clip_norm=jnp.zeros([], jnp.float32),
        stream=shape.init(params))

  def update_fn(updates, state, params=None, *, noise_key=None, **extra_args):
    del params
    if noise_key is None:
      raise TypeError("correlated_noise.update needs the extra argument "
                      "noise_key= (one fresh key per step).")
    stream_params = extra_args.get("stream_params", fixed)
    if stream_params is None:
      raise TypeError("correlated_noise(StreamShape) needs the extra "
                      "argument stream_params= at every update.")
    if l2_clip_norm is None:
      if extra_args.get("l2_clip_norm") is None:
        raise TypeError("correlated_noise(l2_clip_norm=None) needs the extra "
                        "argument l2_clip_norm= at every update.")
      clip = jnp.asarray(extra_args["l2_clip_norm"], jnp.float32)
    else:
      clip = noise_lib._at(l2_clip_norm, state.count)
    sigma = noise_lib._at(noise_multiplier, state.count)
    stddev = jnp.where(sigma > 0, sigma * clip, 0.0)
    leaves, treedef = jax.tree.flatten(updates)
    keys = jax.random.split(noise_key, len(leaves))
    # z_t as `gaussian_noise` draws its noise (so b = 1 is DP-SGD exactly).
    fresh = jax.tree.unflatten(treedef, [
        stddev * jax.random.normal(k, leaf.shape, jnp.float32)
        for leaf, k in zip(leaves, keys)])
    correlated, stream = shape.next(jnp.asarray(stream_params, jnp.float32),
                                    fresh, state.stream)
    batch = jnp.asarray(expected_batch_size, jnp.float32)
    noisy = jax.tree.map(
        lambda g, n: ((g.astype(jnp.float32) + n) / batch).astype(g.dtype),
        updates, correlated)
    return noisy, CorrelatedNoiseState(
        count=optax.safe_increment(state.count), noise_multiplier=sigma,
        l2_clip_norm=clip, stream=stream)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def noise_transform(strategy: Strategy | StreamShape | None, noise_multiplier,
                    **kwargs) -> optax.GradientTransformationExtraArgs:
  """`gaussian_noise` without a strategy (independent noise), else
  `correlated_noise`."""
  if strategy is None:
    return noise_lib.gaussian_noise(noise_multiplier, **kwargs)
  return correlated_noise(strategy, noise_multiplier, **kwargs)

"""RDP of the Poisson-subsampled Gaussian, vectorised over many mechanisms.

dp_accounting evaluates the RDP of one (q, sigma) pair at a time in Python
loops, about 35 to 100 ms per pair at its default orders. A per-round noise
schedule at 100 sites needs 100 new pairs every round, and a sweep of M
members M times as many. This module evaluates the same quantity for arrays
of (q, sigma) at once in float64 numpy, in log space:

  RDP_alpha(q, sigma) = log(A_alpha) / (alpha - 1), add/remove-one neighbours
  (Mironov, Talwar and Zhang 2019, "Renyi Differential Privacy of the Sampled
  Gaussian Mechanism").

* Integer orders: A_alpha = sum_i C(alpha, i) q^i (1-q)^(alpha-i)
  exp((i^2 - i) / (2 sigma^2)). The i = 0 and i = 1 terms have exponent 0 and
  the binomial weights sum to 1, so
  log A_alpha = log1p(sum_{i>=2} C(alpha, i) q^i (1-q)^(alpha-i)
  expm1((i^2 - i) / (2 sigma^2))), summed in log space. This stays accurate
  where A_alpha is 1 + tiny (small q, large sigma), where summing the terms
  themselves loses the tiny part to rounding.
* Fractional orders: the two series of Sec. 3.3 of Mironov et al. (the
  integrals over (-inf, z0] and [z0, inf)) exactly as dp_accounting sums them,
  term by term with the same stopping rule (both terms decreasing and 30 nats
  below the running total, at most 1000 terms; an order that does not
  converge gets RDP inf, i.e. it is not used), vectorised over mechanisms.
* q = 0: 0; q = 1: alpha / (2 sigma^2); sigma = 0: inf.

`tests/privacy/test_rdp_vectorized.py` compares the epsilons with
dp_accounting's `RdpAccountant` on 1,000 random heterogeneous schedules.

Example:
  >>> import numpy as np
  >>> from dp_accounting.rdp import rdp_privacy_accountant as rdp
  >>> orders = np.array([1.5, 2.0, 8.0, 32.0])
  >>> ours = poisson_gaussian_rdp([0.01, 0.1], [1.0, 2.0], orders)
  >>> ours.shape
  (2, 4)
  >>> ref = rdp._compute_rdp_poisson_subsampled_gaussian(0.1, 2.0, orders)
  >>> bool(np.allclose(ours[1], ref, rtol=1e-10))
  True
"""

from typing import Sequence

import numpy as np
from scipy import special

# dp_accounting's limit on the terms of the fractional-order series.
MAX_TERMS_FRACTIONAL = 1000
_BLOCK = 64  # Terms of the fractional series evaluated per pass.


def _log_comb(n, k):
  return special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(
      n - k + 1)


def _log_expm1(x):
  """log(exp(x) - 1) for x > 0, accurate for small and large x."""
  x = np.asarray(x, np.float64)
  large = x > 30.0
  with np.errstate(divide="ignore"):
    small_part = np.log(np.expm1(np.where(large, 1.0, x)))
  return np.where(large, x + np.log1p(-np.exp(-np.where(large, x, 31.0))),
                  small_part)


def _log_a_integer(q, sigma, alpha: int):
  """log A_alpha for integer alpha >= 2, 0 < q < 1; q, sigma: [E]."""
  i = np.arange(2, alpha + 1, dtype=np.float64)  # [T]
  log_weight = (_log_comb(float(alpha), i)[None, :]
                + i[None, :] * np.log(q)[:, None]
                + (alpha - i)[None, :] * np.log1p(-q)[:, None])
  exponent = (i * i - i)[None, :] / (2.0 * sigma[:, None] ** 2)
  log_terms = log_weight + _log_expm1(exponent)
  log_sum = special.logsumexp(log_terms, axis=1)
  return np.logaddexp(0.0, log_sum)  # log1p(exp(log_sum)), accurately.


def _log_erfc(x):
  return np.log(2.0) + special.log_ndtr(-x * np.sqrt(2.0))


def _log_a_fractional(q, sigma, alpha):
  """log A_alpha for fractional alpha > 1, 0 < q < 1; q, sigma, alpha: [N]
  (one order per element).

  dp_accounting's `_compute_log_a_frac`, a block of term indices at a time
  for all elements; inf where the series does not converge within 1000
  terms.
  """
  num = q.shape[0]
  z0 = sigma ** 2 * np.log(1.0 / q - 1.0) + 0.5
  log_q, log1mq = np.log(q), np.log1p(-q)
  root2_sigma = np.sqrt(2.0) * sigma
  inv_two_var = 1.0 / (2.0 * sigma ** 2)
  log_a0 = np.full(num, -np.inf)
  log_a1 = np.full(num, -np.inf)
  last_s0 = np.full(num, -np.inf)
  last_s1 = np.full(num, -np.inf)
  result = np.full(num, np.inf)
  active = np.arange(num)
  for start in range(0, MAX_TERMS_FRACTIONAL, _BLOCK):
    if active.size == 0:
      break
    i = np.arange(start, min(start + _BLOCK, MAX_TERMS_FRACTIONAL),
                  dtype=np.float64)[None, :]  # [1, T]
    a = active
    al = alpha[a, None]
    j = al - i
    log_coef = _log_comb(al, i)
    lq, l1q = log_q[a, None], log1mq[a, None]
    log_s0 = (log_coef + i * lq + j * l1q + i * (i - 1) * inv_two_var[a, None]
              + np.log(0.5) + _log_erfc((i - z0[a, None]) / root2_sigma[a, None]))
    log_s1 = (log_coef + j * lq + i * l1q + j * (j - 1) * inv_two_var[a, None]
              + np.log(0.5) + _log_erfc((z0[a, None] - j) / root2_sigma[a, None]))
    # Running sums continue from the previous block.
    acc0 = np.logaddexp.accumulate(
        np.concatenate([log_a0[a, None], log_s0], axis=1), axis=1)[:, 1:]
    acc1 = np.logaddexp.accumulate(
        np.concatenate([log_a1[a, None], log_s1], axis=1), axis=1)[:, 1:]
    total = np.logaddexp(acc0, acc1)
    prev0 = np.concatenate([last_s0[a, None], log_s0[:, :-1]], axis=1)
    prev1 = np.concatenate([last_s1[a, None], log_s1[:, :-1]], axis=1)
    stop = ((log_s0 < prev0) & (log_s1 < prev1)
            & (np.maximum(log_s0, log_s1) < total - 30.0))
    done = stop.any(axis=1)
    first = np.argmax(stop, axis=1)
    result[a[done]] = total[done, first[done]]
    log_a0[a], log_a1[a] = acc0[:, -1], acc1[:, -1]
    last_s0[a], last_s1[a] = log_s0[:, -1], log_s1[:, -1]
    active = a[~done]
  return result


def poisson_gaussian_rdp(sampling_rate, noise_multiplier,
                         orders: Sequence[float]) -> np.ndarray:
  """RDP of one Poisson-subsampled Gaussian step at every order.

  Args:
    sampling_rate: q in [0, 1], any shape (broadcast with noise_multiplier).
    noise_multiplier: sigma >= 0 (noise std / L2 sensitivity).
    orders: RDP orders alpha > 1, [O].

  Returns:
    float64 array of shape broadcast(q, sigma).shape + [O] (inf where the
    mechanism gives no RDP bound at that order).
  """
  q, sigma = np.broadcast_arrays(np.asarray(sampling_rate, np.float64),
                                 np.asarray(noise_multiplier, np.float64))
  orders = np.asarray(orders, np.float64)
  if np.any((q < 0) | (q > 1)) or np.any(np.isnan(q)):
    raise ValueError("sampling rates must be in [0, 1].")
  if np.any(sigma < 0) or np.any(np.isnan(sigma)):
    raise ValueError("noise multipliers must be >= 0.")
  if np.any(orders <= 1):
    raise ValueError("RDP orders must be > 1.")
  shape = q.shape
  q, sigma = q.reshape(-1), sigma.reshape(-1)
  out = np.zeros((q.size, orders.size))
  with np.errstate(divide="ignore"):
    full = (q == 1) & (sigma > 0)
    out[full] = orders[None, :] / (2.0 * sigma[full, None] ** 2)
  out[(sigma == 0) & (q > 0)] = np.inf
  sub = np.flatnonzero((q > 0) & (q < 1) & (sigma > 0))
  if sub.size:
    qs, ss = q[sub], sigma[sub]
    fractional = []
    for o, alpha in enumerate(orders):
      if np.isinf(alpha):
        out[sub, o] = np.inf
      elif float(alpha).is_integer():
        out[sub, o] = _log_a_integer(qs, ss, int(alpha)) / (alpha - 1)
      else:
        fractional.append(o)
    if fractional:  # All fractional orders of all mechanisms at once.
      alphas = orders[fractional]
      grid_q = np.repeat(qs, len(alphas))
      grid_s = np.repeat(ss, len(alphas))
      grid_a = np.tile(alphas, len(qs))
      log_a = _log_a_fractional(grid_q, grid_s, grid_a).reshape(
          len(qs), len(alphas))
      out[np.ix_(sub, fractional)] = log_a / (alphas - 1)
  return out.reshape(shape + (orders.size,))


def composed_rdp(sampling_rates, noise_multipliers, counts,
                 orders: Sequence[float]) -> np.ndarray:
  """RDP of compositions: sum_e counts[..., e] * RDP(q[..., e], sigma[..., e]).

  Args:
    sampling_rates, noise_multipliers, counts: [..., E] (broadcast), E events
      per composition (e.g. [members, sites, rounds]); count 0 events add 0.
    orders: [O].

  Returns:
    [..., O] float64.
  """
  q, sigma, counts = np.broadcast_arrays(
      np.asarray(sampling_rates, np.float64),
      np.asarray(noise_multipliers, np.float64),
      np.asarray(counts, np.float64))
  if np.any(counts < 0):
    raise ValueError("counts must be >= 0.")
  rdp = poisson_gaussian_rdp(q, sigma, orders)  # [..., E, O]
  # 0 * inf would be nan: an event composed 0 times contributes nothing.
  weighted = np.where(counts[..., None] > 0, rdp, 0.0) * counts[..., None]
  return weighted.sum(axis=-2)

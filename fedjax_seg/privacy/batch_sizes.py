"""The batch numbers of Poisson-sampled sites: rates and truncated batches.

Public numbers only: a site's sampling rate q = min(1, B / N) over its N
units and the maximum batch B_max every step's sample is truncated to (a
static shape), chosen so that truncation changes a sample with probability
at most `TRUNCATION_TAIL` per step; `f32` is a value as a device applies it.
"""

import numpy as np

from fedjax_seg.privacy import events as events_lib

# Per-step probability that truncating a Poisson sample changes anything.
TRUNCATION_TAIL = 1e-12


def f32(x) -> float:
  """The float32 value a device applies and reports back, as a float."""
  return float(np.float32(x))


def max_batch_size_for(num_units: int, sampling_rate: float,
                       tail: float = TRUNCATION_TAIL) -> int:
  """Smallest B_max whose per-step truncation probability is <= `tail`."""
  if not 0 <= sampling_rate <= 1:
    raise ValueError(f"sampling_rate must be in [0, 1], got {sampling_rate}.")
  mean = num_units * sampling_rate
  b = max(1, int(np.ceil(mean)))
  while b < num_units + 1 and events_lib.truncation_probability(
      num_units, sampling_rate, b) > tail:
    b += max(1, b // 16)
  return min(b, num_units + 1) if num_units > 0 else 1


def sampling_for(units: np.ndarray, batch_size: int | float
                 ) -> tuple[np.ndarray, int]:
  """([S] Poisson sampling rates q_k = min(1, B / N_k), the maximum batch
  every site's sample is truncated to) of sites with `units` N_k."""
  rates = np.minimum(1.0, batch_size / np.asarray(units))
  return rates, max(max_batch_size_for(int(n), float(q))
                    for n, q in zip(units, rates))

"""Functions for `parallel.process_map` tests that workers import fast (no
jax): this module imports only the standard library."""

import sys


def double_noisily(x):
  print("noise on stdout")  # Must not be read as a result.
  return 2 * x


def double_here_only(x):
  """Fails in a worker (they run `python -I`), works in the test process."""
  if sys.flags.isolated:
    raise RuntimeError("in a worker")
  return 2 * x

"""Pure-Python accounting work spread over CPU cores.

dp_accounting's PLD construction and its RDP series are Python loops (about
0.15 s per truncated subsampled Gaussian event for PLD at the report's 1e-3
discretization), and a per-round noise schedule gives every site one distinct
event per round: 240 events at 8 sites and 30 rounds, over a minute on one
core, and the report needs them twice (the ledger's figures, then the
verifier's recomputation). Sites are independent, so their figures can be
computed in worker processes when the caller asks (`workers`; the project's
runners do, a library call computes in-process unless asked).

Workers are fresh interpreters running this file (`python -I`), fed the
function and its arguments by pickle on stdin. Unlike `multiprocessing`'s
"spawn", they never import the caller's `__main__` (an unguarded user
script would otherwise run again in every worker), and unlike "fork" they
are safe in a process that runs JAX's threads. This file imports only the
standard library at the top, so running it as a script loads nothing else
until the function is unpickled. The results are exactly the in-process
ones (the same function on the same arguments).
"""

import logging
import os
import pickle
import subprocess
import sys
from typing import Callable, Sequence, TypeVar

R = TypeVar("R")

# Below this many units of work (e.g. distinct events), starting workers
# (a few seconds each, importing the package) costs more than it saves.
MIN_PARALLEL_WORK = 32


def available_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    return os.cpu_count() or 1


def resolve_workers(workers: int | str, work: int, calls: int) -> int:
  """The number of worker processes to use: `workers` (an int, or "auto":
  one per core when `work >= MIN_PARALLEL_WORK`, else 1), at most `calls`.
  """
  if workers == "auto":
    workers = available_cores() if work >= MIN_PARALLEL_WORK else 1
  if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
    raise ValueError(f"workers must be a positive int or 'auto', got "
                     f"{workers!r}.")
  return min(workers, calls)


def process_map(fn: Callable[..., R], items: Sequence[tuple], *,
                work: int | None = None,
                workers: int | str = 1) -> list[R]:
  """`[fn(*args) for args in items]`, maybe in worker processes.

  Args:
    fn: a module-level function (workers import it by name); its arguments
      and result must pickle.
    items: argument tuples, one call each.
    work: units of work in all (e.g. distinct events) for "auto" (default:
      `len(items)`).
    workers: 1 (the default: here, in order), a number of worker processes,
      or "auto" (see `resolve_workers`).

  Returns:
    The results in the order of `items`. If a worker fails, every call is
    made here instead, with a warning (an error of `fn` itself then raises
    here, as it would without workers).
  """
  items = list(items)
  workers = resolve_workers(workers, len(items) if work is None else work,
                            len(items))
  if workers <= 1:
    return [fn(*args) for args in items]
  try:
    payloads = [pickle.dumps(list(sys.path)) + pickle.dumps(
        (fn, items[w::workers])) for w in range(workers)]
    per_chunk = _run_workers([os.path.abspath(__file__)], payloads)
  except (OSError, RuntimeError, pickle.PicklingError, pickle.UnpicklingError,
          AttributeError, TypeError, EOFError) as e:
    logging.warning("accounting workers failed (%s); computing in this "
                    "process", e)
    return [fn(*args) for args in items]
  results = [None] * len(items)
  for w, chunk_results in enumerate(per_chunk):
    results[w::workers] = chunk_results
  return results


# Workers frame their result so that nothing else can be read as one.
_RESULT_HEADER = b"fedjax_seg.parallel/1\n"


def _run_workers(script_args: list[str], payloads: list[bytes]) -> list:
  """Starts one `python -I <script_args>` per payload, then feeds each its
  payload on stdin; returns their unpickled results, in order."""
  procs = [subprocess.Popen([sys.executable, "-I", *script_args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
           for _ in payloads]
  try:
    for proc, payload in zip(procs, payloads):
      # A worker reads all of its input before it computes or writes.
      proc.stdin.write(payload)
      proc.stdin.close()
    outputs = [proc.stdout.read() for proc in procs]
    if any(proc.wait() for proc in procs):
      raise RuntimeError("a worker exited with an error")
  except BaseException:
    for proc in procs:
      proc.kill()
    raise
  if not all(out.startswith(_RESULT_HEADER) for out in outputs):
    raise RuntimeError("a worker wrote no result")
  return [pickle.loads(out[len(_RESULT_HEADER):]) for out in outputs]


def _result_stream():
  """The worker's result stream: the original stdout; fd 1 (anything the
  computation prints) goes to stderr from here on."""
  out = os.fdopen(os.dup(1), "wb")
  os.dup2(2, 1)
  return out


def _worker() -> None:
  """Reads sys.path, then (fn, [args]), from stdin; writes [fn(*args)]."""
  out = _result_stream()
  stream = sys.stdin.buffer
  # The caller's path first: `fn` names a module of its environment.
  sys.path[:0] = [p for p in pickle.load(stream) if p not in sys.path]
  fn, chunk = pickle.load(stream)
  out.write(_RESULT_HEADER + pickle.dumps([fn(*args) for args in chunk]))
  out.close()


if __name__ == "__main__":
  _worker()

"""Noise-multiplier and clip-norm schedules: functions of the step count only.

A schedule is a callable `step -> value` (an `optax.Schedule`). Since it reads
nothing but the public step count, any schedule composes exactly in the
accountant: the ledger records the value applied at each step. Most schedules
here are optax's own, re-exported under the names this library documents; the
parameters may be traced arrays (so a sweep can `jax.vmap` over them), except
step counts, which are static.

Example:
  >>> sched = cosine_decay_schedule(init_value=2.0, decay_steps=100, alpha=0.5)
  >>> [round(float(sched(s)), 3) for s in (0, 50, 100, 200)]
  [2.0, 1.5, 1.0, 1.0]
  >>> bool(per_round(sched, steps_per_round=10)(25) == sched(2))
  True
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

Schedule = Callable[[jax.Array | int], jax.Array]

constant_schedule = optax.constant_schedule
linear_schedule = optax.linear_schedule
cosine_decay_schedule = optax.cosine_decay_schedule


def exponential_decay(
    init_value: float | jax.Array,
    decay_rate: float | jax.Array,
    transition_steps: int,
    *,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | jax.Array | None = None,
) -> Schedule:
  """`init_value * decay_rate ** ((step - transition_begin) / transition_steps)`.

  Same parameters as `optax.exponential_decay`, but every value parameter may
  be a traced array (optax's branches on `decay_rate` in Python), so a sweep
  can vmap over decay rates. `end_value` bounds the value (below when
  decaying, above when growing).

  Example:
    >>> s = exponential_decay(2.0, 0.5, transition_steps=10)
    >>> [float(s(t)) for t in (0, 10, 20)]
    [2.0, 1.0, 0.5]
  """
  if transition_steps <= 0:
    raise ValueError(f"transition_steps must be > 0, got {transition_steps}.")

  def schedule(step):
    exponent = jnp.maximum(jnp.asarray(step) - transition_begin, 0) / (
        transition_steps)
    if staircase:
      exponent = jnp.floor(exponent)
    value = init_value * jnp.power(decay_rate, exponent)
    if end_value is not None:
      value = jnp.where(jnp.asarray(decay_rate) < 1,
                        jnp.maximum(value, end_value),
                        jnp.minimum(value, end_value))
    return value

  return schedule


def step_schedule(
    init_value: float, boundaries_and_scales: dict[int, float]
) -> Schedule:
  """Piecewise constant: multiplied by `scale` from each boundary step on.

  Example:
    >>> s = step_schedule(1.0, {10: 0.5, 20: 0.5})
    >>> [float(s(t)) for t in (0, 10, 25)]
    [1.0, 0.5, 0.25]
  """
  return optax.piecewise_constant_schedule(init_value, boundaries_and_scales)


def warmup_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    after: Schedule | None = None,
) -> Schedule:
  """Linear from `init_value` to `peak_value` over `warmup_steps`, then `after`.

  `after` (default: constant `peak_value`) is evaluated on the step count since
  the end of the warm-up.

  Example:
    >>> s = warmup_schedule(0.5, 1.5, 10)
    >>> [float(s(t)) for t in (0, 5, 10, 99)]
    [0.5, 1.0, 1.5, 1.5]
  """
  ramp = optax.linear_schedule(init_value, peak_value, warmup_steps)
  if after is None:
    after = optax.constant_schedule(peak_value)
  return optax.join_schedules([ramp, after], [warmup_steps])


def per_round(schedule: Schedule, steps_per_round: int) -> Schedule:
  """Holds `schedule(round)` for every local step of a round.

  Turns a schedule written in rounds into one of local steps, which is what
  `gaussian_noise` counts.
  """
  if steps_per_round < 1:
    raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}.")
  return lambda step: schedule(jnp.asarray(step) // steps_per_round)


SHAPES = ("constant", "linear", "exponential", "cosine", "step")


def named_shape(name: str, rounds: int, *, end_factor: float = 0.5,
                decay_rate: float = 0.98) -> Schedule:
  """A noise schedule's shape over rounds, `round -> relative sigma` (1 at
  round 0): constant; linear or cosine to `end_factor` at the last round;
  exponential (`decay_rate` per round); step (`end_factor` from half the
  rounds on).

  Example:
    >>> s = named_shape("step", 10, end_factor=0.5)
    >>> [float(s(r)) for r in (0, 4, 5, 9)]
    [1.0, 1.0, 0.5, 0.5]
  """
  span = max(rounds - 1, 1)
  if name == "constant":
    return constant_schedule(1.0)
  if name == "linear":
    return linear_schedule(1.0, end_factor, span)
  if name == "exponential":
    return exponential_decay(1.0, decay_rate, 1)
  if name == "cosine":
    return cosine_decay_schedule(1.0, span, alpha=end_factor)
  if name == "step":
    return step_schedule(1.0, {max(rounds // 2, 1): end_factor})
  raise ValueError(f"schedule must be one of {SHAPES}, got {name!r}.")


def scaled(shape: Schedule, scale: float | jax.Array) -> Schedule:
  """`step -> scale * shape(step)`: a schedule shape with a calibrated scale."""
  return lambda step: scale * shape(step)


def evaluate(schedule: Schedule | float, steps: int) -> np.ndarray:
  """The schedule's values at steps 0..steps-1, float64, on the host."""
  if not callable(schedule):
    return np.full((steps,), float(schedule))
  values = jax.vmap(schedule)(jnp.arange(steps))
  return np.asarray(values, dtype=np.float64).reshape(steps)


def group_values(values: Sequence[float]) -> list[tuple[float, int]]:
  """Groups equal values: [(value, count)], sorted by value.

  Composition is commutative, so steps with the same value can be counted
  together; the accountant then does one computation per distinct value.
  """
  unique, counts = np.unique(np.asarray(values, np.float64), return_counts=True)
  return [(float(v), int(c)) for v, c in zip(unique, counts)]

"""Tests for fedjax_seg.privacy.schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_seg.privacy import schedules


def _values(schedule, steps):
  return [float(schedule(t)) for t in steps]


def test_closed_forms():
  np.testing.assert_allclose(
      _values(schedules.constant_schedule(1.3), [0, 7]), [1.3, 1.3])
  np.testing.assert_allclose(
      _values(schedules.linear_schedule(2.0, 1.0, 10), [0, 5, 10, 20]),
      [2.0, 1.5, 1.0, 1.0])
  np.testing.assert_allclose(
      _values(schedules.exponential_decay(2.0, 0.5, 10), [0, 5, 10]),
      [2.0, 2.0 * 0.5 ** 0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(
      _values(schedules.exponential_decay(2.0, 0.5, 10, staircase=True,
                                          end_value=0.8), [9, 10, 30]),
      [2.0, 1.0, 0.8], rtol=1e-6)
  np.testing.assert_allclose(
      _values(schedules.cosine_decay_schedule(1.0, 100, alpha=0.2),
              [0, 50, 100]),
      [1.0, 0.2 + 0.8 * 0.5, 0.2], rtol=1e-6)
  np.testing.assert_allclose(
      _values(schedules.step_schedule(1.0, {5: 0.5}), [4, 5]), [1.0, 0.5])
  np.testing.assert_allclose(
      _values(schedules.warmup_schedule(
          2.0, 1.0, 4, after=schedules.linear_schedule(1.0, 0.5, 4)),
              [0, 2, 4, 6, 8]), [2.0, 1.5, 1.0, 0.75, 0.5])


def test_per_round_holds_the_round_value_and_scaled_multiplies():
  base = schedules.linear_schedule(1.0, 0.0, 10)
  sched = schedules.scaled(schedules.per_round(base, 3), 2.0)
  assert _values(sched, [0, 1, 2, 3, 5, 6]) == pytest.approx(
      [2.0, 2.0, 2.0, 1.8, 1.8, 1.6])
  with pytest.raises(ValueError):
    schedules.per_round(base, 0)


def test_evaluate_and_group_values():
  values = schedules.evaluate(schedules.per_round(
      schedules.linear_schedule(2.0, 1.0, 2), 3), 9)
  np.testing.assert_allclose(values, [2, 2, 2, 1.5, 1.5, 1.5, 1, 1, 1])
  assert schedules.group_values(values) == [(1.0, 3), (1.5, 3), (2.0, 3)]
  np.testing.assert_allclose(schedules.evaluate(0.7, 3), [0.7] * 3)


def test_parameters_can_be_traced_for_sweeps():
  def at_step_3(init, rate):
    return schedules.exponential_decay(init, rate, 1)(3)

  out = jax.jit(jax.vmap(at_step_3))(jnp.array([1.0, 2.0]),
                                     jnp.array([0.5, 0.9]))
  np.testing.assert_allclose(out, [0.125, 2 * 0.9 ** 3], rtol=1e-6)

"""Tests for fedjax_seg.run.noise_secret: the noise is secret unless --noise_seed.

The attack that motivates it: two runs that differ only in the noise
multiplier and draw the same N(0, 1) noise z release, after one round of one
local SGD step, Delta_A = -eta (S + sigma_A C z) / B and Delta_B = -eta (S +
sigma_B C z) / B, whose combination (sigma_B Delta_A - sigma_A Delta_B) /
(sigma_B - sigma_A) = -eta S / B holds the clipped gradient sum S with no
noise at all.
"""

import dataclasses
import pathlib

import jax
import numpy as np
import pytest

from fedjax_seg.run import config as C
from fedjax_seg.run import config_flags
from fedjax_seg.run import artifacts
from fedjax_seg.run import loop
from fedjax_seg.run import noise_secret
from tests.run import tiny

TINY = tiny.config(
    rounds=1, eval_every=1, checkpoint_every=1,
    privacy=C.PrivacyConfig(target_epsilon=None, noise_multiplier=1.0))


def _one_round_update(config, workdir) -> np.ndarray:
  """The released global model's change after round 1, flattened."""
  sim = loop.Simulation(config, workdir)
  part = sim.begin_round()
  state, _, _ = sim.run_round(part)
  after = jax.tree.leaves(state.server_state.params)
  before = jax.tree.leaves(sim.initial_params)
  return np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(
      b, np.float64)) for a, b in zip(after, before)])


def _with_noise(sigma, noise_seed):
  return dataclasses.replace(
      TINY, noise_seed=noise_seed,
      privacy=dataclasses.replace(TINY.privacy, noise_multiplier=sigma))


@pytest.mark.slow
def test_two_runs_sharing_noise_reveal_the_clipped_sum_and_default_runs_do_not(
    tmp_path):
  sigma_a, sigma_b = 1.0, 2.0

  def reconstruct(delta_a, delta_b):
    return (sigma_b * delta_a - sigma_a * delta_b) / (sigma_b - sigma_a)

  # The truth: the same sample (same noise seed) with almost no noise.
  truth = _one_round_update(_with_noise(1e-7, 0), tmp_path / "truth")
  shared = reconstruct(_one_round_update(_with_noise(sigma_a, 0),
                                         tmp_path / "a0"),
                       _one_round_update(_with_noise(sigma_b, 0),
                                         tmp_path / "b0"))
  error = np.linalg.norm(shared - truth) / np.linalg.norm(truth)
  # The attack has power: it recovers the noiseless update to float error.
  assert error < 1e-3, error
  # Default runs: each draws its own secret, so nothing cancels.
  fresh = reconstruct(_one_round_update(_with_noise(sigma_a, None),
                                        tmp_path / "a"),
                      _one_round_update(_with_noise(sigma_b, None),
                                        tmp_path / "b"))
  error = np.linalg.norm(fresh - truth) / np.linalg.norm(truth)
  assert error > 0.5, error


@pytest.mark.slow
def test_the_secret_is_in_no_output_and_a_resumed_run_keeps_it(tmp_path):
  config = dataclasses.replace(TINY, federated=dataclasses.replace(
      TINY.federated, rounds=3), eval_every=1)
  full = loop.train_and_evaluate(config, tmp_path / "full")
  secret_file = (tmp_path / "full" / artifacts.CHECKPOINTS /
                 noise_secret.SECRET_FILE)
  assert secret_file.stat().st_mode & 0o777 == 0o600
  secret = noise_secret.read_secret(secret_file.parent)
  assert len(secret) == 32
  # grep -r over every file of the run but the secret's own.
  needles = [secret.hex().encode(), secret.hex().upper().encode(), secret]
  files = [p for p in (tmp_path / "full").rglob("*")
           if p.is_file() and p != secret_file]
  assert any(p.name == artifacts.REPORT for p in files)
  assert any(p.name == artifacts.ROUNDS_CSV for p in files)
  for path in files:
    data = path.read_bytes()
    assert not any(n in data for n in needles), path
  assert full["config"]["noise_seed"] is None
  assert "operating system" in full["privacy"]["assumptions"]["secret"]
  # Killed after round 1 and resumed: bit-identical to the run that was
  # never stopped, given the same secret (copied before the first round).
  (tmp_path / "resumed" / artifacts.CHECKPOINTS).mkdir(parents=True)
  (tmp_path / "resumed" / artifacts.CHECKPOINTS /
   noise_secret.SECRET_FILE).write_text(secret_file.read_text())
  killed = dataclasses.replace(config, stop_after_rounds=1)
  assert loop.train_and_evaluate(killed, tmp_path / "resumed")[
      "stopped_reason"] == "interrupted"
  resumed = loop.train_and_evaluate(config, tmp_path / "resumed")
  assert resumed["final_params_sha256"] == full["final_params_sha256"]
  assert resumed["privacy"]["ledger"] == full["privacy"]["ledger"]
  # A run whose checkpoints lost their secret cannot resume as itself.
  (tmp_path / "resumed" / artifacts.CHECKPOINTS /
   noise_secret.SECRET_FILE).unlink()
  with pytest.raises(C.ConfigError, match="no noise_secret"):
    loop.Simulation(config, tmp_path / "resumed")


@pytest.mark.slow
def test_a_restart_before_the_first_checkpoint_keeps_its_settings(tmp_path):
  # Killed after round 1, before any checkpoint: the secret stays (the rerun
  # repeats the same noise), so a rerun with other noise settings, or
  # another --rounds that changes the calibration, is refused.
  config = dataclasses.replace(TINY, checkpoint_every=5,
                               federated=dataclasses.replace(
                                   TINY.federated, rounds=3))
  killed = dataclasses.replace(config, stop_after_rounds=1)
  loop.train_and_evaluate(killed, tmp_path)
  assert not any(p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir())
  louder = dataclasses.replace(config, privacy=dataclasses.replace(
      config.privacy, noise_multiplier=2.0))
  with pytest.raises(C.ConfigError, match="noise secret of a run with other"):
    loop.Simulation(louder, tmp_path)
  calibrated = dataclasses.replace(config, privacy=C.PrivacyConfig())
  loop.train_and_evaluate(
      dataclasses.replace(calibrated, stop_after_rounds=1), tmp_path / "c")
  longer = dataclasses.replace(calibrated, federated=dataclasses.replace(
      calibrated.federated, rounds=4))
  with pytest.raises(C.ConfigError, match="--rounds"):
    loop.Simulation(longer, tmp_path / "c")
  # The same flags go on (and a performance flag may change).
  loop.Simulation(dataclasses.replace(
      config, performance=C.PerformanceConfig(chunk_size=2)), tmp_path)


@pytest.mark.slow
def test_noise_seed_runs_repeat_and_default_runs_do_not(tmp_path):
  seeded = dataclasses.replace(TINY, noise_seed=3)
  one = _one_round_update(seeded, tmp_path / "s1")
  two = _one_round_update(seeded, tmp_path / "s2")
  np.testing.assert_array_equal(one, two)
  assert not (tmp_path / "s1" / artifacts.CHECKPOINTS /
              noise_secret.SECRET_FILE).exists()
  a = _one_round_update(TINY, tmp_path / "d1")
  b = _one_round_update(TINY, tmp_path / "d2")
  assert not np.array_equal(a, b)
  # The model's initialisation is public and follows --seed alone.
  sims = [loop.Simulation(c, tmp_path / n) for c, n in (
      (TINY, "i1"), (seeded, "i2"))]
  for x, y in zip(jax.tree.leaves(sims[0].initial_params),
                  jax.tree.leaves(sims[1].initial_params)):
    np.testing.assert_array_equal(x, y)


def test_noise_seed_is_stated_and_old_configs_read_as_their_seed():
  seeded = dataclasses.replace(TINY, noise_seed=0)
  text = noise_secret.statement(seeded)
  assert "--noise_seed=0" in text and "must not both be released" in text
  # A config written before --noise_seed existed drew its noise from --seed.
  old = TINY.to_dict()
  del old["noise_seed"]
  old["seed"] = 5
  assert config_flags.config_from_dict(old).noise_seed == 5
  assert config_flags.config_from_dict(TINY.to_dict()).noise_seed is None
  with pytest.raises(C.ConfigError, match="--noise_seed"):
    config_flags.config_from_values({"noise_seed": -1})


def test_a_noise_seed_root_is_the_seed_key_and_a_secret_root_is_not():
  seeded = dataclasses.replace(TINY, noise_seed=7, sweep_member=2)
  root = noise_secret.noise_root(seeded, pathlib.Path("/nonexistent"))
  want = jax.random.fold_in(jax.random.key(7), 2)
  np.testing.assert_array_equal(jax.random.key_data(root),
                                jax.random.key_data(want))

"""The public surface of fedjax_seg.privacy and its import isolation."""

import pathlib
import subprocess
import sys

import jax
import numpy as np

import fedjax_seg.privacy as privacy
import pytest

from tests import test_docs

REPO = pathlib.Path(__file__).resolve().parents[2]

CONTRACT = [
    "clipped_grad", "ClipStats", "gaussian_noise", "GaussianNoiseState",
    "constant_schedule", "linear_schedule", "exponential_decay",
    "cosine_decay_schedule", "step_schedule", "warmup_schedule",
    "calibrate_noise_multiplier", "calibrate_site_noise_multipliers",
    "AdaptiveClipping", "PrivacyLedger", "derive_key", "Purpose",
]


def test_contract_names_exist():
  missing = [n for n in CONTRACT if not hasattr(privacy, n)]
  assert not missing


@pytest.mark.slow
def test_privacy_imports_nothing_from_the_rest_of_the_project():
  code = (
      "import sys; from fedjax_seg import privacy; "
      "bad = sorted(m for m in sys.modules if m.startswith(("
      "'fedjax_seg.models', 'fedjax_seg.data', 'fedjax_seg.federated', "
      "'fedjax_seg.run', 'fedjax_seg.segmentation', 'fedjax_seg.attacks', "
      "'fedjax_seg.xla_cpu', 'fedjax_seg.verifier', 'flax', 'tensorflow', "
      "'torch'))); "
      "print(bad); assert not bad, bad")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=REPO, check=False)
  assert result.returncode == 0, result.stdout + result.stderr


def test_public_docstrings_state_formal_guarantees():
  for name in ["clipped_grad", "gaussian_noise", "calibrate_noise_multiplier",
               "AdaptiveClipping", "PrivacyLedger"]:
    doc = getattr(privacy, name).__doc__
    assert "Formal guarantees" in doc, name
    assert "Example" in doc, name


def test_readme_privacy_example_runs():
  """The README's 'own JAX code' example is executed as written."""
  [code] = [code for language, code, _ in test_docs.blocks(REPO / "README.md")
            if language == "python"]
  assert len(code.strip().splitlines()) <= 30
  namespace = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert 0 < namespace["ledger"].epsilon("hospital_a") < 10
  # An overflowing sample keeps a uniformly random subset of the sampled rows
  # (what truncation accounting assumes), not the lowest indices: with an
  # expected batch of 1 and 2 slots, look at the samples of 3 or more rows.
  namespace["batch"] = 1
  sample = jax.jit(namespace["sample"])
  kept_lowest, overflows = 0, 0
  for i in range(400):
    k = jax.random.key(i)
    idx, is_padding = map(np.asarray, sample(k))
    take = np.asarray(jax.random.bernoulli(jax.random.split(k)[0], 1 / 1000,
                                           (1000,)))
    assert set(idx[~is_padding]) <= set(np.flatnonzero(take))
    if take.sum() > 2:
      overflows += 1
      assert len(idx[~is_padding]) == 2
      kept_lowest += set(idx) == set(np.flatnonzero(take)[:2])
  assert overflows >= 10 and kept_lowest < overflows / 2
  # The example's ledger recomputes with the independent verifier, and a
  # tampered one does not.
  from fedjax_seg.privacy import verify  # pylint: disable=g-import-not-at-top
  dump = namespace["ledger"].to_dict()
  result = verify.verify_report(dump)
  assert result.ok and result.num_events == 200, result.problems
  dump["sites"]["hospital_a"]["epsilon"] *= 0.99
  result = verify.verify_report(dump)
  assert not result.ok and "hospital_a" in result.problems[0]

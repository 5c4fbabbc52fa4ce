"""One flag definition for simulate and sweep: types, values, flagfiles."""

import re
import subprocess
import sys

from absl import flags
import pytest

from fedjax_seg.run import config as config_lib
from fedjax_seg.run import config_syntax
from fedjax_seg.run import config_flags

from tests.experiments.test_simulate import REPO


def _values(argv):
  values = flags.FlagValues()
  config_flags.define_config_flags(values)
  values(["prog"] + argv)
  return values


def test_types_come_from_the_type_hints():
  specs = config_flags.SPECS
  assert specs["image_size"].kind is int and not specs["image_size"].optional
  assert specs["target_epsilon"].kind is float and specs["target_epsilon"].optional
  assert specs["dp"].kind is bool and specs["dp"].field == "enabled"
  assert specs["model"].field == "preset" and specs["model"].section == "model"
  assert specs["held_out_sites"].kind == tuple[str, ...]
  assert specs["seed"].section is None


def test_flags_build_the_config():
  config = config_flags.config_from_flags(_values(
      ["--rounds=3", "--nodp", "--target_epsilon=none", "--held_out_sites=a,b",
       "--split_fractions=0.6,0.2,0.2", "--data_seed=4"]))
  assert config.federated.rounds == 3 and not config.privacy.enabled
  assert config.privacy.target_epsilon is None
  assert config.data.held_out_sites == ("a", "b")
  assert config.data.split_fractions == (0.6, 0.2, 0.2)
  assert config.data_seed == 4 and config.seed == 0



def test_default_flagfile_is_the_default_config():
  """README: the default simulation is the same with or without default.flags,
  and the reference flagfiles differ from it only where they say."""
  flagfile = REPO / "experiments" / "flags" / "default.flags"
  default = config_flags.config_from_flags(_values([]))
  assert config_flags.config_from_flags(
      _values([f"--flagfile={flagfile}"])) == default
  assert (default.federated.batch_size, default.federated.local_steps,
          default.federated.learning_rate, default.federated.ema_decay) == (
              16, 1, 0.25, 0.9)
  nonprivate = config_flags.config_from_flags(_values(
      [f"--flagfile={REPO / 'experiments' / 'flags' / 'nonprivate.flags'}"]))
  assert not nonprivate.privacy.enabled
  assert (nonprivate.federated.batch_size, nonprivate.federated.local_steps,
          nonprivate.federated.learning_rate,
          nonprivate.federated.ema_decay) == (4, 2, 0.5, 0.0)

def test_flagfile_round_trip(tmp_path):
  config = config_flags.config_from_values(dict(
      rounds=4, dp=False, learning_rate=0.125, held_out_sites=("x",),
      sweep_member=3, chunk_size=None, target_epsilon=1.5))
  path = tmp_path / "flags.txt"
  path.write_text(config_flags.to_flagfile(config))
  assert config_flags.config_from_flags(_values([f"--flagfile={path}"])) == (
      config)
  assert config_flags.config_from_values(
      config_flags.config_to_values(config)) == config


@pytest.mark.parametrize("name,value,flag", [
    ("image_size", "big", "--image_size"), ("dp", "maybe", "--dp"),
    ("rounds", 2.5, "--rounds"), ("rounds", "none", "--rounds"),
    ("nonexistent", 1, "--nonexistent")])
def test_bad_values_name_the_flag(name, value, flag):
  with pytest.raises(config_lib.ConfigError, match=flag):
    config_flags.config_from_values({name: value})


@pytest.mark.slow
def test_simulate_and_sweep_list_the_same_flags():
  def listed(module):
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"],
                         cwd=REPO, capture_output=True, text=True, check=False)
    assert "--workdir" in out.stdout, out.stderr[-1000:]
    return set(re.findall(r"^\s+(?:-\S+,)?--(?:\[no\])?([a-z_0-9]+)",
                          out.stdout, re.M))
  simulate, sweep = listed("experiments.simulate"), listed("experiments.sweep")
  assert set(config_flags.SPECS) <= simulate
  assert sweep - simulate == {"sweep", "sweep_file", "member_backend",
                              "nonprivate_reference"}
  # Several hosts (jax.distributed) are for simulate; sweeps run on one.
  assert simulate - sweep == {"coordinator_address", "num_processes",
                              "process_id"}


def test_the_configs_vocabularies_are_the_librarys():
  # The configuration imports nothing of the library: its vocabularies are
  # written out, and must stay the library's.
  from fedjax_seg import privacy  # pylint: disable=g-import-not-at-top
  from fedjax_seg.data import augment  # pylint: disable=g-import-not-at-top
  from fedjax_seg.federated import client  # pylint: disable=g-import-not-at-top
  from fedjax_seg.federated import rounds  # pylint: disable=g-import-not-at-top
  from fedjax_seg.models import unet  # pylint: disable=g-import-not-at-top
  from fedjax_seg.privacy import schedules  # pylint: disable=g-import-not-at-top
  assert config_syntax.PRIVACY_UNITS == privacy.units.UNITS
  assert config_syntax.UNET_PRESETS == tuple(unet.PRESETS)
  assert config_syntax.NORMS == tuple(unet.NORMS)
  assert config_syntax.PARAM_GROUPS == tuple(unet.PARAM_GROUPS)
  assert config_syntax.AUGMENTATIONS == augment.AUGMENTATIONS
  assert config_syntax.LOCAL_OPTIMIZERS == client.LOCAL_OPTIMIZERS
  assert config_syntax.LOCAL_LOOPS == client.LOCAL_LOOPS
  assert config_syntax.PER_EXAMPLE_GRADS == client.PER_EXAMPLE_GRADS
  assert config_syntax.BACKENDS == rounds.BACKENDS
  assert config_syntax.NOISE_SCHEDULES == schedules.SHAPES
  from fedjax_seg.privacy import correlated  # pylint: disable=g-import-not-at-top
  from fedjax_seg.verifier import correlated as verifier_correlated  # pylint: disable=g-import-not-at-top
  assert config_syntax.NOISE_MECHANISMS == correlated.MECHANISMS
  assert config_syntax.NOISE_MECHANISMS == verifier_correlated.MECHANISMS
  assert config_syntax.ADAPTIVE_MODES == ("off",) + privacy.adaptive_clipping.MODES
  assert config_syntax.AUDIT_CANARY_KINDS == privacy.auditing.KINDS

"""Shared pytest setup.

Tests run on the CPU. Multi-device tests start their own subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8, which must be set before
jax is imported, so it is not set here.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Runs started by the tests share one persistent compilation cache, kept out
# of the user's home.
os.environ.setdefault("FEDJAX_SEG_COMPILATION_CACHE", os.path.join(
    tempfile.gettempdir(), f"fedjax_seg_test_jax_cache_{os.getuid()}"))

from hypothesis import settings  # pylint: disable=g-import-not-at-top

# Deterministic, bounded property tests: the same examples on every run.
settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")

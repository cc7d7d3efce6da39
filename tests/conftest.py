"""Test-wide setup: float64 must be available for the reference comparisons."""

import os

# Tests compile many tiny programs: XLA's backend optimisation passes cost far
# more than they save at these sizes (about 3x less compile time on CPU).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

# The suite runs on the CPU. With the TPU compiler installed (the `tpu` extra, for
# tests/test_tpu_aot.py) JAX would otherwise probe for a TPU at start-up in every
# process, printing libtpu's warnings into the stderr the tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_enable_x64", True)

import pathlib

import pytest

PUBLISHED_DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "published"


@pytest.fixture
def published_data() -> pathlib.Path:
  """The published G_LM and tokenizer shipped in data/published (Apache-2.0)."""
  return PUBLISHED_DATA

"""Test-wide setup: float64 must be available for the reference comparisons."""

import os

# Tests compile many tiny programs: XLA's backend optimisation passes cost far
# more than they save at these sizes (about 3x less compile time on CPU).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import jax

jax.config.update("jax_enable_x64", True)

import pathlib

import pytest

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.fixture
def shared_data() -> pathlib.Path:
  """../shared/data beside the repo (published G_LM, tokenizer); skip where absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"published reference data not found at {SHARED_DATA} (a user's fresh clone)")
  return SHARED_DATA.resolve()

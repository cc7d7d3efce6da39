"""Test-wide setup: the production dtype, float64 on request, and the two tiers.

* Tests run as production runs: jax_enable_x64 off, so arrays are float32 / bfloat16
  (and int32), whatever JAX_ENABLE_X64 the caller's environment holds.
* A test that compares with a float64 reference (tests/reference.py,
  tests/less_reference.py, plain NumPy float64) in float64 carries the `x64` marker
  (`@pytest.mark.x64`, or `pytestmark = pytest.mark.x64` for a module): its set-up
  (fixtures of every scope it is the first to ask for), call and tear-down run inside
  `jax.enable_x64(True)`, so its arrays are created as float64 from the start.
* The fast tier (`pytest -m "not slow"`) starts no Python process: a test without the
  `slow` marker that starts one (subprocess, multiprocessing, os.fork) fails, naming
  itself.
* XLA compiles the tests' programs at its default optimisation level. The processes
  the slow tests start (training runs, scripts, tests/children/) inherit
  --xla_backend_optimization_level=0 through XLA_FLAGS: they compile whole train and
  decode programs for a few tiny steps each, where the backend passes cost more than
  they save.
"""

import contextlib
import os

# The suite runs on the CPU. With the TPU compiler installed (the `tpu` extra, for
# tests/test_tpu_aot.py) JAX would otherwise probe for a TPU at start-up in every
# process, printing libtpu's warnings into the stderr the tests read.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.pop("JAX_ENABLE_X64", None)  # child processes run in the production dtype too

import jax

jax.config.update("jax_enable_x64", False)
jax.devices()  # this process's backend, created with the caller's XLA_FLAGS

# Only the processes started from here on read this (see the module docstring).
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()

import multiprocessing.process
import pathlib
import subprocess
import sys

import pytest

PUBLISHED_DATA = pathlib.Path(__file__).resolve().parents[1] / "data" / "published"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "x64: runs with jax_enable_x64 on (set-up, call and tear-down), for the "
      "comparisons with the float64 references; every other test runs in the production dtype")


def _x64(item):
  return jax.enable_x64(True) if item.get_closest_marker("x64") else contextlib.nullcontext()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
  with _x64(item):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
  with _x64(item):
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
  with _x64(item):
    return (yield)


def _is_python(argv) -> bool:
  prog = os.fspath(argv if isinstance(argv, (str, bytes, os.PathLike)) else argv[0])
  prog = os.fsdecode(prog).split()[0] if prog else ""
  return (os.path.basename(prog).startswith("python")
          or os.path.realpath(prog) == os.path.realpath(sys.executable))


@pytest.fixture(autouse=True)
def _fast_tier_starts_no_process(request, monkeypatch):
  """A test without the `slow` marker may start no Python process (an interpreter,
  multiprocessing, os.fork). A library running a system tool (ctypes.util.find_library
  runs ldconfig) is allowed."""
  if request.node.get_closest_marker("slow"):
    return

  def refuse():
    raise AssertionError(f"{request.node.nodeid} starts a process: mark it "
                         "@pytest.mark.slow (the fast tier, -m 'not slow', starts none)")
  popen_init = subprocess.Popen.__init__

  def checked_popen(self, args, *rest, **kwargs):
    if _is_python(args):
      refuse()
    popen_init(self, args, *rest, **kwargs)
  monkeypatch.setattr(subprocess.Popen, "__init__", checked_popen)
  monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", lambda self: refuse())
  monkeypatch.setattr(os, "fork", refuse)


@pytest.fixture
def published_data() -> pathlib.Path:
  """The published G_LM and tokenizer shipped in data/published (Apache-2.0)."""
  return PUBLISHED_DATA

"""A persistent XLA compilation cache for the end-to-end runs the tests start.

The end-to-end tests start experiments/pretrain.py (and small scripts) many times with
the same model, optimiser and mesh: a killed run and its resumption, several runs of
one test, the same configuration in several tests. Each process would compile the same
train, eval and init programs again (about half of a tiny run's CPU time). `env()`
points those processes at one on-disk cache, so a later process loads the executable
the first one compiled: the same binary, so the same numbers.

One cache per test process (each pytest-xdist worker has its own), created on first use
and removed at exit: processes never read an entry another worker is still writing (JAX
writes entries in place). Only the environments `env()` returns carry it; os.environ and
the test processes themselves are left alone, so tests that count compilations, or that
time a signal to land during one (tests/test_cli_errors.py), see JAX's usual behaviour.
"""

import atexit
import os
import shutil
import tempfile

_DIR = None


def cache_dir() -> str:
  global _DIR
  if _DIR is None:
    _DIR = tempfile.mkdtemp(prefix="pldr-test-xla-cache-")
    atexit.register(shutil.rmtree, _DIR, ignore_errors=True)
  return _DIR


def env(base: dict | None = None, **extra: str) -> dict:
  """`base` (default os.environ) with JAX_PLATFORMS=cpu, the shared compilation cache
  (every program cached, however fast its compile) and `extra`."""
  out = dict(os.environ if base is None else base)
  out.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache_dir(),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  out.update(extra)
  return out

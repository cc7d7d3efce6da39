"""Which accelerator the code being traced will run on, for the few choices that differ.

Most of pldr-jax is the same program on every backend. A handful of choices
are taken per platform at trace time (each with its evidence in docs/tpu.md
and benchmarks/results/): they ask `platform()`, never `jax.default_backend()`
directly, so that an ahead-of-time compile for a TPU topology on a CPU-only
host (`python -m pldr_jax.aot`) traces the TPU branch:

    with backend.target("tpu"):
      jax.jit(step).lower(...).compile()

Entering or leaving `target` clears JAX's trace caches, so a function traced
for one platform is never reused for another.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator

import jax

__all__ = ["platform", "target", "is_cpu"]

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "pldr_jax_target_platform", default=None)
PLATFORMS = ("cpu", "gpu", "tpu")


def platform() -> str:
  """'cpu', 'gpu' or 'tpu': the `target` in force, else JAX's default backend
  (a CUDA/ROCm backend counts as 'gpu')."""
  t = _TARGET.get()
  if t is not None:
    return t
  b = jax.default_backend()
  return "gpu" if b in ("cuda", "rocm", "gpu") else b


def is_cpu() -> bool:
  """True when the traced code will run on XLA:CPU."""
  return platform() == "cpu"


@contextlib.contextmanager
def target(name: str) -> Iterator[None]:
  """Trace for `name` ('cpu', 'gpu' or 'tpu') inside the block (JAX caches cleared
  on entry and exit)."""
  if name not in PLATFORMS:
    raise ValueError(f"unknown platform {name!r}; one of {PLATFORMS}")
  jax.clear_caches()
  token = _TARGET.set(name)
  try:
    yield
  finally:
    _TARGET.reset(token)
    jax.clear_caches()

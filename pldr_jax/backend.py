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

__all__ = ["platform", "target", "is_cpu", "CHOICES", "choice", "override"]

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


# Each per-platform choice: its value on each platform ('default': any other),
# and where the evidence is. A new platform-specific branch is added here, not as
# a `jax.default_backend()` test in the code.
CHOICES: dict[str, dict[str, object]] = {
    # Attention dots (q G_LM k^T, p v, the LESS slots): upcast bf16 operands to
    # fp32 before the dot ("upcast": XLA:CPU has no bf16 x bf16 -> f32 dot) or feed
    # them as they are with preferred_element_type=float32 ("preferred": the MXU's
    # bf16 inputs, fp32 accumulation; the same products, exact in fp32).
    "attention_dot": {"cpu": "upcast", "default": "preferred"},
    # Decode weights at batch 1 stored output-major (XLA:CPU's vector-matrix
    # product reads them 4-16% faster: benchmarks/results/decode_layout_2026-11-27.md).
    "decode_output_major_b1": {"cpu": True, "default": False},
    # Decode on per-layer weight copies (True; XLA:CPU copies every slice of a
    # stacked weight each step: scan_vs_unrolled_2026-11-27.md) or on the stacked
    # weights, sliced in the step (False; no second copy of the weights in HBM).
    "decode_unstacked_weights": {"cpu": True, "default": False},
    # Order the LESS cache's reads before its in-place slot write through a data
    # dependency (x + 0 * read); XLA:CPU otherwise copied k and v twice per layer.
    "less_ordered_writes": {"cpu": True, "default": True},
}
_OVERRIDES: contextvars.ContextVar[dict] = contextvars.ContextVar(
    "pldr_jax_choice_overrides", default={})


def choice(name: str):
  """The value of a per-platform choice (`CHOICES`) for `platform()`, unless overridden."""
  overrides = _OVERRIDES.get()
  if name in overrides:
    return overrides[name]
  table = CHOICES[name]
  return table.get(platform(), table["default"])


@contextlib.contextmanager
def override(**values) -> Iterator[None]:
  """Force choices inside the block (the A/B compiles of benchmarks/tpu_choices.py);
  JAX caches cleared on entry and exit."""
  unknown = sorted(set(values) - set(CHOICES))
  if unknown:
    raise ValueError(f"unknown choice(s) {unknown}; known: {sorted(CHOICES)}")
  jax.clear_caches()
  token = _OVERRIDES.set({**_OVERRIDES.get(), **values})
  try:
    yield
  finally:
    _OVERRIDES.reset(token)
    jax.clear_caches()

"""Host-process settings: keep the memory XLA:CPU frees for its next call.

XLA:CPU allocates each program's temporaries and outputs from the C heap on
every call and frees them when the call ends. glibc serves large blocks as
fresh `mmap` pages (above its mmap threshold, at most 32 MiB; worker-thread
arenas also for any block larger than their 64 MiB heaps, even with mmap
turned off) and unmaps them on free, so every call touches its buffers' pages
anew. The 110M train step (4 x 256 tokens, fp32) page-faults about 2.9 GiB per
call that way: ~1.5 s of kernel time per step on 2 cores; in steady state the
step takes ~4.1-4.2 s with this setting against ~4.7 s without
(benchmarks/results/host_malloc_2026-11-27.md).

`retain_freed_memory()` makes glibc use one arena, no `mmap` and no trimming,
so that freed blocks are reused and a steady-state step faults no page. The
price: the first two or three steps are slower while the heap grows (~2 s each
at 110M), the process keeps its peak heap until it exits, and that peak can be
higher (PJRT frees a step's buffers just after its outputs are ready, so the
next step's allocations overlap them). It pays off over many calls of the same
program: a training run, and a decode loop, whose step allocates the same
temporaries every token. The bf16-weights 110M decode step is the extreme case:
XLA:CPU upcasts every weight to a fresh fp32 temporary per step, and with the
system allocator it runs ~3x slower (110-119 ms against 35-39 ms at batch 1;
benchmarks/results/host_malloc_2026-11-27.md). The training entry points call it
(experiments/pretrain.py, experiments/train_less.py, benchmarks/train_bench.py),
as does the benchmark suite (benchmarks/run.py); a notebook that decodes should
call it first thing. Evaluation scripts, which make few calls of each program,
do not.
It must run before the first JAX computation: the XLA worker threads pick their
arena on their first allocation. A no-op outside glibc, and when
PLDR_JAX_SYSTEM_MALLOC=1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

__all__ = ["retain_freed_memory", "retained", "OPT_OUT_ENV"]

OPT_OUT_ENV = "PLDR_JAX_SYSTEM_MALLOC"

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

_log = logging.getLogger(__name__)
_applied = False


def _jax_started() -> bool:
  """Whether a JAX backend (and so its worker threads) exists already."""
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # private API moved: assume it has not
    return False


def _glibc():
  name = ctypes.util.find_library("c")
  if name is None:
    return None
  try:
    libc = ctypes.CDLL(name)
  except OSError:
    return None
  return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None


def retain_freed_memory() -> bool:
  """Keep freed heap memory for reuse (see the module docstring).

  Returns True when the setting is in effect (applied now or earlier), False
  when it was not applied: not glibc, opted out with PLDR_JAX_SYSTEM_MALLOC=1,
  or called after JAX started (logged: the running threads keep their arenas).
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
    return False
  libc = _glibc()
  if libc is None:
    return False
  if _jax_started():
    _log.info("retain_freed_memory: JAX has started already; call it before the first JAX "
              "computation for it to take effect")
    return False
  ok = (libc.mallopt(_M_ARENA_MAX, 1) == 1 and libc.mallopt(_M_MMAP_MAX, 0) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, -1) == 1)  # -1: never trim
  _applied = ok
  return ok


def retained() -> bool:
  """Whether `retain_freed_memory` is in effect in this process."""
  return _applied

"""Shared pieces of the benchmark scripts: environment record, machine ceilings,
timing, byte counting.

Every result row carries `environment()` (machine, device, JAX version, date)
so that rows from different machines never mix silently. Absolute times on
shared machines drift; the suite therefore measures the machine's own
ceilings in the same run (`ceilings()`) and reports results as fractions:

  read bandwidth  bytes/s of reading a large array once, the best of
                  * a jitted sum over a 1 GiB float32 array, and
                  * a jitted matrix-vector product with a 1 GiB float32 matrix
                    (the access pattern of batch-1 decode: every weight read once);
  matmul rate     FLOP/s of a jitted float32 [n, n] @ [n, n] product (and bf16).
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax.training import host


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def environment() -> dict:
  dev = jax.devices()[0]
  return {
      "machine": platform.node(),
      "cpu": cpu_model(),
      "cpu_count": os.cpu_count(),
      "platform": dev.platform,
      "device": str(getattr(dev, "device_kind", dev.platform)),
      "num_devices": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
      "python": platform.python_version(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "retain_freed_memory": host.retained(),  # pldr_jax.training.host: freed heap kept for reuse
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib
    return jaxlib.__version__
  except Exception:  # pragma: no cover
    return None


def block(x: Any) -> Any:
  return jax.block_until_ready(x)


def time_calls(fn: Callable[[], Any], n: int, warmup: int = 1) -> list[float]:
  """Seconds of each of n calls of fn() (blocked), after `warmup` untimed calls."""
  for _ in range(warmup):
    block(fn())
  out = []
  for _ in range(n):
    t0 = time.perf_counter()
    block(fn())
    out.append(time.perf_counter() - t0)
  return out


# ----------------------------------------------------------------------------
# Ceilings.

def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict:
  """Bytes/s of reading a `gib` GiB float32 array: jitted sum and matrix-vector product."""
  n = int(gib * 2 ** 30 // 4)
  side = int(math.isqrt(n))
  x = jnp.ones((side * side,), jnp.float32)
  m = x.reshape(side, side)
  v = jnp.ones((side,), jnp.float32)
  nbytes = side * side * 4
  f_sum = jax.jit(jnp.sum)
  f_mv = jax.jit(lambda a, b: a @ b)
  t_sum = min(time_calls(lambda: f_sum(x), repeats))
  t_mv = min(time_calls(lambda: f_mv(m, v), repeats))
  # numpy on the same buffer: a second opinion that does not depend on XLA's threading.
  xn = np.ones((side * side,), np.float32)
  t_np = min(time_calls(lambda: xn.sum(), repeats))
  del x, m, xn
  rates = {"sum": nbytes / t_sum, "matvec": nbytes / t_mv, "numpy_sum": nbytes / t_np}
  return {"bytes": nbytes, "bytes_per_s": max(rates.values()),
          "by_method": rates, "best_method": max(rates, key=rates.get)}


def matmul_rate(n: int = 4096, repeats: int = 3) -> dict:
  """FLOP/s of a jitted [n, n] @ [n, n] product in float32 and bfloat16."""
  out = {"n": n}
  key = jax.random.key(0)
  f = jax.jit(lambda a, b: a @ b)
  for dtype in ("float32", "bfloat16"):
    a = jax.random.normal(key, (n, n), jnp.float32).astype(dtype)
    t = min(time_calls(lambda: f(a, a), repeats))
    out[dtype] = 2.0 * n ** 3 / t
  out["flops_per_s"] = out["float32"]
  return out


def ceilings(gib: float = 1.0, n: int = 2048, repeats: int = 5, gpu: bool = False) -> dict:
  """Read bandwidth of a `gib` GiB array and the [n, n] matmul rate (n >= 8192 on a GPU)."""
  return {"read_bandwidth": read_bandwidth(gib, repeats),
          "matmul": matmul_rate(max(n, 8192) if gpu else n, repeats)}

"""Decode weights input-major vs output-major (`decode.decode_params(batch=...)`), 110M.

    python -m benchmarks.decode_layout [--rounds 30] [--length 1024]

Per batch (1 and 8), times the same KV+G decode step at `length` slots, once with
the layers' kernels input-major ([N, M], decode_params without batch) and once
output-major ([M, N], what decode_params(batch=1) gives on CPU), alternating
step by step (medians of `rounds`), and checks both give the same logits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import decode_bench
from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax.params import init_params


def run(batch: int, length: int, rounds: int) -> dict:
  c = cfg.pldrv51_110m()
  p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
  plain = decode.decode_params(p, c)
  major = decode.decode_params(p, c, batch=1)  # output-major (on CPU) whatever `batch` is
  if "kernel_t" not in major["layers"][0]["wo"]:
    raise SystemExit(f"decode_params(batch=1) is input-major on {jax.default_backend()}")
  toks = jnp.ones((batch, 16), jnp.int32)
  at = jnp.full((batch,), length - rounds - 10, jnp.int32)
  _, gcache = decode_bench.full_cache_at(p, toks, c, length, at)
  fresh = lambda: decode_bench.full_cache_at(p, toks, c, length, at)[0]
  tok = jnp.ones((batch,), jnp.int32)
  weights, states, times = [plain, major], [fresh(), fresh()], [[], []]
  for r in range(rounds + 3):
    for i in range(2):
      t0 = time.perf_counter()
      logits, states[i] = decode.decode_step_jit(weights[i], gcache, states[i], tok, config=c)
      logits.block_until_ready()
      if r >= 3:
        times[i].append(time.perf_counter() - t0)
  a, _ = decode.decode_step_jit(plain, gcache, fresh(), tok, config=c)
  b, _ = decode.decode_step_jit(major, gcache, fresh(), tok, config=c)
  ms = [1e3 * float(np.median(t)) for t in times]
  return {"batch": batch, "length": length, "rounds": rounds, "input_major_ms": ms[0],
          "output_major_ms": ms[1], "output_over_input": ms[1] / ms[0],
          "max_abs_logit_diff": float(jnp.max(jnp.abs(a - b)))}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=30)
  ap.add_argument("--length", type=int, default=1024)
  a = ap.parse_args(argv)
  for batch in (1, 8):
    print(json.dumps(run(batch, a.length, a.rounds)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

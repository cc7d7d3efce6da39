#!/usr/bin/env python
"""Time one decode step of a preset with and without the G-cache, and SDPA.

python benchmarks/decode_step.py --preset pldrv51_110m --batch 1 --prompt 128 --steps 20
Writes a JSON row to benchmarks/results/ (machine, device, JAX version, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import config as cfg, decode, model


def time_decode(c, batch, prompt, steps, g_cache, cache_len):
  params = jax.jit(model.init_params, static_argnums=0)(c, jax.random.key(0))
  toks = jnp.asarray(np.random.default_rng(0).integers(4, c.vocab_size, (batch, prompt)), jnp.int32)
  lens = jnp.full((batch,), prompt, jnp.int32)
  _, state, gcache = decode.prefill_jit(params, toks, lens, config=c, cache_len=cache_len,
                                        g_cache=g_cache)
  tok = toks[:, -1]
  t0 = time.perf_counter()
  logits, state = decode.decode_step_jit(params, gcache, state, tok, config=c, g_cache=g_cache)
  jax.block_until_ready(logits)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    logits, state = decode.decode_step_jit(params, gcache, state, tok, config=c, g_cache=g_cache)
    jax.block_until_ready(logits)
    times.append(time.perf_counter() - t0)
  return {"median_ms": 1e3 * float(np.median(times)), "min_ms": 1e3 * float(np.min(times)),
          "first_call_s": compile_s}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="pldrv51_110m")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--cache_len", type=int, default=None)
  ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
  args = ap.parse_args()
  base = cfg.preset(args.preset)
  cache_len = args.cache_len or base.max_len
  rows = []
  for name, c, g_cache in (("kv+g-cache", base, True), ("kv-cache, G recomputed", base, False),
                           ("sdpa (identity G)", base.replace(g_mode="identity"), True)):
    r = time_decode(c, args.batch, args.prompt, args.steps, g_cache, cache_len)
    r.update(mode=name)
    rows.append(r)
    print(f"{name:24s} median {r['median_ms']:.2f} ms/step  min {r['min_ms']:.2f}  "
          f"(first call {r['first_call_s']:.1f} s)")
  record = {"benchmark": "decode_step", "preset": args.preset, "batch": args.batch,
            "prompt": args.prompt, "cache_len": cache_len, "rows": rows,
            "machine": platform.node(), "cpu_count": __import__("os").cpu_count(),
            "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  path = out / f"decode_step_{args.preset}_b{args.batch}_{record['date'][:19].replace(':', '')}.json"
  path.write_text(json.dumps(record, indent=1))
  print(f"wrote {path}")


if __name__ == "__main__":
  main()

"""Scanned vs unrolled layers: compile times and step times at 110M (fp32).

  python -m benchmarks.scan_vs_unrolled [--preset pldrv51_110m] [--out FILE.json]

Each measurement runs in a fresh process (compile times without a warm cache):
  * train step 4 x 256 + AdamW (benchmarks/train_bench.py), PLDRConfig.scan_layers
    True / False;
  * prefill of 128 tokens into a 1024-slot cache, scan / unrolled;
  * one decode step (batch 1 and 8, 1024-slot cache, G-cache) on the stacked
    weights (every layer's weights sliced inside the step) and on per-layer
    weights (pldr_jax.inference.decode.decode_params, taken apart once).
Prints one JSON record (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _decode_part(preset: str, variant: str, batch: int, steps: int = 30) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from pldr_jax import config as cfg
  from pldr_jax.inference import decode
  from pldr_jax.params import init_params

  c = cfg.preset(preset, scan_layers=variant != "unrolled")
  p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
  toks = jnp.ones((batch, 128), jnp.int32)
  lens = jnp.full((batch,), 128, jnp.int32)
  t0 = time.perf_counter()
  lowered = decode.prefill_jit.lower(p, toks, lens, config=c, cache_len=1024)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  _, st, gc = compiled(p, toks, lens)
  jax.block_until_ready(st)
  pre = []
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(compiled(p, toks, lens))
    pre.append(time.perf_counter() - t)
  row = {"variant": variant, "batch": batch, "prefill_lower_s": t1 - t0,
         "prefill_compile_s": t2 - t1, "prefill_s": float(np.median(pre))}
  t0 = time.perf_counter()
  sp = p if variant == "stacked" else jax.block_until_ready(
      jax.jit(decode.decode_params, static_argnums=(1,))(p, c))
  row["decode_params_s"] = time.perf_counter() - t0
  tok = jnp.ones((batch,), jnp.int32)
  t0 = time.perf_counter()
  lowered = decode.decode_step_jit.lower(sp, gc, st, tok, config=c)
  t1 = time.perf_counter()
  lowered.compile()
  row.update(decode_lower_s=t1 - t0, decode_compile_s=time.perf_counter() - t1)
  lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
  jax.block_until_ready(lg)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
    jax.block_until_ready(lg)
    times.append(time.perf_counter() - t)
  row.update(decode_step_ms=1e3 * float(np.median(times)),
             decode_step_min_ms=1e3 * float(np.min(times)),
             decode_tok_per_s=batch / float(np.median(times)))
  return row


def _sub(args: list[str], timeout: int = 900) -> dict:
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout)
  if out.returncode:
    raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-2000:]}")
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="pldrv51_110m")
  ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--train_steps", type=int, default=3)
  ap.add_argument("--skip_train", action="store_true")
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  if a.part == "decode":
    print("RESULT " + json.dumps(_decode_part(a.preset, a.variant, a.batch)))
    return 0
  from benchmarks import common
  record = {"preset": a.preset, "environment": common.environment(), "decode": [], "train": []}
  for batch in (1, 8):
    for variant in ("per_layer", "stacked", "unrolled"):
      row = _sub(["-m", "benchmarks.scan_vs_unrolled", "--preset", a.preset, "--part",
                  "decode", "--variant", variant, "--batch", str(batch)])
      print(json.dumps(row), flush=True)
      record["decode"].append(row)
  if not a.skip_train:
    for unrolled in (False, True):
      args = ["-m", "benchmarks.train_bench", "--preset", a.preset, "--batch", "4", "--seq",
              "256", "--steps", str(a.train_steps)] + (["--unrolled"] if unrolled else [])
      row = _sub(args)
      print(json.dumps({k: row[k] for k in ("scan_layers", "compile_s", "step_s",
                                            "tokens_per_s")}), flush=True)
      record["train"].append(row)
  if a.out:
    Path(a.out).write_text(json.dumps(record, indent=1))
  print("RECORD " + json.dumps(record))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""fp32 and bf16-weights 110M decode steps (KV+G, 1024 tokens) in alternation, in a
process with or without pldr_jax.host.retain_freed_memory():

  python benchmarks/results/host_malloc_2026-11-27/decode_ab.py BATCH [WEIGHTS]  # kept
  PLDR_JAX_SYSTEM_MALLOC=1 python benchmarks/results/host_malloc_2026-11-27/decode_ab.py BATCH

WEIGHTS: comma-separated, default float32,bfloat16. Prints the median of 30 steps
of each (3 untimed rounds first).
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from pldr_jax import host  # noqa: E402

kept = host.retain_freed_memory()  # before JAX starts

import numpy as np  # noqa: E402

from benchmarks import decode_bench  # noqa: E402

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
steps = {}
for weights in (sys.argv[2] if len(sys.argv) > 2 else "float32,bfloat16").split(","):
  case = decode_bench.DecodeCase("pldrv51_110m", "kv+g", batch, 1024, weights, steps=10)
  _, step, state = decode_bench.run_case(case, _build_only=True)
  steps[weights] = [step, state, []]
for r in range(33):
  for s in steps.values():
    t0 = time.perf_counter()
    logits, s[1] = s[0](s[1])
    logits.block_until_ready()
    if r >= 3:
      s[2].append(time.perf_counter() - t0)
print({"batch": batch, "retain_freed_memory": kept,
       **{w: round(1e3 * float(np.median(s[2])), 2) for w, s in steps.items()}})

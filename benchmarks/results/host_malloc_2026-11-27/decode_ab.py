"""fp32 and bf16-weights 110M decode steps (KV+G, 1024 tokens) in alternation, in a
process with or without pldr_jax.training.host.retain_freed_memory():

  PYTHONPATH=. python benchmarks/results/host_malloc_2026-11-27/decode_ab.py BATCH [WEIGHTS]  # kept
  PYTHONPATH=. PLDR_JAX_SYSTEM_MALLOC=1 python benchmarks/results/host_malloc_2026-11-27/decode_ab.py BATCH

WEIGHTS: comma-separated, default float32,bfloat16. Prints the median of 30 steps
of each (3 untimed rounds first).
"""
import sys

from pldr_jax.training import host

kept = host.retain_freed_memory()  # before JAX starts

from benchmarks import decode_bench

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
weights = (sys.argv[2] if len(sys.argv) > 2 else "float32,bfloat16").split(",")
cases = [decode_bench.DecodeCase("pldrv51_110m", "kv+g", batch, 1024, w, steps=10)
         for w in weights]
rows = decode_bench.paired(cases, rounds=30)  # steps alternate, 3 untimed rounds first
print({"batch": batch, "retain_freed_memory": kept,
       **{r["weights"]: round(r["latency_ms"], 2) for r in rows}})

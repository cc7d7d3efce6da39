"""110M fp32 prefill with the LM head over every prompt position against the head at
each prompt's last token only (decode.prefill_jit all_logits=True / False), the two
compiled programs called in alternation in one process, medians.

  python benchmarks/results/prefill_last_logits_2026-11-27/prefill_ab.py S [B] [ROUNDS]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax.params import init_params

S = int(sys.argv[1])
B = int(sys.argv[2]) if len(sys.argv) > 2 else 1
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
c = cfg.pldrv51_110m()
p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
toks = jnp.asarray(np.random.default_rng(0).integers(4, c.vocab_size, (B, S)), jnp.int32)
lens = jnp.full((B,), S, jnp.int32)
run = {name: (lambda a=a: decode.prefill_jit(p, toks, lens, config=c, cache_len=S,
                                             all_logits=a))
       for name, a in (("all positions", True), ("last token", False))}
full, last = (np.asarray(f()[0]) for f in run.values())
print(f"max |logit difference| at the last token: {np.abs(full[:, -1] - last).max():.2e}")
times = {n: [] for n in run}
for r in range(ROUNDS):
  for n in (list(run) if r % 2 == 0 else list(run)[::-1]):
    t = time.perf_counter()
    jax.block_until_ready(run[n]())
    times[n].append(time.perf_counter() - t)
for n, t in times.items():
  print(f"S={S} B={B} head at {n}: {1e3 * np.median(t):.1f} ms (median of {ROUNDS})")

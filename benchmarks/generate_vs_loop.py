#!/usr/bin/env python
"""generate() against a hand-stepped decode loop (greedy), 110M fp32, batch 1.

  python benchmarks/generate_vs_loop.py

128-token prompt, 64 new tokens, best of 3 after compiling; both include the
prefill. Issue 13's goal: generate within 5% of the loop for greedy decoding.
Run it with PYTHONPATH at an older checkout to measure that code.
"""
import time, sys, jax, jax.numpy as jnp, numpy as np
from pldr_jax import config, model, generate, decode
c = config.pldrv51_110m()
p = model.init_params(c, jax.random.key(0))
prompt = np.random.default_rng(0).integers(4, c.vocab_size, 128).tolist()
N = 64
def gen():
  out = generate.generate(p, [prompt], config=c, max_new_tokens=N)
  return out
sp = decode.decode_params(p, c)  # per-layer weights, once (generate slices them per call)
def hand():
  toks = jnp.asarray([prompt], jnp.int32); lens = jnp.asarray([128], jnp.int32)
  cl = generate.auto_cache_len(128, N, c)
  lg, st, gc = decode.prefill_jit(p, toks, lens, config=c, cache_len=cl)
  tok = jnp.argmax(lg[:, -1], -1).astype(jnp.int32)
  outs = []
  for _ in range(N):
    outs.append(tok)
    lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
    tok = jnp.argmax(lg, -1).astype(jnp.int32)
  return np.asarray(jnp.stack(outs, 1))
for f in (gen, hand): f()  # compile
res = {}
for rep in range(3):
  for name, f in (("generate", gen), ("hand", hand)):
    t = time.perf_counter(); r = f(); jax.block_until_ready(r) if not isinstance(r, list) else None
    res.setdefault(name, []).append(time.perf_counter() - t)
for k, v in res.items():
  print(f"{k}: best {min(v):.3f}s -> {N/min(v):.1f} tok/s (incl. prefill)")
print("ratio generate/hand tok/s:", min(res['hand'])/min(res['generate']))

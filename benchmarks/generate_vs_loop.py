#!/usr/bin/env python
"""generate() against a hand-stepped decode loop, 110M fp32, batch 1.

  python -m benchmarks.generate_vs_loop

128-token prompt, 64 new tokens, best of 3 after compiling; both include the
prefill. Two sampling paths: greedy, and temperature 0.8 with top-k 40 and
top-p 0.95 (the hand loop samples with the same jitted `sample_logits`).
Issue 13's goals: generate within 5% of the loop for greedy decoding, within
15% with top-k / top-p. Run it with PYTHONPATH at an older checkout to measure
that code (the sampled path needs a checkout that has SamplingConfig.path).
"""
import time

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import config
from pldr_jax.inference import decode, generate
from pldr_jax.params import init_params

c = config.pldrv51_110m()
p = init_params(c, jax.random.key(0))
prompt = np.random.default_rng(0).integers(4, c.vocab_size, 128).tolist()
N = 64
sp = decode.decode_params(p, c, batch=1)  # per-layer weights, once, as generate lays them out
SAMPLINGS = {"greedy": generate.SamplingConfig(),
             "top-k/top-p": generate.SamplingConfig(temperature=0.8, top_k=40, top_p=0.95)}


def gen(s):
  return generate.generate(p, [prompt], config=c, max_new_tokens=N, sampling=s,
                           key=jax.random.key(0))


def hand(s):
  toks = jnp.asarray([prompt], jnp.int32)
  lens = jnp.asarray([128], jnp.int32)
  cl = generate.auto_cache_len(128, N, c)
  key = jax.random.key(0)
  arrays = s.as_arrays()
  lg, st, gc = decode.prefill_jit(p, toks, lens, config=c, cache_len=cl, all_logits=False)
  tok = generate._sample_jit(lg, jax.random.fold_in(key, 0), arrays, s.path)
  outs = []
  for i in range(N):
    outs.append(tok)
    lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
    tok = generate._sample_jit(lg, jax.random.fold_in(key, i + 1), arrays, s.path)
  return np.asarray(jnp.stack(outs, 1))


for name, s in SAMPLINGS.items():
  assert gen(s)[0] == hand(s)[0].tolist(), name  # same tokens (and compiles both)
  res = {}
  for rep in range(3):
    for label, f in (("generate", gen), ("hand", hand)):
      t = time.perf_counter()
      jax.block_until_ready(f(s)) if label == "hand" else f(s)
      res.setdefault(label, []).append(time.perf_counter() - t)
  for k, v in res.items():
    print(f"{name} {k}: best {min(v):.3f}s -> {N / min(v):.1f} tok/s (incl. prefill)")
  print(f"{name} ratio generate/hand tok/s: {min(res['hand']) / min(res['generate']):.3f}")

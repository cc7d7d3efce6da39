#!/usr/bin/env python
"""generate() and stream() against hand-stepped decode loops, 110M fp32, batch 1.

  python -m benchmarks.generate_vs_loop

128-token prompt, 64 new tokens, best of 3 after compiling, the runs
alternating; all include the prefill. Two sampling paths: greedy, and
temperature 0.8 with top-k 40 and top-p 0.95 (the hand loop samples with
`sample_logits`, jitted). Rows: `generate` (one while_loop), `stream` (the same
sampling step from Python), `hand` (prefill_jit + decode_step_jit on
`decode_params(p, c, batch=1)`, as generate lays the weights out), and, greedy
only, `readme` (the README's hand loop as written: `decode_params(params, cfg)`,
argmax).
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
sample = jax.jit(generate.sample_logits, static_argnames=("path",))
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
  tok = sample(lg, jax.random.fold_in(key, 0), arrays["temperature"], arrays["top_p"], s.path)
  outs = []
  for i in range(N):
    outs.append(tok)
    if i + 1 < N:
      lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
      tok = sample(lg, jax.random.fold_in(key, i + 1), arrays["temperature"], arrays["top_p"],
                   s.path)
  return np.asarray(jnp.stack(outs, 1))


def readme(s):
  """The README's hand loop, as written (greedy)."""
  logits, kv, gcache = decode.prefill_jit(p, jnp.array([prompt]), jnp.array([128]), config=c,
                                          cache_len=generate.auto_cache_len(128, N, c),
                                          all_logits=False)
  step_params = decode.decode_params(p, c)
  tokens = []
  for i in range(N):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.append(int(tok[0]))
    if i < N - 1:
      logits, kv = decode.decode_step_jit(step_params, gcache, kv, tok, config=c)
  return np.asarray([tokens])


def streamed(s):
  return np.stack(list(generate.stream(p, [prompt], config=c, max_new_tokens=N, sampling=s,
                                       key=jax.random.key(0))), 1)


for name, s in SAMPLINGS.items():
  runs = {"generate": gen, "stream": streamed, "hand": hand}
  if name == "greedy":
    runs["readme"] = readme
  want = gen(s)[0]
  for label, f in runs.items():  # same tokens (and compiles each)
    got = list(np.asarray(f(s)[0]).tolist())
    assert got[:len(want)] == want, (name, label)
  res = {}
  for rep in range(3):
    for label, f in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(f(s))
      res.setdefault(label, []).append(time.perf_counter() - t)
  for k, v in res.items():
    print(f"{name} {k}: best {min(v):.3f}s -> {N / min(v):.1f} tok/s (incl. prefill)")
  for label in runs:
    print(f"{name} ratio {label}/generate tok/s: {min(res['generate']) / min(res[label]):.3f}")

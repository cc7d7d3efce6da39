"""Compilation counts and compile times of the decode path.

`generate_counts` decodes prompts of assorted lengths with
pldr_jax.inference.generate.generate and counts how many times the one-program
generate function was compiled (the jit cache of pldr_jax.inference.generate.generate_tokens): prompts are
right-padded to power-of-two length buckets, so the count must equal the
number of distinct buckets the prompts fall in, not the number of prompts.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from pldr_jax import config as cfg
from pldr_jax.inference import generate as gen
from pldr_jax.params import init_params


def generate_counts(preset: str = "tiny", num_prompts: int = 20, max_len: int = 512,
                    max_new_tokens: int = 8, seed: int = 0) -> dict:
  c = cfg.preset(preset).replace(max_len=max_len)
  params = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, max_len - max_new_tokens, num_prompts)
  buckets = gen.default_buckets(c.max_len)
  used = sorted({gen.bucket_length(int(n), buckets) for n in lengths})
  # from a cold cache: programs another caller in this process compiled (a test with
  # the same config and buckets) would otherwise go uncounted
  gen.generate_tokens.clear_cache()
  before = gen.generate_tokens._cache_size()
  t0 = time.perf_counter()
  per_prompt = []
  for n in lengths:
    prompt = rng.integers(4, c.vocab_size, int(n)).tolist()
    t1 = time.perf_counter()
    gen.generate(params, [prompt], config=c, max_new_tokens=max_new_tokens,
                 sampling=gen.SamplingConfig(temperature=0.0), key=jax.random.key(0))
    per_prompt.append(time.perf_counter() - t1)
  traces = gen.generate_tokens._cache_size() - before
  return {"preset": preset, "max_len": max_len, "num_prompts": num_prompts,
          "prompt_lengths": [int(n) for n in lengths], "buckets_used": used,
          "num_buckets_used": len(used), "compilations": traces,
          "ok": traces == len(used), "total_s": time.perf_counter() - t0,
          "per_prompt_s": per_prompt}

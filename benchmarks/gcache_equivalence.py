#!/usr/bin/env python
"""Measure cached-vs-uncached differences (closing-note numbers for the core issue).

python -m benchmarks.gcache_equivalence [--preset tiny|pldrv51_110m] [--dtype float64]
Prints, for decode with the G-cache on and off: max |logit| difference to the
full forward run with the prompt's G_LM, and the largest difference between
the on/off runs' per-head RMSE and determinant of G_LM.
"""

import argparse

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np

from pldr_jax import config as cfg, model
from pldr_jax.inference import decode
from pldr_jax.params import init_params


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--dtype", default="float64")
  ap.add_argument("--prompt", type=int, default=12)
  ap.add_argument("--steps", type=int, default=8)
  a = ap.parse_args()
  c = cfg.preset(a.preset, param_dtype=a.dtype, compute_dtype=a.dtype)
  p = init_params(c, jax.random.key(0))
  n = a.prompt + a.steps
  t = jnp.asarray(np.random.default_rng(0).integers(4, c.vocab_size, (1, n)), jnp.int32)
  fwd = jax.jit(model.forward, static_argnames=("config", "return_aux"))
  step = jax.jit(decode.decode_step, static_argnames=("config", "g_cache", "return_deductive"))
  res = {}
  for g_cache in (True, False):
    _, st, gc = decode.prefill_jit(p, t[:, :a.prompt], jnp.array([a.prompt], jnp.int32),
                                   config=c, cache_len=n, g_cache=g_cache)
    outs, gs = [], []
    for i in range(a.prompt, n):
      lg, st, ded = step(p, gc, st, t[:, i], config=c, g_cache=g_cache, return_deductive=True)
      outs.append(np.asarray(lg[0], np.float64))
      gs.append(np.stack([np.asarray(d["G_LM"][0], np.float64) for d in ded]))
    res[g_cache] = (np.stack(outs), np.stack(gs))
  _, aux = fwd(p, t[:, :a.prompt], config=c, return_aux=True)
  g_prompt = jnp.stack([x["G_LM"] for x in aux])
  # decode step i consumes token prompt+i and predicts prompt+i+1; forward row prompt+i.
  full, _ = fwd(p, t, config=c, g_lm=g_prompt)
  full = np.asarray(full[0, a.prompt:n], np.float64)
  for g_cache, (outs, gs) in res.items():
    print(f"G-cache {'on ' if g_cache else 'off'}: max |decode logits - forward logits| = "
          f"{np.max(np.abs(outs - full)):.3e} (max |logit| {np.max(np.abs(full)):.2f})")
  (o1, g1), (o0, g0) = res[True], res[False]
  rmse = lambda g: np.sqrt(np.mean(g ** 2, axis=(-1, -2)))
  print(f"on vs off: max |logit diff| = {np.max(np.abs(o1 - o0)):.3e}; "
        f"max |RMSE(G) diff| = {np.max(np.abs(rmse(g1) - rmse(g0))):.3e}; "
        f"max |det(G) diff| / |det| = "
        f"{np.max(np.abs(np.linalg.det(g1) - np.linalg.det(g0)) / np.abs(np.linalg.det(g1))):.3e}")
  print(f"RMSE(G) layer 0 head 0, on/off: {rmse(g1)[0, 0, 0]:.15f} / {rmse(g0)[0, 0, 0]:.15f}")
  print(f"det(G)  layer 0 head 0, on/off: {np.linalg.det(g1)[0, 0, 0]:.15e} / "
        f"{np.linalg.det(g0)[0, 0, 0]:.15e}")


if __name__ == "__main__":
  main()

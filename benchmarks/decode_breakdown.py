"""Where a 110M batch-1 decode step's time goes: its weight reads alone against the step.

    python -m benchmarks.decode_breakdown [--batch 1] [--length 1024]

Times (median of 40 calls, jitted):
  chain  the step's matmuls alone: per layer x @ Wqkv, x @ Wo, x @ W12, x @ W3,
         then the LM head, on `decode.decode_params(batch=B)` weights (the
         bytes a step must read, laid out as generate lays them out);
  head   the LM head matvec alone;
  step   the real `decode.decode_step_jit` with a KV+G cache at `length` slots
         (donated, as generate runs it: written in place, not copied).
Each with GB/s = bytes read / time, and the op count of the compiled step
(fusions, dots: XLA:CPU runs each as a thunk with its own dispatch cost).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, decode_bench
from pldr_jax import config as cfg, nn
from pldr_jax.inference import decode
from pldr_jax.params import init_params


def _median_ms(f, *args, n: int = 40) -> float:
  return 1e3 * float(np.median(common.time_calls(lambda: f(*args), n, warmup=3)))


def _chain(dp: dict, x: jax.Array, d: int, d_ff: int) -> jax.Array:
  """The decode step's matmuls in order, nothing else: [B, d] -> [B, V]."""
  h = x
  for layer in dp["layers"]:
    h = nn.dense(layer["wo"], nn.dense(layer["wqkv"], h)[:, :d])
    a = nn.dense(layer["ffn"]["w12"], h)
    h = nn.dense(layer["ffn"]["w3"], a[:, :d_ff] * a[:, d_ff:])
  return nn.dense(dp["head"], h)


def run(batch: int, length: int) -> dict:
  c = cfg.pldrv51_110m()
  p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
  dp = decode.decode_params(p, c, batch=batch)  # the layout generate uses
  emb = dp["embed"]
  weight_bytes = sum(a.nbytes for a in jax.tree.leaves(dp)) - emb.nbytes
  x = jnp.ones((batch, c.d_model))
  chain_ms = _median_ms(jax.jit(_chain, static_argnums=(2, 3)), dp, x, c.d_model, c.d_ff)
  head = dp["head"]["kernel"]  # input-major at every batch
  head_ms = _median_ms(jax.jit(lambda h, w: h @ w), x, head)

  state, gcache = decode_bench.full_cache_at(p, jnp.ones((batch, 16), jnp.int32), c, length,
                                             jnp.full((batch,), length - 60, jnp.int32))
  tok = jnp.ones((batch,), jnp.int32)
  compiled = decode.decode_step_jit.lower(dp, gcache, state, tok, config=c).compile()
  ops = collections.Counter(re.findall(r"= \S+ (fusion|dot|copy)\(",
                                       compiled.as_text().split("ENTRY")[1]))
  cache = [state]

  def step():  # as generate steps: the KV cache donated, so written in place
    logits, cache[0] = decode.decode_step_jit(dp, gcache, cache[0], tok, config=c)
    return logits

  step_ms = _median_ms(step)
  step_bytes = (weight_bytes + sum(a.nbytes for a in cache[0].k + cache[0].v) + gcache.g_lm.nbytes
                + batch * emb.shape[1] * emb.dtype.itemsize)
  gbs = lambda nbytes, ms: nbytes / ms / 1e6
  return {"batch": batch, "length": length, "chain_ms": chain_ms,
          "chain_gb_s": gbs(weight_bytes, chain_ms), "head_ms": head_ms,
          "head_gb_s": gbs(head.nbytes, head_ms), "step_ms": step_ms,
          "step_gb_s": gbs(step_bytes, step_ms), "step_bytes": step_bytes,
          "weight_bytes": weight_bytes, "compiled_ops": dict(ops)}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--length", type=int, default=1024)
  a = ap.parse_args(argv)
  print(json.dumps(run(a.batch, a.length)))
  return 0


if __name__ == "__main__":
  sys.exit(main())

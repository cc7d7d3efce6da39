"""KV cache [B, H, T, dk] (before, eef0a38) vs [B, H, dk, T] (after), one process,
decode steps alternating between the two compiled programs (this VM's speed drifts
by up to 50% between minutes, so separate processes do not compare).

    python benchmarks/results/kv_layout_2026-11-27/paired.py B:LENGTH ... [--rounds N]

'before' re-traces the step with eef0a38's write and attention (copied below);
both programs get the same weights, G-cache, position and token. Prints one JSON
line per case: median ms of each and the median of the per-round ratios.
"""
import argparse, json, math, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import jax, jax.numpy as jnp, numpy as np
from benchmarks import decode_bench
from pldr_jax import config as cfg, model, nn, plga
from pldr_jax.inference import decode
from pldr_jax.inference.kv_cache import KVCache


def old_write_one(buf, new, pos):  # eef0a38: buf [B, H, T, dk]
  b, h = buf.shape[:2]
  return buf.at[jnp.arange(b)[:, None], jnp.arange(h)[None, :], pos[:, None]].set(
      new.astype(buf.dtype), mode="drop", unique_indices=True)


def old_cached_attention(q, k, v, g, visible):  # eef0a38: k, v [B, H, T, dk]
  ft = nn.upcast(q.dtype)
  qg = plga.apply_g(q[:, None], g)[:, 0].astype(ft)
  logits = jnp.einsum("bhtd,bhd->bht", k.astype(ft), qg) / math.sqrt(q.shape[-1])
  probs = plga.masked_softmax(logits, visible[:, None, :])
  return jnp.einsum("bht,bhtd->bhd", probs.astype(v.dtype), v)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("cases", nargs="+")
  ap.add_argument("--rounds", type=int, default=40)
  a = ap.parse_args()
  c = cfg.pldrv51_110m()
  p = jax.jit(model.init_params, static_argnums=0)(c, jax.random.key(0))
  for spec in a.cases:
    b, length = (int(x) for x in spec.split(":"))
    dp = decode.decode_params(p, c, batch=b)
    _, gc = decode_bench.full_cache_at(p, jnp.ones((b, 16), jnp.int32), c, length,
                                       jnp.full((b,), length - 60, jnp.int32))
    tok = jnp.ones((b,), jnp.int32)
    new_fns = (decode._write_one, plga.cached_attention, KVCache.cache_len)
    old_len = property(lambda self: int(self.k[0].shape[2]))  # eef0a38: T on axis 2
    progs, states = {}, {}
    for side in ("before", "after"):
      decode._write_one, plga.cached_attention, KVCache.cache_len = (
          (old_write_one, old_cached_attention, old_len) if side == "before" else new_fns)
      shape = ((b, c.num_heads, length, c.head_dim) if side == "before"
               else (b, c.num_heads, c.head_dim, length))
      z = lambda: tuple(jnp.zeros(shape) for _ in range(c.num_layers))
      states[side] = KVCache(k=z(), v=z(), lengths=jnp.full((b,), length - 60, jnp.int32))
      fn = jax.jit(lambda dp, g, s, t: decode.decode_step(dp, g, s, t, config=c),
                   donate_argnums=2)
      progs[side] = fn.lower(dp, gc, states[side], tok).compile()
    decode._write_one, plga.cached_attention, KVCache.cache_len = new_fns
    ts = {"before": [], "after": []}
    for r in range(a.rounds):
      for side in ("before", "after") if r % 2 else ("after", "before"):
        t0 = time.perf_counter()
        out = progs[side](dp, gc, states[side], tok)
        jax.block_until_ready(out)
        ts[side].append(time.perf_counter() - t0)
        states[side] = out[1].replace(lengths=jnp.full((b,), length - 60, jnp.int32))
    bt, at = np.array(ts["before"][4:]), np.array(ts["after"][4:])
    print(json.dumps({"batch": b, "length": length, "mode": "kv+g",
                      "before_ms": round(1e3 * np.median(bt), 3),
                      "after_ms": round(1e3 * np.median(at), 3),
                      "after_over_before": round(float(np.median(at / bt)), 3),
                      "rounds": a.rounds}), flush=True)


if __name__ == "__main__":
  main()

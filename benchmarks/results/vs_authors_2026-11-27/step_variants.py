"""The 110M fp32 KV+G decode step at batch B and L cache slots, variants compiled in one
process and their steps alternated (medians, ratio = median of per-round ratios):

  base     the step as it is
  qg_mr    q G_LM as a multiply-reduce (the layer's G-cache slice fuses, no copy)
  prod_mr  the two attention products (q.K, p.V) as multiply-reduce
  no_ynn   the whole step compiled with YNNPACK off (Eigen dots)

  python benchmarks/results/vs_authors_2026-11-27/step_variants.py B L [ROUNDS]
"""
import math
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from benchmarks import decode_bench  # noqa: E402
from pldr_jax import config as cfg, model, nn, plga  # noqa: E402
from pldr_jax.inference import decode

B, L = int(sys.argv[1]), int(sys.argv[2])
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 40
c = cfg.pldrv51_110m()
p = jax.jit(model.init_params, static_argnums=0)(c, jax.random.key(0))
dp = decode.decode_params(p, c, batch=B)
base_attention = plga.cached_attention


def attention(qg_mr: bool, prod_mr: bool):
  def ca(q, k, v, g, visible):
    ft = nn.upcast(q.dtype)
    if qg_mr:
      qg = jnp.sum(q.astype(ft)[..., :, None] * g.astype(ft), axis=-2)
    else:
      qg = plga.apply_g(q[:, None], g)[:, 0].astype(ft)
    if prod_mr:
      logits = jnp.sum(k.astype(ft) * qg[..., None], axis=-2)
    else:
      logits = jnp.einsum("bhdt,bhd->bht", k.astype(ft), qg)
    probs = plga.masked_softmax(logits / math.sqrt(q.shape[-1]), visible[:, None, :])
    if prod_mr:
      return jnp.sum(probs.astype(v.dtype)[:, :, None, :] * v, axis=-1)
    return jnp.einsum("bht,bhdt->bhd", probs.astype(v.dtype), v)
  return ca


variants = {"base": (base_attention, {}), "qg_mr": (attention(True, False), {}),
            "prod_mr": (attention(False, True), {}),
            "no_ynn": (base_attention, {"xla_cpu_experimental_ynn_fusion_type": ""})}
tok = jnp.ones((B,), jnp.int32)
fresh = lambda: decode_bench.full_cache_at(p, jnp.ones((B, 16), jnp.int32), c, L,
                                           jnp.full((B,), L - 60, jnp.int32))
ex, states, logits = {}, {}, {}
for name, (ca, opts) in variants.items():
  plga.cached_attention = ca
  jax.clear_caches()
  state, g = fresh()
  f = jax.jit(lambda dp, g, s, t: decode.decode_step(dp, g, s, t, config=c), donate_argnums=2)
  lowered = f.lower(dp, g, state, tok)
  ex[name] = lowered.compile(compiler_options=opts) if opts else lowered.compile()
  logits[name] = np.asarray(ex[name](dp, g, state, tok)[0])
  states[name] = fresh()
plga.cached_attention = base_attention
for name in ex:
  print(f"{name}: max |logit - base| = {np.abs(logits[name] - logits['base']).max():.1e}")
times = {n: [] for n in ex}
names = list(ex)
for r in range(ROUNDS):
  for n in (names if r % 2 == 0 else names[::-1]):
    state, g = states[n]
    t = time.perf_counter()
    lg, state = ex[n](dp, g, state, tok)
    jax.block_until_ready(lg)
    if r >= 3:
      times[n].append(time.perf_counter() - t)
    states[n] = (state, g)
base = np.array(times["base"])
for n, t in times.items():
  t = np.array(t)
  print(f"B={B} L={L} {n:8s} median {1e3 * np.median(t):.2f} ms  ratio {np.median(t / base):.3f}")

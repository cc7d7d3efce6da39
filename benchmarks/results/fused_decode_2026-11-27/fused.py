import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from pldr_jax import config as cfg, params as params_lib
from pldr_jax.inference import decode
from pldr_jax.params import init_params
c = cfg.pldrv51_110m()
p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
fused = jax.block_until_ready(jax.jit(decode.decode_params, static_argnums=1)(p, c))
plain = jax.block_until_ready(jax.jit(lambda q: params_lib.unstack_layers(params_lib.without_g_network(q)))(p))
for b in (1, 8):
  toks = jnp.ones((b, 128), jnp.int32); lens = jnp.full((b,), 128, jnp.int32)
  _, st, gc = decode.prefill_jit(p, toks, lens, config=c, cache_len=1024)
  sts = {"fused": st, "plain": jax.tree.map(jnp.copy, st)}
  tok = jnp.ones((b,), jnp.int32)
  pp = {"fused": fused, "plain": plain}
  for k in pp:
    lg, sts[k] = decode.decode_step_jit(pp[k], gc, sts[k], tok, config=c); jax.block_until_ready(lg)
  la, _ = decode.decode_step_jit(fused, gc, jax.tree.map(jnp.copy, sts["fused"]), tok, config=c)
  lb, _ = decode.decode_step_jit(plain, gc, jax.tree.map(jnp.copy, sts["fused"]), tok, config=c)
  times = {k: [] for k in pp}
  for r in range(40):
    for k in pp:
      t = time.perf_counter(); lg, sts[k] = decode.decode_step_jit(pp[k], gc, sts[k], tok, config=c); jax.block_until_ready(lg); times[k].append(time.perf_counter() - t)
  print(json.dumps({"batch": b, **{k: round(1e3 * float(np.median(v)), 2) for k, v in times.items()},
                    "max_abs_logit_diff": float(jnp.max(jnp.abs(la - lb)))}))

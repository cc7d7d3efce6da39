"""110M decode-step: compile time and step time (old list layout vs new stacked + decode_params)."""
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax.params import init_params
variant = sys.argv[1]; batch = int(sys.argv[2]) if len(sys.argv) > 2 else 1
c = cfg.pldrv51_110m()
p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
toks = jnp.ones((batch, 128), jnp.int32); lens = jnp.full((batch,), 128, jnp.int32)
t0 = time.perf_counter()
_, st, gc = decode.prefill_jit(p, toks, lens, config=c, cache_len=1024)
jax.block_until_ready(st); prefill_first = time.perf_counter() - t0
tok = jnp.ones((batch,), jnp.int32)
sp = p
if variant == "new":
  t0 = time.perf_counter(); sp = decode.decode_params(p, c); jax.block_until_ready(sp); split_s = time.perf_counter() - t0
elif variant == "new_stacked":
  split_s = 0.0
else:
  split_s = 0.0
t0 = time.perf_counter(); lowered = decode.decode_step_jit.lower(sp, gc, st, tok, config=c); t1 = time.perf_counter()
lowered.compile(); t2 = time.perf_counter()
lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c); jax.block_until_ready(lg)
times = []
for r in range(7):
  t = time.perf_counter()
  for _ in range(10):
    lg, st = decode.decode_step_jit(sp, gc, st, tok, config=c)
  jax.block_until_ready(lg); times.append((time.perf_counter() - t) / 10)
print(json.dumps({"variant": variant, "batch": batch, "prefill_first_call_s": round(prefill_first, 3),
                  "decode_params_s": round(split_s, 4), "decode_lower_s": round(t1 - t0, 3),
                  "decode_compile_s": round(t2 - t1, 3),
                  "decode_step_ms_median": round(1e3 * float(np.median(times)), 2),
                  "decode_step_ms_min": round(1e3 * min(times), 2)}))

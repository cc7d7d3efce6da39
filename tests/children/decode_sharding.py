"""Child of tests/test_decode_sharding.py (run with 8 forced CPU devices in XLA_FLAGS).

generate / stream of a batch of prompts on one device and on a data x fsdp mesh of 8,
for the full cache and a LESS cache, plus the shardings of the caches and weights; prints
one line `RESULT <json>`. No arguments.
"""

import json, re
import jax, jax.numpy as jnp, numpy as np
import less_jax
from pldr_jax import config as cfg
from pldr_jax.inference import caches, generate as gen
from pldr_jax.config import TrainConfig
from pldr_jax.training import train
from pldr_jax.params import init_params

c = cfg.tiny(max_len=64)
p = init_params(c, jax.random.key(0))
mesh = train.make_mesh(TrainConfig(mesh_data=4, mesh_fsdp=2))
prompts = [list(range(4, 4 + n)) for n in (3, 9, 5, 12, 7, 2, 10, 6)]
kern = [less_jax.init_kernels(jax.random.key(i), c.head_dim, c.num_heads, rank=4, hidden=8)
        for i in range(c.num_layers)]
out = {"devices": len(jax.devices())}
for name, cache in (("full", caches.FullCache()),
                    ("less", less_jax.SparseCache(less_jax.h2o(4, 4), kern))):
  one = gen.generate(p, prompts, config=c, max_new_tokens=8, cache=cache)
  eight = gen.generate(p, prompts, config=c, max_new_tokens=8, cache=cache, mesh=mesh)
  streamed = np.stack(list(gen.stream(p, prompts, config=c, max_new_tokens=8, cache=cache,
                                      mesh=mesh)), 1).tolist()
  out[name] = {"one": one, "eight": eight, "stream": streamed}
toks, lens = gen.pad_prompts(prompts, c, 8)
args = gen.place(p, toks, lens, None, caches.FullCache(), config=c, mesh=mesh)
_, st, gc = gen._prefill_jit(*args, config=c, cache_len=32, mesh=mesh)
spec = lambda x: [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
out["kv_spec"] = spec(st.k[0])
out["kv_devices"] = len(st.k[0].sharding.device_set)
out["g_spec"] = spec(gc.g_lm)
out["param_spec"] = spec(args[0]["layers"]["wq"]["kernel"])
text = gen.generate_tokens.lower(*args[:3], jax.random.key(0),
                                 gen.SamplingConfig().as_arrays(), None, args[4], config=c,
                                 max_new_tokens=8, cache_len=32, mesh=mesh).as_text()
out["kv_constraints"] = len(re.findall(
    r'sharding_constraint[^\n]*\{"data", "fsdp"\}, \{\}, \{\}, \{\}\][^\n]*8x2x8x32', text))
print("RESULT " + json.dumps(out))

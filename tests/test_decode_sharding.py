"""Decode shards like training: a batch of prompts on 8 forced CPU devices.

`generate` / `stream` with `mesh=` place the weights by their logical axes and
split the prompts and the caches (KVCache, GCache, a LESS SparseState) over the
batch axes with the same Flax logical-axis rules as training; the tokens must
equal those of one device, for the full cache and for a LESS cache.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent("""
    import json, re
    import jax, jax.numpy as jnp, numpy as np
    import less_jax
    from pldr_jax import config as cfg, model
    from pldr_jax.inference import generate as gen
    from pldr_jax.config import TrainConfig
    from pldr_jax.params import init_params
    from pldr_jax.training import train

    c = cfg.tiny(max_len=64)
    p = init_params(c, jax.random.key(0))
    mesh = train.make_mesh(TrainConfig(mesh_data=4, mesh_fsdp=2))
    prompts = [list(range(4, 4 + n)) for n in (3, 9, 5, 12, 7, 2, 10, 6)]
    kern = [less_jax.init_kernels(jax.random.key(i), c.head_dim, c.num_heads, rank=4, hidden=8)
            for i in range(c.num_layers)]
    out = {"devices": len(jax.devices())}
    for name, cache in (("full", gen.FullCache()),
                        ("less", gen.SparseCache(less_jax.h2o(4, 4), kern))):
      one = gen.generate(p, prompts, config=c, max_new_tokens=8, cache=cache)
      eight = gen.generate(p, prompts, config=c, max_new_tokens=8, cache=cache, mesh=mesh)
      streamed = np.stack(list(gen.stream(p, prompts, config=c, max_new_tokens=8, cache=cache,
                                          mesh=mesh)), 1).tolist()
      out[name] = {"one": one, "eight": eight, "stream": streamed}
    toks, lens = gen.pad_prompts(prompts, c, 8)
    args = gen.place(p, toks, lens, None, gen.FullCache(), config=c, mesh=mesh)
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
        r'sharding_constraint[^\\n]*\\{"data", "fsdp"\\}, \\{\\}, \\{\\}, \\{\\}\\][^\\n]*8x2x8x32', text))
    print("RESULT " + json.dumps(out))
""")


@pytest.mark.slow  # end-to-end; CI runs it (`-m 'not slow'` skips it)
def test_generate_on_8_devices_gives_one_devices_tokens():
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join(flags + ["--xla_force_host_platform_device_count=8"]))
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  r = json.loads(line[len("RESULT "):])
  assert r["devices"] == 8
  for name in ("full", "less"):
    assert r[name]["eight"] == r[name]["one"], name
    assert r[name]["stream"] == r[name]["one"], name
  assert r["full"]["one"] != r["less"]["one"]  # the small LESS budget changes the tokens
  # The caches really are split over the batch axes, as the training batch.
  assert r["kv_spec"][0] == ["data", "fsdp"] and r["kv_devices"] == 8
  assert not any(r["kv_spec"][1:])
  assert r["g_spec"][:2] == [None, ["data", "fsdp"]]  # [L, B, ...]: B split
  assert r["param_spec"] == [None, "fsdp", None]      # [L, d, d]: d split, as in training
  assert r["kv_constraints"] >= 2 * 2  # k and v of both layers, after prefill and each step

"""Child of tests/test_checkpoint.py (run with 4 forced CPU devices in XLA_FLAGS): sharded
saves (async, a G_LM item, NumPy params) and restores onto other shardings (4 -> 2
devices, replicated, host -> 4), bit-exact. Prints SHARDED-OK.

argv: checkpoint folder, an .npz of the parent's init_params(tiny(), key(0)) leaves.
"""

import sys
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from pldr_jax import config, model
from pldr_jax.training.checkpoint import Checkpointer, abstract_like, load_g_lm
from pldr_jax.params import init_params, param_shardings
assert jax.device_count() == 4, jax.devices()
directory, params_file = sys.argv[1:]
cfg = config.tiny()
mesh4 = Mesh(np.array(jax.devices()), ("fsdp",))
mesh2 = Mesh(np.array(jax.devices()[:2]), ("fsdp",))
sh4, sh2 = param_shardings(cfg, mesh4), param_shardings(cfg, mesh2)
rep4 = NamedSharding(mesh4, P())
# the parent's init_params(tiny(), key(0)) arrays: no need to draw them again
abstract = jax.eval_shape(lambda k: init_params(cfg, k), jax.random.key(0))
treedef = jax.tree.structure(abstract)
with np.load(params_file) as f:
  host = jax.tree.unflatten(treedef, [f[str(i)] for i in range(treedef.num_leaves)])
params = jax.device_put(host, sh4)
assert params["embed"].sharding.spec == P(None, "fsdp")
assert len({s.device for s in params["embed"].addressable_shards}) == 4
opt_state = optax.adamw(1e-3).init(params)  # mu/nu sharded like params, count on one device

def check(got, target):
  for g, w, h in zip(jax.tree.leaves(got), jax.tree.leaves(abstract_like(host, target)),
                     jax.tree.leaves(host)):
    assert g.sharding == w.sharding, (g.sharding, w.sharding)
    assert np.asarray(g).tobytes() == h.tobytes()

with Checkpointer(directory, async_save=True) as ckpt:
  ckpt.save(1, params=params, opt_state=opt_state, data_state={}, meta={},
            g_lm={"G_LM": jnp.ones((2, 2, 8, 8), jnp.float32)})
  ckpt.save(2, params=host, opt_state=opt_state, data_state={}, meta={})  # NumPy params
  ckpt.wait_until_finished()
  check(ckpt.restore_params(1, abstract_params=abstract_like(host, sh2)), sh2)  # 4 -> 2
  check(ckpt.restore_params(1, abstract_params=abstract_like(host, rep4)), rep4)
  r = ckpt.restore(2, abstract_params=abstract_like(host, sh4),  # host -> 4
                   abstract_opt_state=abstract_like(opt_state))
  check(r["params"], sh4)
  assert r["opt_state"][0].mu["embed"].sharding == sh4["embed"]
  assert r["opt_state"][0].count.sharding == opt_state[0].count.sharding
assert load_g_lm(directory, 1)["G_LM"].sum() == 256
print("SHARDED-OK")

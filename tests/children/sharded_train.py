"""Child of tests/test_train.py: the tiny model's train step on the forced CPU devices.

argv[1]: a JSON list of cases [mesh_data, mesh_fsdp, steps, dtype, learning_rate, g_mode].
Runs each for `steps` steps on synthetic batches and prints one JSON line per case
(losses, device count, the sharding spec of a weight). The cases that need the same
device count share one process; the parent sets the count in XLA_FLAGS.
"""

import json, sys
import numpy as np, jax
jax.config.update("jax_enable_x64", True)
from pldr_jax import config
from pldr_jax.config import TrainConfig
from pldr_jax.training import train
for data, fsdp, steps, dtype, lr, g_mode in json.loads(sys.argv[1]):
  c = config.tiny(vocab_size=96, max_len=24, param_dtype=dtype, compute_dtype=dtype,
                  g_mode=g_mode)
  tc = TrainConfig(num_steps=steps, warmup_steps=4, learning_rate=lr,
                         mesh_data=data, mesh_fsdp=fsdp)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc)
  with jax.set_mesh(mesh):
    state = train.init_train_state(c, tc, tx, mesh)
    step = train.make_train_step(c, tc, tx, mesh)
    rng = np.random.default_rng(0)
    losses = []
    for i in range(steps):
      start = rng.integers(0, 30, (8, 1))  # learnable: counting mod 30
      toks = (4 + (start + np.arange(24)) % 30).astype(np.int32)
      mask = np.ones_like(toks)
      mask[-1, 20:] = 0
      toks[-1, 20:] = 0
      state, m = step(state, train.global_batch({"tokens": toks, "mask": mask}, mesh))
      losses.append(float(m["loss"]))
    shard = state["params"]["layers"]["wq"]["kernel"].sharding
    print(json.dumps({"losses": losses, "devices": len(jax.devices()),
                      "spec": str(shard.spec)}), flush=True)

"""XLA's temporary-memory count of the 110M bf16 train step at B x 1024 tokens, compiled
(not run) on this machine's backend, for the GPU suite's batch sizes:

  python benchmarks/results/train_variants_2026-11-27/memory_estimate.py 8 32 [--attention xla] [--remat minimal]

Printed on the 2-core CPU VM, 2026-11-27 (attention=plain, remat=none):
  8  -> temp 15.39 GiB; 32 -> temp 59.76 GiB (arguments and outputs 1.23 GiB each);
  8 with --remat minimal -> temp 6.41 GiB.
A GPU's buffer assignment differs; the order of magnitude is what chose 16 x 1024 for
the plain-attention case of the GPU suite.
"""
import argparse
import time

import jax
import numpy as np

from pldr_jax import config as cfg
from pldr_jax.config import TrainConfig
from pldr_jax.training import train

ap = argparse.ArgumentParser()
ap.add_argument("batches", type=int, nargs="+")
ap.add_argument("--attention", default="plain")
ap.add_argument("--remat", default="none")
a = ap.parse_args()
for batch in a.batches:
  c = cfg.preset("pldrv51_110m", compute_dtype="bfloat16", attention=a.attention,
                 remat=a.remat)
  c = c.replace(max_len=max(c.max_len, 1024))
  tc = TrainConfig(num_steps=1000, warmup_steps=10, mesh_data=1, mesh_fsdp=1)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc)
  with jax.set_mesh(mesh):
    state = jax.eval_shape(lambda: train.init_train_state(c, tc, tx, mesh))
    step = train.make_train_step(c, tc, tx, mesh)
    data = {k: jax.ShapeDtypeStruct((batch, 1024), np.int32) for k in ("tokens", "mask")}
    t0 = time.time()
    m = step.lower(state, data).compile().memory_analysis()
    print(f"{batch} x 1024: compile {time.time() - t0:.1f} s, temp "
          f"{m.temp_size_in_bytes / 2 ** 30:.2f} GiB, arguments "
          f"{m.argument_size_in_bytes / 2 ** 30:.2f} GiB, outputs "
          f"{m.output_size_in_bytes / 2 ** 30:.2f} GiB", flush=True)

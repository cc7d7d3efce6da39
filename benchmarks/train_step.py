#!/usr/bin/env python
"""Tokens/s (and model FLOP/s) of the jitted train step on synthetic batches.

python benchmarks/train_step.py --preset pldrv51_110m --batch 2 --seq 1024 --steps 3
Writes a JSON row to benchmarks/results/.
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import numpy as np

from pldr_jax import config as cfg, train


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--compute_dtype", default="float32")
  ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
  a = ap.parse_args()
  c = cfg.preset(a.preset, compute_dtype=a.compute_dtype)
  seq = a.seq or c.max_len
  tc = train.TrainConfig(num_steps=100, warmup_steps=10)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc)
  with jax.set_mesh(mesh):
    state = train.init_train_state(c, tc, tx, mesh)
    step = train.make_train_step(c, tc, tx, mesh)
    toks = np.random.default_rng(0).integers(4, c.vocab_size, (a.batch, seq)).astype(np.int32)
    batch = train.global_batch({"tokens": toks, "mask": np.ones_like(toks)}, mesh)
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(a.steps):
      state, m = step(state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / a.steps
  tps = a.batch * seq / dt
  flops = train.flops_per_token(c, seq) * tps
  rec = {"benchmark": "train_step", "preset": a.preset, "batch": a.batch, "seq": seq,
         "compute_dtype": a.compute_dtype, "step_s": dt, "tokens_per_s": tps,
         "model_flops_per_s": flops, "first_call_s": first, "devices": len(jax.devices()),
         "device": jax.devices()[0].device_kind, "machine": platform.node(),
         "cpu_count": os.cpu_count(), "jax": jax.__version__,
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
  print(json.dumps(rec, indent=1))
  out = Path(a.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"train_step_{a.preset}_b{a.batch}_{rec['date'][:19].replace(':', '')}.json").write_text(
      json.dumps(rec, indent=1))


if __name__ == "__main__":
  main()

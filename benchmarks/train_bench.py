"""Training benchmark: tokens/s, model FLOP/s and compile time of the jitted train step.

Run as a module so that the device count can be forced before JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
    python -m benchmarks.train_bench --preset tiny --batch 16 --seq 128 --steps 5

It prints one JSON row. benchmarks/run.py runs it in a subprocess per
(config, device count) and divides model FLOP/s by the matmul ceiling it
measured in the same run (model FLOPs utilisation).

Model FLOPs per token come from the config (pldr_jax.training.train.flops_per_token:
dense layers, attention scores and values, q G_LM, LM head, and the metric
learner + power-law step amortised over the sequence; forward + backward =
3x forward). The mesh is ('data', 'fsdp') with every device on 'data' unless
--fsdp is given.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import common
from pldr_jax import config as cfg
from pldr_jax.config import TrainConfig
from pldr_jax.training import train
from pldr_jax.training import host


def setup(vocab_size: int, batch: int, seq: int, fsdp: int = 1):
  """What every training benchmark builds: (TrainConfig, optimizer, mesh, tokens int32
  [batch, seq] drawn with seed 0 from ids 4.., the batch placed on the mesh). The mesh
  is ('data', 'fsdp') with every device on 'data' unless `fsdp` > 1."""
  tc = TrainConfig(num_steps=1000, warmup_steps=10,
                         mesh_data=jax.device_count() // fsdp, mesh_fsdp=fsdp)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc)
  toks = np.random.default_rng(0).integers(4, vocab_size, (batch, seq)).astype(np.int32)
  data = train.global_batch({"tokens": toks, "mask": np.ones_like(toks)}, mesh)
  return tc, tx, mesh, toks, data


def run(preset: str, batch: int, seq: int | None, steps: int, compute_dtype: str = "float32",
        fsdp: int = 1, g_mode: str | None = None, scan_layers: bool = True,
        warmup: int = 4, attention: str = "plain", remat: str = "none") -> dict:
  c = cfg.preset(preset, compute_dtype=compute_dtype, scan_layers=scan_layers,
                 attention=attention, remat=remat)
  if g_mode:
    c = c.replace(g_mode=g_mode)
  seq = seq or c.max_len
  if seq > c.max_len:
    c = c.replace(max_len=seq)
  n = jax.device_count()
  tc, tx, mesh, _, data = setup(c.vocab_size, batch, seq, fsdp)
  with jax.set_mesh(mesh):
    state = train.init_train_state(c, tc, tx, mesh)
    step = train.make_train_step(c, tc, tx, mesh)
    t0 = time.perf_counter()
    step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, m = step(state, data)
    jax.block_until_ready(m)
    first_s = time.perf_counter() - t0
    for _ in range(warmup):  # untimed: the kept heap grows over the first steps
      state, m = step(state, data)
    jax.block_until_ready(m)
    times = []
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
      t0 = time.perf_counter()
      state, m = step(state, data)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
  dt = float(np.median(times))
  peak = {}
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak["peak_device_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
  peak["peak_rss_mib"] = _peak_rss_mib(r1)
  # host memory: pages faulted in and kernel seconds per timed step (pldr_jax.training.host)
  peak["page_fault_mib_per_step"] = ((r1.ru_minflt - r0.ru_minflt) * resource.getpagesize()
                                     / 2 ** 20 / steps)
  peak["sys_s_per_step"] = (r1.ru_stime - r0.ru_stime) / steps
  peak["retain_freed_memory"] = host.retained()
  tps = batch * seq / dt
  fpt = train.flops_per_token(c, seq)
  return {"preset": preset, "g_mode": c.g_mode, "scan_layers": scan_layers,
          "attention": attention, "remat": remat, "batch": batch,
          "seq": seq,
          "compute_dtype": compute_dtype, "devices": n, "fsdp": fsdp, "steps": steps,
          "warmup": warmup,
          "step_s": dt, "step_min_s": float(np.min(times)), "tokens_per_s": tps,
          "flops_per_token": fpt, "model_flops_per_s": fpt * tps, "compile_s": compile_s,
          "first_step_s": first_s, "loss": float(m["loss"]), **peak, **common.environment()}


def _peak_rss_mib(usage) -> float:
  """This process's peak resident memory: VmHWM (ru_maxrss starts from the parent's
  peak when the parent's was higher: a suite's subprocess would report the suite's)."""
  try:
    for line in Path("/proc/self/status").read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2 ** 10
  except OSError:
    pass
  return usage.ru_maxrss / 2 ** 10


def main(argv=None) -> int:
  host.retain_freed_memory()  # before the first JAX computation (pldr_jax.training.host)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=None)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=4, help="untimed steps after the first")
  ap.add_argument("--compute_dtype", default="float32")
  ap.add_argument("--fsdp", type=int, default=1)
  ap.add_argument("--g_mode", default=None)
  ap.add_argument("--unrolled", action="store_true", help="PLDRConfig.scan_layers=False")
  ap.add_argument("--attention", default="plain", choices=cfg.ATTENTION_IMPLS,
                  help="PLDRConfig.attention")
  ap.add_argument("--remat", default="none", choices=cfg.REMAT_POLICIES,
                  help="PLDRConfig.remat")
  a = ap.parse_args(argv)
  row = run(a.preset, a.batch, a.seq, a.steps, a.compute_dtype, a.fsdp, a.g_mode,
            scan_layers=not a.unrolled, warmup=a.warmup, attention=a.attention,
            remat=a.remat)
  print("RESULT " + json.dumps(row))
  return 0


if __name__ == "__main__":
  sys.exit(main())

#!/usr/bin/env python
"""Fingerprints of the programs XLA:CPU runs: does a change alter what the CPU executes?

    JAX_PLATFORMS=cpu python -m benchmarks.cpu_program_identity [--dump DIR]

Lowers (no compile) the train step and the decode steps (KV+G cache and LESS,
batch 1 and 8) for the tiny and the 110M config in bf16 compute, and prints a
sha256 of each lowered module. Run it at two commits (a `git worktree` of the
older one): equal fingerprints mean the CPU runs the very same programs, so
its speed cannot have changed; `--dump` writes the modules for a diff where
they differ. docs/tpu.md records the run for the per-platform choices.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

from less_jax import kernels as kernels_lib, policies
from less_jax.sparse_cache import SparseCache
from pldr_jax.inference import generate
from pldr_jax.inference.caches import FullCache
from pldr_jax.training import train
from pldr_jax import params as params_lib
from pldr_jax.config import TrainConfig, pldrv51_110m, tiny


def programs() -> dict[str, str]:
  out = {}
  for name, cfg in (("tiny_bf16", tiny(compute_dtype="bfloat16")),
                    ("110m_bf16", pldrv51_110m(compute_dtype="bfloat16"))):
    tc = TrainConfig(num_steps=100, warmup_steps=10)
    mesh = train.make_mesh(tc)
    tx = train.make_optimizer(tc)
    bs = train.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.int32, sharding=bs) for k in ("tokens", "mask")}
    out[f"{name}/train"] = train.make_train_step(cfg, tc, tx, mesh).lower(
        train.abstract_train_state(cfg, tx, mesh), batch).as_text()
    p = jax.eval_shape(lambda k: params_lib.init_params(cfg, k), jax.random.key(0))
    kern = jax.eval_shape(lambda k: [kernels_lib.init_kernels(k, cfg.head_dim, cfg.num_heads)
                                     for _ in range(cfg.num_layers)], jax.random.key(0))
    caches = {"full": FullCache(),
              "less": SparseCache(policies.make_policy("h2o", heavy=8, recent=8), kern)}
    sds = lambda t: jax.tree.map(lambda i: jax.ShapeDtypeStruct(i.shape, i.dtype), t,
                                 is_leaf=lambda x: hasattr(x, "axes"))
    for b in (1, 8):
      for cname, cache in caches.items():
        sp = jax.eval_shape(lambda p, c: c.step_params(p, config=cfg, batch=b), p, cache)
        s_info, g_info = cache.abstract(config=cfg, batch=b, cache_len=64)
        out[f"{name}/decode_{cname}_b{b}"] = generate._step_jit.lower(
            sp, sds(g_info), sds(s_info), jax.ShapeDtypeStruct((b,), jnp.int32), cache,
            config=cfg).as_text()
  return out


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dump", default=None, help="write each lowered module here")
  args = ap.parse_args(argv)
  for key, text in programs().items():
    print(key, hashlib.sha256(text.encode()).hexdigest()[:16])
    if args.dump:
      path = Path(args.dump) / (key.replace("/", "__") + ".mlir")
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""The 110M LM head at batch 8, [8, 896] x [896, 32000] fp32, weights streamed from
DRAM (115 MB, larger than the caches): XLA with YNNPACK (the default) and with Eigen,
in several forms, against torch and numpy. Medians of 40 calls.

  python benchmarks/results/vs_authors_2026-11-27/head_b8.py [B]
"""
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

K, N = 896, 32000
B = int(sys.argv[1]) if len(sys.argv) > 1 else 8


def median_ms(f, n=40):
  jax.block_until_ready(f())
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f())
    ts.append(time.perf_counter() - t)
  return 1e3 * float(np.median(ts))


def show(name, t):
  print(f"B={B} {name:34s} {t:7.2f} ms  {K * N * 4 / t / 1e6:5.1f} GB/s  "
        f"{2 * B * K * N / t / 1e6:6.1f} GFLOP/s", flush=True)


rng = np.random.default_rng(0)
wn = rng.standard_normal((K, N), np.float32)
xn = rng.standard_normal((B, K), np.float32)
w, wt, x = jnp.asarray(wn), jnp.asarray(np.ascontiguousarray(wn.T)), jnp.asarray(xn)
halves = [jnp.asarray(np.ascontiguousarray(wn[:, i * N // 2:(i + 1) * N // 2])) for i in range(2)]
ref = xn @ wn
forms = {
    "input-major x @ W": (lambda x, w: x @ w, w),
    "output-major einsum": (lambda x, w: jnp.einsum("bk,nk->bn", x, w), wt),
    "two halves, concatenated": (lambda x, ws: jnp.concatenate([x @ h for h in ws], -1), halves),
    "output-major multiply-reduce": (lambda x, w: jnp.sum(w[:, None, :] * x[None], -1).T, wt),
}
for lib, opts in (("YNNPACK", {}), ("Eigen", {"xla_cpu_experimental_ynn_fusion_type": ""})):
  for name, (fn, W) in forms.items():
    lowered = jax.jit(fn).lower(x, W)
    c = lowered.compile(compiler_options=opts) if opts else lowered.compile()
    assert np.abs(np.asarray(c(x, W)) - ref).max() < 1e-3
    show(f"XLA {lib}: {name}", median_ms(lambda: c(x, W)))
tw, tx = torch.from_numpy(np.ascontiguousarray(wn.T)), torch.from_numpy(xn)
show(f"torch F.linear ({torch.get_num_threads()} threads)",
     median_ms(lambda: torch.nn.functional.linear(tx, tw)))
show("numpy x @ W", median_ms(lambda: xn @ wn))

#!/usr/bin/env python
"""How fast does training amplify a tiny parameter perturbation? (fp64)

  python -m benchmarks.perturbation_growth [--steps 40] [--out FILE.json]

Two copies of the tiny.gin model (float64 parameters and compute) start from the
same init, one with every parameter moved by 1e-15 (relative to its own RMS,
random direction), and train on the same batches of the embedded corpus with
the project's train step (AdamW recipe, clip by value). After each step the
distance ||p_a - p_b|| / ||p_a|| is recorded; the growth per step is the
geometric mean of d_{t+1} / d_t over the run. A chaotic training (what the
per-head Xavier fans of the power-law tensors gave) amplifies rounding by
orders of magnitude per step; a well-conditioned one by a small factor.
Runs learned G and identity G (SDPA). Import paths are the installed
pldr_jax, so running it from an older checkout measures that code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp
import numpy as np

from pldr_jax import config as config_lib
from pldr_jax.config import TrainConfig
from pldr_jax.training import train
from pldr_jax.data import load_tokenizer, make_train_iterator, prepare_default_data

EPS = 1e-15


def tiny_gin_config(g_mode: str) -> config_lib.PLDRConfig:
  """experiments/configs/tiny.gin's model in float64."""
  return config_lib.tiny(vocab_size=2048, d_model=128, num_heads=4, num_layers=2, d_ff=341,
                         a_dff=64, num_res_units=2, max_len=128, g_mode=g_mode,
                         param_dtype="float64", compute_dtype="float64")


def _norm(tree) -> float:
  return math.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree)))


def perturb(params, key):
  """Every leaf moved by EPS x its RMS in a random unit-variance direction."""
  leaves, tdef = jax.tree.flatten(params)
  out = []
  for i, x in enumerate(leaves):
    rms = float(jnp.sqrt(jnp.mean(jnp.square(x)))) or 1.0
    out.append(x + EPS * rms * jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype))
  return jax.tree.unflatten(tdef, out)


def run(g_mode: str, batches: list, steps: int) -> dict:
  config = tiny_gin_config(g_mode)
  tc = TrainConfig(num_steps=600, learning_rate=2e-3, warmup_steps=60, seed=1234)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc, jax.devices()[:1])
  with jax.set_mesh(mesh):
    a = train.init_train_state(config, tc, tx, mesh)
    b = jax.tree.map(jnp.copy, a)  # own buffers: the step donates its state
    b["params"] = perturb(b["params"], jax.random.key(99))
    step = train.make_train_step(config, tc, tx, mesh)
    dist = []
    grad_norms = []
    diff = lambda: _norm(jax.tree.map(lambda x, y: x - y, a["params"], b["params"])) / _norm(
        a["params"])
    dist.append(diff())
    for i in range(steps):
      batch = train.global_batch(batches[i], mesh)
      a, ma = step(a, batch)
      b, _ = step(b, batch)
      dist.append(diff())
      grad_norms.append(float(ma["grad_norm"]))
  d = np.asarray(dist)
  pos = d[d > 0]
  growth = float(np.exp(np.mean(np.diff(np.log(d))))) if len(pos) == len(d) else float("nan")
  early = min(10, steps)
  growth_early = float((d[early] / d[0]) ** (1.0 / early)) if d[0] > 0 else float("nan")
  return {"g_mode": g_mode, "steps": steps, "relative_distance": dist,
          "growth_per_step": growth, "growth_per_step_first10": growth_early, "max_grad_norm": max(grad_norms),
          "grad_norms": grad_norms}


def _git_rev() -> str:
  try:
    here = Path(__import__("pldr_jax").__file__).resolve().parents[1]
    return subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
  except OSError:
    return ""


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=40)
  ap.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "pldr_pert_data"))
  ap.add_argument("--label", default="", help="free text stored with the result (e.g. 'before')")
  ap.add_argument("--out", default=None, help="JSON file to write")
  args = ap.parse_args(argv)
  data = prepare_default_data(args.data_dir, vocab_size=2048, seq_len=128, batch_size=16,
                              num_threads=0)
  it = make_train_iterator(data, load_tokenizer(data.tokenizer_path))
  batches = [next(it) for _ in range(args.steps)]
  results = [run(mode, batches, args.steps) for mode in ("learned", "identity")]
  for r in results:
    print(f"{r['g_mode']:>9}: growth per step {r['growth_per_step']:.3g} "
          f"({r['growth_per_step_first10']:.3g} over the first 10), distance "
          f"{r['relative_distance'][0]:.2e} -> {r['relative_distance'][-1]:.2e} after "
          f"{r['steps']} steps, largest grad norm {r['max_grad_norm']:.3g}")
  record = {"label": args.label, "git": _git_rev(), "date": datetime.date.today().isoformat(),
            "machine": platform.processor() or platform.machine(), "jax": jax.__version__,
            "command": "python -m benchmarks.perturbation_growth " + " ".join(argv or sys.argv[1:]),
            "results": results}
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Train-step variants timed in alternation in one process: PLDRConfig.attention and
.remat (and any other PLDRConfig field) on the same weights and batch.

  python -m benchmarks.train_variants --preset pldrv51_110m --batch 4 --seq 256 \\
      --rounds 8 attention=plain attention=xla remat=minimal remat=full

Each variant is compiled (its XLA temporary-memory count recorded), then the
steps run a, b, c, a, b, c, ... for --rounds rounds after 2 untimed ones, so a
shared machine's drift hits every variant alike. Prints one JSON row per
variant (median and minimum step seconds, tokens/s, ratio to the first
variant, the loss after the steps, compile seconds, temp MiB).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np

from benchmarks import common, train_bench
from pldr_jax import config as cfg
from pldr_jax.training import host
from pldr_jax.training import train


def _variant(spec: str) -> dict:
  """'attention=xla,remat=minimal' -> {'attention': 'xla', 'remat': 'minimal'}."""
  out = {}
  for part in filter(None, spec.split(",")):
    key, _, value = part.partition("=")
    out[key] = {"True": True, "False": False}.get(value, value)
  return out


def run(preset: str, batch: int, seq: int, rounds: int, variants: list[str],
        compute_dtype: str = "float32") -> list[dict]:
  base = cfg.preset(preset, compute_dtype=compute_dtype)
  base = base.replace(max_len=max(base.max_len, seq))
  tc, tx, mesh, _, data = train_bench.setup(base.vocab_size, batch, seq)
  built = []
  with jax.set_mesh(mesh):
    for spec in variants:
      c = base.replace(**_variant(spec))
      state = train.init_train_state(c, tc, tx, mesh)  # same seed: same weights
      step = train.make_train_step(c, tc, tx, mesh)
      t0 = time.perf_counter()
      compiled = step.lower(state, data).compile()
      compile_s = time.perf_counter() - t0
      mem = compiled.memory_analysis()
      bound = lambda st, d, compiled=compiled, g=step.bound: compiled(st, d, *g)
      built.append({"spec": spec, "step": bound, "state": state, "compile_s": compile_s,
                    "temp_mib": None if mem is None else mem.temp_size_in_bytes / 2 ** 20,
                    "times": []})
    for r in range(rounds + 2):
      for b in built:
        t0 = time.perf_counter()
        b["state"], m = b["step"](b["state"], data)
        jax.block_until_ready(m)
        if r >= 2:
          b["times"].append(time.perf_counter() - t0)
        b["loss"] = float(m["loss"])
  rows = []
  env = common.environment()
  for b in built:
    med = float(np.median(b["times"]))
    rows.append({"preset": preset, "batch": batch, "seq": seq, "compute_dtype": compute_dtype,
                 "variant": b["spec"], "step_s": med, "step_min_s": float(np.min(b["times"])),
                 "tokens_per_s": batch * seq / med, "rounds": rounds,
                 "loss_after": b["loss"], "compile_s": b["compile_s"],
                 "temp_mib": b["temp_mib"], **env})
  for r in rows:
    r["step_vs_first"] = r["step_s"] / rows[0]["step_s"]
  return rows


def main(argv=None) -> int:
  host.retain_freed_memory()  # as the training entry points (pldr_jax.training.host)
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="tiny")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--compute_dtype", default="float32")
  ap.add_argument("variants", nargs="+",
                  help="comma-separated PLDRConfig overrides per variant, e.g. attention=xla")
  a = ap.parse_args(argv)
  for row in run(a.preset, a.batch, a.seq, a.rounds, a.variants, a.compute_dtype):
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

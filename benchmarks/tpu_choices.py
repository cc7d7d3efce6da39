#!/usr/bin/env python
"""Each per-platform choice (pldr_jax.backend.CHOICES) compiled both ways for a TPU.

    python -m benchmarks.tpu_choices --topology v5e:2x4 --out benchmarks/results/tpu_choices_<date>.json

For every choice that XLA:CPU's tuning put in the core path, the program it
touches is compiled for the TPU topology (libtpu, no chip) with the choice on
and off (`backend.override`), on the PLDRv51-110M config in bf16 compute, and the
script prints per variant: estimated step time (roofline over the compiler's
counts: an ESTIMATE, not a measurement), per-chip temporaries and total HBM,
bytes accessed and compile time. The whole-sequence programs run unrolled
(`scan_layers=False`) so the compiler's counts cover every layer.

  attention_dot             train step (data parallel, 1 layer) and KV+G decode step, batch 8
  decode_output_major_b1    KV+G decode step, batch 1 (one chip)
  decode_unstacked_weights  KV+G decode step, batch 1 (one chip) and 8
  less_ordered_writes       LESS decode step, batch 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pldr_jax import aot, backend
from pldr_jax.training import train
from pldr_jax.config import TrainConfig, pldrv51_110m

# (choice, program, decode batch, devices used) -> the rows compared
CASES = (
    ("attention_dot", "train", None, "all", {}),
    ("attention_dot", "decode_g", 8, "all", {}),
    # output-major kernels exist only on per-layer copies (XLA:CPU's layout)
    ("decode_output_major_b1", "decode_g", 1, "one", {"decode_unstacked_weights": True}),
    ("decode_unstacked_weights", "decode_g", 1, "one", {}),
    ("decode_unstacked_weights", "decode_g", 8, "all", {}),
    ("less_ordered_writes", "decode_less", 8, "all", {}),
)
VALUES = {"attention_dot": ("upcast", "preferred")}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--topology", default="v5e:2x4")
  ap.add_argument("--batch", type=int, default=16, help="global train batch (x 1024 tokens)")
  ap.add_argument("--only", default=None, help="comma-separated choices to compare")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  config = pldrv51_110m(compute_dtype="bfloat16", scan_layers=False)
  devices = aot.topology_devices(args.topology)
  chip = aot.device_chip(args.topology, len(devices))
  tc = TrainConfig(num_steps=250_000, warmup_steps=2000)
  rows = []
  for name, program, db, use, fixed in CASES:
    if args.only and name not in args.only.split(","):
      continue
    devs = devices if use == "all" else devices[:1]
    mesh = train.make_mesh(TrainConfig(num_steps=1, mesh_data=len(devs), mesh_fsdp=1), devs)
    decode_batch = db if db is None or db % len(devs) == 0 else len(devs)
    for value in VALUES.get(name, (True, False)):
      # The train step's choice acts per layer: one layer keeps the compile short.
      cfg = config.replace(num_layers=1) if program == "train" else config
      with backend.target("tpu"), backend.override(**fixed, **{name: value}):
        prog, = aot.build(cfg, tc, mesh, batch=args.batch, seq_len=1024, programs=(program,),
                          decode_batch=decode_batch, cost_twins=False)
        t0 = time.perf_counter()
        compiled, lower_s, total_s = aot.compile_program(prog)
        r = aot.describe(prog, compiled, chip, len(devs), (lower_s, total_s))
      row = {"choice": name, "value": value, "cpu_value": backend.CHOICES[name]["cpu"],
             "with": fixed,
             "program": program, "layers": cfg.num_layers, "devices": len(devs),
             "batch": args.batch if program == "train" else decode_batch,
             "est_step_ms": 1e3 * r["estimate"]["step_s"], "bound": r["estimate"]["bound"],
             "temps_gib": r["hbm"]["temps"] / aot.GiB, "total_gib": r["hbm"]["total"] / aot.GiB,
             "gb_accessed": r["bytes_accessed"] / 1e9, "gflops": r["flops"] / 1e9,
             "compile_s": r["compile_s"]}
      rows.append(row)
      print(f"{name}={value!s:9} {program:11} b={row['batch']:<3} on {len(devs)} dev: "
            f"est {row['est_step_ms']:.3f} ms ({row['bound']}), temps {row['temps_gib']:.3f} GiB, "
            f"total {row['total_gib']:.2f} GiB, {row['gb_accessed']:.3f} GB accessed, "
            f"compile {row['compile_s']:.1f} s", flush=True)
  if args.out:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"topology": args.topology, "chip": chip.name,
                                          "config": "pldrv51_110m bf16, layers unrolled",
                                          "label": "compiler-count roofline ESTIMATES",
                                          "rows": rows}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

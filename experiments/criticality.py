#!/usr/bin/env python
"""A model's self-organized-criticality order parameter (both variants) and rank-one collapse.

  python experiments/criticality.py --checkpoint RUN [--step N] [--out DIR]
      [--num_prompts 26] [--prompt_len 64] [--max_new_tokens 64] [--audit_tokens 64]
      [--temperature 1.0] [--top_p 0.8] [--seed 0] [--batch_size 16]
      [--documents FILE.jsonl|FILE.txt]

RUN: a run directory (or its checkpoints/), a Hugging Face folder or a
published checkpoint file (anything `pldr_jax.load` reads). Prompts: the first
`--prompt_len` tokens of the run's held-out (validation) documents, then their
next windows, `--num_prompts` in all (`pldr_jax.criticality.held_out_prompts`); a published
model has no run data: give `--documents` (a .jsonl with a "text" field per
line, or a .txt with documents separated by blank lines).

Measured (`pldr_jax.criticality.criticality`; Gokden, "PLDR-LLMs Reason At
Self-Organized Criticality", arXiv 2603.23539):
  paper  runs 1 and 2 sample --max_new_tokens tokens (top-p, temperature)
         without any KV- or G-cache and take A, A_LM, A_P, G_LM after the final
         generated token; the cached run takes them from the G-cache after the
         last prompt token. Per tensor over the whole model: mean and std of
         each run, RMSE between runs, order parameter RMSE_1C / |mu_C|.
  audit  two sampled --audit_tokens continuations per prompt, compared per
         (prompt, layer) on the [H, dk, dk] tensors: RMSE / RMS ('audit_rms',
         at most 2) and RMSE / mu with mu = (|mean x1| + |mean x2|)/2 ('audit_mu').
  collapse  of the cached run's A, A_LM, G_LM: sigma2/sigma1, numerical rank,
         row-variance ratio, cross-head spread; G_LM's off-commutant residual
         w.r.t. the model's RoPE planes and its change when the suffix is added.
Prints a table per tensor (whole model and per layer) and writes
criticality.csv and criticality.json to --out (default: <run>/criticality).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np

from pldr_jax import analysis, cli, errors
from pldr_jax.criticality import json_ready, measure_run

TABLE_FIELDS = ("tensor", "layer") + analysis.ORDER_FIELDS + ("audit_rms_median",
                                                             "audit_mu_median")


def table_rows(doc: dict) -> list[dict]:
  rows = []
  for name, st in doc["paper"].items():
    aud = doc["audit"].get(name, {})
    n_layers = len(st["per_layer"]["rmse_1c"])
    rows.append({"tensor": name, "layer": "all", **{k: st[k] for k in analysis.ORDER_FIELDS},
                 "audit_rms_median": aud.get("audit_rms", {}).get("median"),
                 "audit_mu_median": aud.get("audit_mu", {}).get("median")})
    for l in range(n_layers):
      rows.append({"tensor": name, "layer": l,
                   **{k: st["per_layer"][k][l] for k in analysis.ORDER_FIELDS},
                   "audit_rms_median": aud.get("audit_rms", {}).get("per_layer_median", [None] * n_layers)[l],
                   "audit_mu_median": aud.get("audit_mu", {}).get("per_layer_median", [None] * n_layers)[l]})
  return rows


def _g(v, w=10):
  return f"{'-':>{w}}" if v is None else f"{v:>{w}.4g}"


def print_report(doc: dict, rows: list[dict]) -> None:
  s = doc["settings"]
  print(f"{doc['source']} (step {doc['step']}): {s['num_prompts']} prompts of "
        f"{s['prompt_len']} tokens from {doc['prompts_from']}, {s['max_new_tokens']} new tokens "
        f"(audit {s['audit_tokens']}), top-p {s['top_p']}, temperature {s['temperature']}, "
        f"{doc['seconds']:.1f}s")
  print("\npaper variant: runs 1, 2 uncached after the last generated token, C = G-cache after "
        "the prompt; OP = RMSE_1C/|mu_C|; audit: median over (prompt, layer)")
  print(f"{'tensor':<6} {'layer':>5} {'mean_1':>10} {'std_1':>10} {'mean_C':>10} {'std_C':>10} "
        f"{'RMSE_12':>10} {'RMSE_1C':>10} {'RMSE_2C':>10} {'OP':>10} {'aud_rms':>10} "
        f"{'aud_mu':>10}")
  for r in rows:
    print(f"{r['tensor']:<6} {str(r['layer']):>5} {_g(r['mean_1'])} {_g(r['std_1'])} "
          f"{_g(r['mean_c'])} {_g(r['std_c'])} {_g(r['rmse_12'])} {_g(r['rmse_1c'])} "
          f"{_g(r['rmse_2c'])} {_g(r['order_parameter'])} {_g(r['audit_rms_median'])} "
          f"{_g(r['audit_mu_median'])}")
  print("\ncollapse (cached run; median over prompts, layers, heads; per layer in brackets)")
  for name, st in doc["collapse"].items():
    for k, v in st.items():
      per = ", ".join(f"{x:.3g}" for x in v["per_layer_median"])
      print(f"  {name:<5} {k:<24} {v['median']:.4g}  [{per}]")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--checkpoint", required=True, help="run directory or published model")
  parser.add_argument("--step", type=int, default=None)
  parser.add_argument("--out", default=None)
  parser.add_argument("--num_prompts", type=int, default=26)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--audit_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_p", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--tol", type=float, default=analysis.DEFAULT_RANK_TOL)
  parser.add_argument("--documents", default=None)
  args = parser.parse_args(argv)
  src = Path(args.checkpoint)
  if not src.exists():
    raise FileNotFoundError(f"--checkpoint not found: {src}")
  doc = measure_run(src, num_prompts=args.num_prompts, prompt_len=args.prompt_len,
                    max_new_tokens=args.max_new_tokens, audit_tokens=args.audit_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                    step=args.step, batch_size=args.batch_size, tol=args.tol,
                    documents=args.documents)
  run = src.parent if src.name == "checkpoints" else src
  out = cli.check_run_folder(Path(args.out) if args.out else (
      run / "criticality" if run.is_dir() else run.parent / f"criticality_{run.stem}"), "--out")
  rows = table_rows(doc)
  with open(out / "criticality.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=TABLE_FIELDS)
    w.writeheader()
    for r in rows:
      w.writerow({k: ("" if v is None else v) for k, v in r.items()})
  (out / "criticality.json").write_text(json.dumps(json_ready(doc), indent=1))
  print_report(doc, rows)
  print(f"\nwrote {out / 'criticality.csv'}, {out / 'criticality.json'}")
  return 0


if __name__ == "__main__":
  cli.main(main)

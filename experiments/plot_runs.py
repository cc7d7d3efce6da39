#!/usr/bin/env python
"""Loss curves of several runs on one plot, and their final numbers.

  python experiments/plot_runs.py runs/learned runs/identity [--labels a,b] --out curves.png

Reads each run's metrics.jsonl (a resumed run's later lines win), draws the
training loss (thin) and validation loss (markers) against the step, and
prints / writes (`--json`) per run: the last step, the final validation loss
and perplexity, the largest gradient norm seen.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pldr_jax.training.metrics_file import read_metrics


def read(workdir: Path) -> tuple[dict[int, dict], dict[int, dict]]:
  """({step: train record}, {step: eval metrics}) of a run's metrics.jsonl."""
  if not (Path(workdir) / "metrics.jsonl").is_file():
    raise SystemExit(f"{workdir}: no metrics.jsonl (not a pretraining run directory?)")
  return read_metrics(workdir)


def summary(label: str, train: dict, evals: dict) -> dict:
  last_eval = max(evals) if evals else None
  norms = [r["grad_norm"] for r in train.values() if "grad_norm" in r]
  loss = evals[last_eval]["loss"] if last_eval is not None else None
  return {"run": label, "last_step": max(train) if train else None, "eval_step": last_eval,
          "eval_loss": loss, "eval_perplexity": math.exp(loss) if loss is not None else None,
          "max_grad_norm": max(norms) if norms else None}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("runs", nargs="+")
  ap.add_argument("--labels", default=None, help="comma-separated, one per run")
  ap.add_argument("--out", required=True, help="PNG to write")
  ap.add_argument("--json", default=None, help="also write the summary here")
  ap.add_argument("--title", default="")
  a = ap.parse_args(argv)
  labels = a.labels.split(",") if a.labels else [Path(r).name for r in a.runs]
  if len(labels) != len(a.runs):
    raise SystemExit(f"--labels has {len(labels)} names for {len(a.runs)} runs")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  rows = []
  for run, label in zip(a.runs, labels):
    train, evals = read(Path(run))
    steps = sorted(train)
    line, = ax.plot(steps, [train[s]["loss"] for s in steps], lw=0.8, alpha=0.45)
    es = sorted(evals)
    ax.plot(es, [evals[s]["loss"] for s in es], "o-", color=line.get_color(), lw=1.8, ms=4,
            label=f"{label} (validation)")
    rows.append(summary(label, train, evals))
  ax.set_xlabel("step")
  ax.set_ylabel("loss (thin: training, markers: validation)")
  ax.set_title(a.title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(a.out, dpi=120)
  for r in rows:
    print(f"{r['run']:>12}: step {r['last_step']}, validation loss {r['eval_loss']:.4f} "
          f"(ppl {r['eval_perplexity']:.2f}) at step {r['eval_step']}, largest grad norm "
          f"{r['max_grad_norm']:.3g}")
  if a.json:
    Path(a.json).write_text(json.dumps(rows, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

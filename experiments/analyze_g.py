#!/usr/bin/env python
"""Analyse G_LM (and A_LM): spectra, numerical rank, sigma2/sigma1, log|det|, norms.

  python experiments/analyze_g.py SOURCE [--step N] [--out DIR] [--tol 1e-3]
                                  [--compare OTHER] [--compare_step N]

SOURCE / OTHER: a .npy [L, H, dk, dk] (taken as G_LM), a .npz, a checkpoint
directory (<workdir>/checkpoints; its g_lm item, latest step unless --step) or
a run workdir. Writes to --out (default: <run workdir>/analysis for a run or its
checkpoints, <folder>/analysis_<name> beside a .npy/.npz; never the working directory):
  g_metrics.csv     one row per tensor, layer, head (see pldr_jax.analysis)
  g_metrics.json    the same, plus per-layer summaries and all singular values
  spectra_<T>.png   singular values per layer (one line per head), log scale
  rank_<T>.png      numerical rank per layer x head heatmap
With --compare, also compare.csv, and prints per layer/head the RMSE and
log|det| of both and their differences to 15 decimals.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from pldr_jax import analysis, cli  # noqa: E402


def _json_float(x):
  x = float(x)
  return x if math.isfinite(x) else str(x)  # JSON has no inf/nan: "-inf", "nan"


def write_csv(path: Path, table: list[dict]) -> None:
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=list(table[0]))
    w.writeheader()
    for row in table:
      w.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def write_json(path: Path, source: str, step, tol: float, results: dict) -> None:
  doc = {"source": source, "step": step, "rank_tol": tol, "tensors": {}}
  for name, m in results.items():
    doc["tensors"][name] = {
        "layers_heads": list(m["rank"].shape),
        "dk": int(m["singular_values"].shape[-1]),
        "per_layer": {k: [_json_float(v) for v in vs]
                      for k, vs in analysis.per_layer_summary(m).items()},
        "per_head": [{k: (_json_float(v) if isinstance(v, float) else v) for k, v in r.items()
                      if k != "tensor"} for r in analysis.rows({name: m})],
        "singular_values": m["singular_values"].tolist(),
    }
  path.write_text(json.dumps(doc, indent=1))


def plot(out: Path, name: str, m: dict, title: str) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  s = m["singular_values"]
  n_layers, n_heads, dk = s.shape
  cols = min(n_layers, 3)
  rows_ = math.ceil(n_layers / cols)
  fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.2 * rows_), squeeze=False)
  tiny = np.finfo(np.float64).tiny
  for l in range(n_layers):
    ax = axes[l // cols][l % cols]
    for h in range(n_heads):
      ax.semilogy(np.arange(1, dk + 1), np.maximum(s[l, h], tiny), lw=0.8, alpha=0.8)
    med = np.nanmedian(m["sigma2_over_sigma1"][l])
    ax.set_title(f"layer {l} (median s2/s1 {med:.2g})", fontsize=9)
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i")
    ax.grid(True, which="major", alpha=0.3)
  for k in range(n_layers, rows_ * cols):
    axes[k // cols][k % cols].axis("off")
  fig.suptitle(f"{name} singular values per head: {title}", fontsize=10)
  fig.tight_layout()
  spectra = out / f"spectra_{name}.png"
  fig.savefig(spectra, dpi=100)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * n_heads + 2), max(2.5, 0.45 * n_layers + 1.5)))
  im = ax.imshow(m["rank"], cmap="viridis", vmin=0, vmax=dk, aspect="auto")
  for l in range(n_layers):
    for h in range(n_heads):
      ax.text(h, l, str(int(m["rank"][l, h])), ha="center", va="center", fontsize=7, color="w")
  ax.set_xlabel("head")
  ax.set_ylabel("layer")
  ax.set_xticks(range(n_heads))
  ax.set_yticks(range(n_layers))
  fig.colorbar(im, ax=ax, label=f"numerical rank (of {dk})")
  ax.set_title(f"{name} numerical rank: {title}", fontsize=9)
  fig.tight_layout()
  rank = out / f"rank_{name}.png"
  fig.savefig(rank, dpi=100)
  plt.close(fig)
  return [spectra, rank]


def print_summary(results: dict, tol: float) -> None:
  for name, m in results.items():
    summ = analysis.per_layer_summary(m)
    print(f"{name} [{m['rank'].shape[0]} layers x {m['rank'].shape[1]} heads, "
          f"dk {m['singular_values'].shape[-1]}], rank tol {tol:g}:")
    for l in range(m["rank"].shape[0]):
      print(f"  layer {l}: median sigma2/sigma1 {summ['median_sigma2_over_sigma1'][l]:.3g}  "
            f"rank median {summ['median_rank'][l]:g} (min {summ['min_rank'][l]}, "
            f"max {summ['max_rank'][l]})  mean RMSE {summ['mean_rmse'][l]:.4g}  "
            f"median log|det| {summ['median_logabsdet'][l]:.4g}")


def print_compare(table: list[dict]) -> None:
  print("\nper layer/head: RMSE and log|det| of SOURCE (a) and OTHER (b), diff = b - a")
  for r in table:
    print(f"{r['tensor']} layer {r['layer']} head {r['head']}: "
          f"rmse a {r['rmse_a']:.15f} b {r['rmse_b']:.15f} diff {r['rmse_diff']:.15f} | "
          f"logdet a {r['logabsdet_a']:.15f} b {r['logabsdet_b']:.15f} "
          f"diff {r['logabsdet_diff']:.15f}")
  diffs = [abs(r["rmse_diff"]) for r in table] + [abs(r["logabsdet_diff"]) for r in table]
  print(f"max |diff|: {max(diffs):.15f}")


def default_out(src: Path) -> Path:
  """Where the analysis of `src` goes without --out: inside the run it came from."""
  src = src.resolve()
  if src.is_dir():
    run = src.parent if (src.name == "checkpoints" or not (src / "checkpoints").is_dir()) else src
    return run / "analysis"
  return src.parent / f"analysis_{src.stem}"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("source", help=".npy/.npz, checkpoint directory or run workdir")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
  parser.add_argument("--out", default=None, help="output directory")
  parser.add_argument("--tol", type=float, default=analysis.DEFAULT_RANK_TOL,
                      help="numerical rank: count sigma_i > tol * sigma_1 (default %(default)g)")
  parser.add_argument("--compare", default=None, help="another source to compare with")
  parser.add_argument("--compare_step", type=int, default=None)
  parser.add_argument("--no_plots", action="store_true")
  args = parser.parse_args(argv)

  src = Path(args.source)
  tensors = analysis.load_tensors(src, args.step)  # a bad source fails before any folder
  out = cli.check_run_folder(Path(args.out) if args.out else default_out(src), "--out")
  results = analysis.analyze(tensors, args.tol)
  write_csv(out / "g_metrics.csv", analysis.rows(results))
  write_json(out / "g_metrics.json", str(src), args.step, args.tol, results)
  print_summary(results, args.tol)
  written = [out / "g_metrics.csv", out / "g_metrics.json"]
  if not args.no_plots:
    for name, m in results.items():
      written += plot(out, name, m, src.name)
  if args.compare:
    other = analysis.analyze(analysis.load_tensors(args.compare, args.compare_step), args.tol)
    try:
      table = analysis.compare(results, other)
    except ValueError as e:
      print(f"cannot compare {src} with {args.compare}: {e}", file=sys.stderr)
      return 2
    if not table:
      print(f"nothing to compare: tensors {sorted(results)} vs {sorted(other)}", file=sys.stderr)
      return 1
    write_csv(out / "compare.csv", table)
    written.append(out / "compare.csv")
    print_compare(table)
  print("\nwrote: " + ", ".join(str(p) for p in written))
  return 0


if __name__ == "__main__":
  cli.main(main)

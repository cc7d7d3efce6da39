#!/usr/bin/env python
"""Analyse G_LM (and A_LM): spectra, numerical rank, sigma2/sigma1, log|det|, norms, collapse.

  python experiments/analyze_g.py SOURCE [--step N] [--out DIR] [--tol 1e-3]
                                  [--compare OTHER] [--compare_step N]
                                  [--rope_layout interleaved|half]
                                  [--suffix_tokens N [--num_prompts 8 --prompt_len 64]]

SOURCE / OTHER: a .npy [L, H, dk, dk] (taken as G_LM), a .npz, a checkpoint
directory (<workdir>/checkpoints; its g_lm item, latest step unless --step) or
a run workdir. Writes to --out (default: <run workdir>/analysis for a run or its
checkpoints, <folder>/analysis_<name> beside a .npy/.npz; never the working directory):
  g_metrics.csv     one row per tensor, layer, head (see pldr_jax.analysis)
  g_metrics.json    the same, plus per-layer summaries and all singular values
  spectra_<T>.png   singular values per layer (one line per head), log scale
  rank_<T>.png      numerical rank per layer x head heatmap
  collapse.json     the rank-one collapse statistics (pldr_jax.analysis.collapse_statistics):
                    for A and A_LM (when the source has them) and G_LM, sigma2/sigma1,
                    numerical rank, row-variance ratio, cross-head spread; for G_LM also
                    the off-commutant residual ||G - Pi_comm G||/||G|| w.r.t. the RoPE
                    rotation planes (--rope_layout; default: the run's
                    PLDRConfig.rope_interleaved, else the authors' interleaved pairs)
With --suffix_tokens N (a run with its data), also whether G_LM is invariant to
the suffix: --num_prompts held-out prompts of --prompt_len tokens, N tokens
sampled after each without a cache (top-p 0.8, temperature 1), and the relative
change ||G(prompt + suffix) - G(prompt)|| / ||G(prompt)|| per (prompt, layer,
head); the collapse statistics are then those of the prompts' own A, A_LM, G_LM.
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

import numpy as np

from pldr_jax import analysis, cli, errors
from pldr_jax import criticality as crit


def _json_float(x):
  x = float(x)
  return x if math.isfinite(x) else str(x)  # JSON has no inf/nan: "-inf", "nan"


def _finite(x):
  """x with every float that JSON cannot hold (inf, nan) as a string."""
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  return _json_float(x) if isinstance(x, float) else x


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


def run_rope_layout(src: Path) -> bool | None:
  """PLDRConfig.rope_interleaved of the run a checkpoint source belongs to (None: not a run)."""
  if not src.is_dir():
    return None
  from pldr_jax import runs
  ckdir = runs.checkpoints_dir(src)
  if ckdir is None:
    return None
  from pldr_jax.training import checkpoint as ckpt_lib
  return bool(ckpt_lib.load_meta(ckdir).get("model", {}).get("rope_interleaved", True))


def suffix_collapse(src: Path, step, suffix_tokens: int, num_prompts: int, prompt_len: int,
                    tol: float) -> dict:
  """Collapse statistics of held-out prompts' A, A_LM, G_LM with G_LM's change when
  suffix_tokens sampled tokens are appended (no cache)."""
  import jax

  import pldr_jax
  m = pldr_jax.load(str(src), step=step)
  if m.data is None or m.tokenizer is None:
    raise errors.ConfigError(f"--suffix_tokens needs a training run with its data and "
                             f"tokenizer; {src} has none")
  if prompt_len + suffix_tokens > m.config.max_len:
    raise errors.ConfigError(f"--prompt_len {prompt_len} + --suffix_tokens {suffix_tokens} "
                             f"exceeds the context length {m.config.max_len}")
  prompts = crit.held_out_prompts(m.data, m.tokenizer, prompt_len, num_prompts)
  toks = crit.sample_uncached(m.params, m.config, prompts, suffix_tokens, jax.random.key(0),
                                  g_lm=m.g_lm)
  base = crit.cached_tensors(m.params, m.config, prompts, m.g_lm)
  suffixed = crit.deductive_tensors(m.params, m.config, toks, m.g_lm)
  return analysis.collapse_statistics(base, tol, interleaved=m.config.rope_interleaved,
                                      base=m.config.rope_base, suffixed=suffixed)


def print_collapse(collapse: dict, title: str) -> None:
  print(f"\ncollapse statistics ({title}): median [per-layer medians]")
  for name, st in collapse.items():
    for k, v in st.items():
      per = ", ".join(f"{x:.3g}" for x in v["per_layer_median"])
      print(f"  {name:<5} {k:<24} {v['median']:.4g}  [{per}]")


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
  parser.add_argument("--rope_layout", choices=("interleaved", "half"), default=None,
                      help="RoPE planes for G_LM's off-commutant residual (default: the run's, "
                           "else interleaved)")
  parser.add_argument("--suffix_tokens", type=int, default=0,
                      help="also test G_LM's invariance to a sampled suffix of N tokens (a run)")
  parser.add_argument("--num_prompts", type=int, default=8)
  parser.add_argument("--prompt_len", type=int, default=64)
  args = parser.parse_args(argv)
  if args.suffix_tokens < 0 or args.num_prompts < 1 or args.prompt_len < 1:
    raise errors.ConfigError("--suffix_tokens must be >= 0, --num_prompts and --prompt_len >= 1")

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
  layout = run_rope_layout(src) if args.rope_layout is None else args.rope_layout == "interleaved"
  interleaved = True if layout is None else layout
  collapse = {"source": analysis.collapse_statistics(tensors, args.tol, interleaved=interleaved)}
  print_collapse(collapse["source"], f"{src.name}, RoPE "
                 f"{'interleaved' if interleaved else 'half'}")
  if args.suffix_tokens:
    collapse["held_out_prompts"] = suffix_collapse(src, args.step, args.suffix_tokens,
                                                   args.num_prompts, args.prompt_len, args.tol)
    collapse["suffix"] = {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                          "suffix_tokens": args.suffix_tokens}
    print_collapse(collapse["held_out_prompts"],
                   f"{args.num_prompts} held-out prompts, suffix of {args.suffix_tokens} tokens")
  (out / "collapse.json").write_text(json.dumps(
      _finite({"rope_interleaved": interleaved, "rank_tol": args.tol, **collapse}), indent=1))
  written.append(out / "collapse.json")
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

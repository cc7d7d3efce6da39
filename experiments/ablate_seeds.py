#!/usr/bin/env python
"""The G_LM ablation sweep over several seeds: mean and spread per mode.

  python experiments/ablate_seeds.py --gin_file=experiments/configs/ablate_tiny.gin \\
      --seeds 1234,1,2 --out runs/ablate_seeds [--gin_param=...]

Runs experiments/ablate.py once per seed (`TrainConfig.seed`: parameter init and
the random G; the data order is the same for every seed), each into
`<out>/seed_<s>` with one shared data directory `<out>/data`, so a rerun resumes
where it stopped. Then writes `<out>/ablation_seeds.{csv,json,png}`: per mode the
final validation loss (mean, sample std, min, max over seeds) and the
validation-loss curves of every seed on one plot (mean drawn bold).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from pldr_jax import cli, errors, gin_configs
from pldr_jax.training.metrics_file import read_metrics

ABLATE = REPO / "experiments" / "ablate.py"
MODES = ("learned", "identity", "random", "transferred", "inference_only")


def run_seed(seed: int, gin_files, gin_params, out: Path) -> Path:
  """ablate.py for one seed; returns its output dir."""
  sd = out / f"seed_{seed}"
  cmd = ([sys.executable, str(ABLATE)] + [f"--gin_file={f}" for f in gin_files]
         + [f"--gin_param={p}" for p in gin_params]
         + [f"--gin_param=TrainConfig.seed={seed}",
            f"--gin_param=experiment.data_workdir={json.dumps(str(out / 'data'))}",
            f"--out={sd}"])
  print(f"seed {seed}: {' '.join(cmd)}", flush=True)
  rc = subprocess.run(cmd).returncode
  if rc:
    raise errors.TrainingError(
        f"seed {seed}: experiments/ablate.py stopped (exit {rc}; its own message is above). "
        "Rerun the same command to resume: finished runs are skipped")
  return sd


def check_config(gin_files, gin_params) -> list[str]:
  """The gin files (absolute) once the configs parse as every run will see them."""
  gin_configs.add_search_paths()
  files = cli.parse_gin(gin_files, gin_params)
  gin_configs.experiment()
  return files


def eval_curve(workdir: Path) -> list[tuple[int, float]]:
  """[(step, validation loss)] from a run's metrics.jsonl (later lines win)."""
  return sorted((step, float(m["loss"])) for step, m in read_metrics(workdir)[1].items())


def aggregate(seed_dirs: dict[int, Path]) -> list[dict]:
  rows = []
  for mode in MODES:
    finals = {}
    for seed, sd in seed_dirs.items():
      table = json.loads((sd / "ablation.json").read_text())
      rows_by_mode = {r["mode"]: r for r in table["modes"]}
      r = rows_by_mode.get(mode)
      if r is not None and r.get("eval_loss") is not None:
        finals[seed] = float(r["eval_loss"])
    if not finals:
      continue
    vals = list(finals.values())
    rows.append({"mode": mode, "seeds": len(vals),
                 "eval_loss_mean": statistics.fmean(vals),
                 "eval_loss_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                 "eval_loss_min": min(vals), "eval_loss_max": max(vals),
                 "per_seed": {str(k): v for k, v in finals.items()}})
  return rows


def plot(seed_dirs: dict[int, Path], rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  fig, ax = plt.subplots(figsize=(7, 4.5))
  colors = dict(zip(MODES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
  for mode in MODES[:4]:
    curves = [eval_curve(sd / mode) for sd in seed_dirs.values()]
    curves = [c for c in curves if c]
    for c in curves:
      ax.plot([s for s, _ in c], [v for _, v in c], color=colors[mode], alpha=0.3, lw=1)
    steps = sorted(set.intersection(*[{s for s, _ in c} for c in curves])) if curves else []
    if steps:
      mean = [np.mean([dict(c)[s] for c in curves]) for s in steps]
      ax.plot(steps, mean, color=colors[mode], lw=2.2, label=f"{mode} (mean of {len(curves)})")
  for r in rows:
    if r["mode"] == "inference_only":
      ax.axhline(r["eval_loss_mean"], color=colors["inference_only"], ls="--", lw=1.5,
                 label="inference_only (final)")
  ax.set_xlabel("step")
  ax.set_ylabel("validation loss")
  ax.set_title("G_LM ablation, tiny config: validation loss per seed (thin) and mean (bold)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gin_file", action="append", required=True)
  ap.add_argument("--gin_param", action="append", default=[])
  ap.add_argument("--seeds", default="1234,1,2")
  ap.add_argument("--out", default="runs/ablate_seeds")
  a = ap.parse_args(argv)
  try:
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
  except ValueError:
    ap.error(f"--seeds must be comma-separated integers, got {a.seeds!r}")
  if len(seeds) < 1:
    ap.error("--seeds: give at least one seed")
  check_config(a.gin_file, a.gin_param)  # a typo or a missing gin file: now, not per seed
  out = cli.check_run_folder(Path(a.out), "--out")
  seed_dirs = {s: run_seed(s, a.gin_file, a.gin_param, out) for s in seeds}
  rows = aggregate(seed_dirs)
  with open(out / "ablation_seeds.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=["mode", "seeds", "eval_loss_mean", "eval_loss_std",
                                      "eval_loss_min", "eval_loss_max"])
    w.writeheader()
    for r in rows:
      w.writerow({k: r[k] for k in w.fieldnames})
  (out / "ablation_seeds.json").write_text(json.dumps(
      {"seeds": seeds, "gin_files": a.gin_file, "gin_params": a.gin_param, "rows": rows},
      indent=1))
  plot(seed_dirs, rows, out / "ablation_seeds.png")
  print(f"{'mode':<15} {'val loss mean':>13} {'± std':>8}  min..max")
  for r in rows:
    print(f"{r['mode']:<15} {r['eval_loss_mean']:>13.4f} {r['eval_loss_std']:>8.4f}  "
          f"{r['eval_loss_min']:.4f}..{r['eval_loss_max']:.4f}")
  return 0


if __name__ == "__main__":
  cli.main(main)

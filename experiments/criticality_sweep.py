#!/usr/bin/env python
"""Self-organized-criticality sweep: train one model per (max learning rate, warm-up) and
measure each one's order parameter, audit statistics and rank-one collapse.

  python experiments/criticality_sweep.py --gin_file=experiments/configs/criticality_tiny.gin \\
      [--out runs/criticality] [--lrs 3e-4,6e-4,...] [--warmups 6,48] [--jobs 1]
      [--num_prompts 26] [--prompt_len 64] [--max_new_tokens 64] [--audit_tokens 64]

Every grid point is a subprocess of experiments/pretrain.py with the same gin
files and bindings (same data, steps, seed) plus `TrainConfig.learning_rate`
and `TrainConfig.warmup_steps`, its own workdir `<out>/lr<LR>_wu<W>` and one
shared `experiment.data_workdir` (the gin value, else `<out>/data`; built
once, here). After training, each run's final checkpoint is measured with
`pldr_jax.criticality.criticality` (held-out prompts of the run's validation
split; see experiments/criticality.py) into `<run>/criticality.json`.

Resumable: a run whose metrics.jsonl has a train record at the final step is
not trained again (an unfinished one is restarted with the same command and
resumes from its newest checkpoint); a criticality.json made from the same
checkpoint step with the same settings is not recomputed. Several processes:
start the sweep once per process with pretrain.py's
`--coordinator_address/--num_processes/--process_id` (or the JAX_* variables,
a SLURM/TPU cluster); each training run is one multi-process pretrain.py and
process 0 measures the runs and writes the outputs. `--jobs N` trains N runs
at once on one machine.

Writes to --out: sweep.csv, sweep.json (per run: lr, warm-up, final validation
loss, the paper's order parameter of A, A_LM, A_P, G_LM, the audit variant's
medians, the collapse statistics; the Spearman correlations), sweep_grid.png
(order parameter over the lr x warm-up grid), sweep_vs_loss.png (order
parameter against the final validation loss), sweep_curves.png (loss curves).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pldr_jax import cli, criticality, errors, gin_configs
from pldr_jax.training import distributed
from pldr_jax.training.metrics_file import read_metrics

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "experiments" / "pretrain.py"
DEFAULT_LRS = (3e-4, 6e-4, 1.2e-3, 2.4e-3, 4.8e-3)
DEFAULT_WARMUPS = (6, 48)

FIELDS = ("run", "lr", "warmup", "final_step", "train_loss", "eval_loss",
          "op_G_LM", "op_A_LM", "op_A_P", "op_A", "rel_rmse_G_LM", "rmse12_G_LM",
          "audit_rms_G_LM", "audit_mu_G_LM", "audit_rms_A_LM", "audit_mu_A_LM",
          "A_s2_s1", "A_rank", "A_row_var", "A_head_spread", "A_LM_s2_s1", "A_LM_rank",
          "G_LM_rank", "G_LM_off_commutant", "G_LM_suffix_change")


def _gin_str(s) -> str:
  return json.dumps(str(s))


def run_name(lr: float, warmup: int) -> str:
  return f"lr{lr:g}_wu{warmup}"


def parse_list(text: str, kind, flag: str) -> list:
  try:
    values = [kind(v) for v in text.split(",") if v.strip()]
  except ValueError:
    raise errors.ConfigError(f"{flag}={text!r}: expected comma-separated "
                             f"{'numbers' if kind is float else 'integers'}") from None
  if not values:
    raise errors.ConfigError(f"{flag} is empty")
  if kind is float and any(v <= 0 for v in values):
    raise errors.ConfigError(f"{flag}={text!r}: learning rates must be > 0")
  if kind is int and any(v < 0 for v in values):
    raise errors.ConfigError(f"{flag}={text!r}: warm-up steps must be >= 0")
  return values


# ---------------------------------------------------------------- training

def train_command(lr, warmup, gin_files, gin_params, wd: Path, data_workdir: Path,
                  launch_flags=()) -> list[str]:
  params = list(gin_params) + [f"TrainConfig.learning_rate={lr!r}",
                               f"TrainConfig.warmup_steps={int(warmup)}",
                               f"experiment.data_workdir={_gin_str(data_workdir)}"]
  return ([sys.executable, str(PRETRAIN)] + [f"--gin_file={f}" for f in gin_files]
          + [f"--workdir={wd}", "--no_progress"] + [f"--gin_param={p}" for p in params]
          + list(launch_flags))


def is_finished(wd: Path, num_steps: int) -> bool:
  return num_steps in read_metrics(wd)[0]


def train_all(grid, gin_files, gin_params, out: Path, data_workdir: Path, num_steps: int,
              jobs: int, launch_flags=()) -> None:
  todo = []
  for lr, wu in grid:
    wd = out / run_name(lr, wu)
    if is_finished(wd, num_steps):
      print(f"{wd.name}: finished (step {num_steps}) -- skipped", flush=True)
    else:
      todo.append((lr, wu))
  running = {}
  try:
    while todo or running:
      while todo and len(running) < jobs:
        lr, wu = todo.pop(0)
        wd = out / run_name(lr, wu)
        wd.mkdir(parents=True, exist_ok=True)
        cmd = train_command(lr, wu, gin_files, gin_params, wd, data_workdir, launch_flags)
        (wd / "command.json").write_text(json.dumps(cmd, indent=1))
        print(f"{wd.name}: {'resuming' if (wd / 'metrics.jsonl').exists() else 'starting'} "
              f"(log: {wd / 'log.txt'})", flush=True)
        log = open(wd / "log.txt", "a")
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        # env: Python's view of the environment, not the C-level one, which a TPU
        # library loaded in this process may have extended (e.g. TPU_WORKER_HOSTNAMES set
        # to a warning text): the child would take that for a TPU cluster.
        running[wd] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                        env=dict(os.environ)), log, time.time())
      time.sleep(0.5)
      for wd, (proc, log, t0) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        log.close()
        del running[wd]
        if rc != 0 or not is_finished(wd, num_steps):
          raise errors.TrainingError(f"{wd.name} run failed (exit {rc}): see {wd / 'log.txt'}. "
                                     "Rerun the sweep to resume.")
        print(f"{wd.name}: trained in {time.time() - t0:.0f}s", flush=True)
  finally:  # interrupted or failed: stop the children; a rerun resumes
    for proc, log, _ in running.values():
      if proc.poll() is None:
        proc.terminate()
        proc.wait()
      log.close()


# ---------------------------------------------------------------- measuring

def measure(wd: Path, settings: dict) -> dict:
  """<wd>/criticality.json for the run's final checkpoint (cached per step and settings)."""
  path = wd / "criticality.json"
  from pldr_jax.training import checkpoint as ckpt_lib
  step = int(ckpt_lib.load_meta(wd / "checkpoints")["step"])
  if path.is_file():
    doc = json.loads(path.read_text())
    if doc.get("step") == step and doc.get("request") == settings:
      print(f"{wd.name}: criticality of step {step} -- cached", flush=True)
      return doc
  doc = criticality.measure_run(wd, **settings)
  doc["request"] = settings
  path.write_text(json.dumps(criticality.json_ready(doc), indent=1))
  g = doc["paper"]["G_LM"]
  print(f"{wd.name}: order parameter (G_LM) {g['order_parameter']:.3g} "
        f"({doc['seconds']:.0f}s)", flush=True)
  return doc


def row_of(lr, wu, wd: Path, doc: dict | None) -> dict:
  row = dict.fromkeys(FIELDS)
  row.update(run=wd.name, lr=lr, warmup=wu)
  train, evals = read_metrics(wd)
  if train:
    row.update(final_step=max(train), train_loss=train[max(train)]["loss"])
  if evals:
    row["eval_loss"] = evals[max(evals)]["loss"]
  if doc is None:
    return row
  paper, audit, col = doc["paper"], doc["audit"], doc["collapse"]
  for name in ("G_LM", "A_LM", "A_P", "A"):
    if name in paper:
      row[f"op_{name}"] = paper[name]["order_parameter"]
  if "G_LM" in paper:
    g = paper["G_LM"]
    row["rmse12_G_LM"] = g["rmse_12"]
    row["rel_rmse_G_LM"] = g["rmse_1c"] / math.hypot(g["mean_c"], g["std_c"]) if (
        g["mean_c"] or g["std_c"]) else 0.0  # = relative_rmse_1c: rms_c^2 = mean_c^2 + std_c^2
  for name in ("G_LM", "A_LM"):
    if name in audit:
      row[f"audit_rms_{name}"] = audit[name]["audit_rms"]["median"]
      row[f"audit_mu_{name}"] = audit[name]["audit_mu"]["median"]
  med = lambda t, s: col.get(t, {}).get(s, {}).get("median")
  row.update(A_s2_s1=med("A", "sigma2_over_sigma1"), A_rank=med("A", "rank"),
             A_row_var=med("A", "row_variance_ratio"), A_head_spread=med("A", "cross_head_spread"),
             A_LM_s2_s1=med("A_LM", "sigma2_over_sigma1"), A_LM_rank=med("A_LM", "rank"),
             G_LM_rank=med("G_LM", "rank"), G_LM_off_commutant=med("G_LM", "off_commutant_residual"),
             G_LM_suffix_change=med("G_LM", "suffix_relative_change"))
  return row


# ---------------------------------------------------------------- statistics, table, plots

def ranks(x) -> np.ndarray:
  """Average ranks (ties share the mean of their positions), 1-based."""
  x = np.asarray(x, np.float64)
  order = np.argsort(x, kind="mergesort")
  r = np.empty(len(x))
  i = 0
  while i < len(x):
    j = i
    while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
      j += 1
    r[order[i:j + 1]] = 0.5 * (i + j) + 1
    i = j + 1
  return r


def spearman(x, y) -> dict:
  """Spearman's rho (and its p-value when scipy is installed) over the finite pairs."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  x, y = x[ok], y[ok]
  if len(x) < 3:
    return {"rho": None, "p": None, "n": int(len(x))}
  try:
    from scipy.stats import spearmanr
    res = spearmanr(x, y)
    rho, p = float(res.statistic), float(res.pvalue)
  except ImportError:
    rx, ry = ranks(x), ranks(y)
    rho, p = float(np.corrcoef(rx, ry)[0, 1]), None
  return {"rho": rho if math.isfinite(rho) else None, "p": p, "n": int(len(x))}


def correlations(table: list[dict]) -> dict:
  col = lambda k: [np.nan if r[k] is None else r[k] for r in table]
  out = {}
  for k in ("op_G_LM", "op_A_LM", "op_A_P", "rel_rmse_G_LM", "audit_rms_G_LM", "audit_mu_G_LM",
            "G_LM_suffix_change", "A_s2_s1"):
    out[f"{k}_vs_eval_loss"] = spearman(col(k), col("eval_loss"))
  for k in ("op_G_LM", "rel_rmse_G_LM", "audit_rms_G_LM"):
    out[f"{k}_vs_lr"] = spearman(col(k), col("lr"))
    out[f"{k}_vs_warmup"] = spearman(col(k), col("warmup"))
  out["eval_loss_vs_lr"] = spearman(col("eval_loss"), col("lr"))
  return out


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def write_outputs(out: Path, table: list[dict], corr: dict, extra: dict) -> None:
  with open(out / "sweep.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    for r in table:
      w.writerow({k: ("" if v is None else v) for k, v in r.items()})
  doc = {**extra, "spearman": corr, "runs": [{k: _clean(v) for k, v in r.items()}
                                             for r in table]}
  (out / "sweep.json").write_text(json.dumps(doc, indent=1))


def _fmt(v, spec):
  return "-" if v is None else format(v, spec)


def print_table(table: list[dict], corr: dict) -> None:
  print(f"\n{'run':<16} {'eval loss':>9} {'OP G_LM':>9} {'rel G_LM':>9} {'OP A_LM':>9} {'OP A_P':>9} "
        f"{'aud rms':>8} {'aud mu':>9} {'A s2/s1':>8} {'A_LM rk':>7} {'G offc':>6} "
        f"{'G sfx':>7}")
  for r in table:
    print(f"{r['run']:<16} {_fmt(r['eval_loss'], '9.4f')} {_fmt(r['op_G_LM'], '9.3g')} "
          f"{_fmt(r['rel_rmse_G_LM'], '9.3g')} "
          f"{_fmt(r['op_A_LM'], '9.3g')} {_fmt(r['op_A_P'], '9.3g')} "
          f"{_fmt(r['audit_rms_G_LM'], '8.3g')} {_fmt(r['audit_mu_G_LM'], '9.3g')} "
          f"{_fmt(r['A_s2_s1'], '8.2g')} {_fmt(r['A_LM_rank'], '7g')} "
          f"{_fmt(r['G_LM_off_commutant'], '6.3f')} {_fmt(r['G_LM_suffix_change'], '7.3g')}")
  print("\nSpearman rho (n):")
  for k, v in corr.items():
    rho = "-" if v["rho"] is None else f"{v['rho']:+.3f}"
    p = "" if v.get("p") is None else f", p {v['p']:.3g}"
    print(f"  {k:<32} {rho} (n {v['n']}{p})")


def plot(out: Path, table: list[dict], lrs, warmups, corr: dict) -> list[Path]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  by = {(r["lr"], r["warmup"]): r for r in table}
  keys = (("op_G_LM", "paper order parameter, G_LM (RMSE_1C/|mu_C|)"),
          ("rel_rmse_G_LM", "RMSE_1C/RMS_C, G_LM (not the paper's)"),
          ("audit_rms_G_LM", "audit, RMS-normalised (<= 2), G_LM median"),
          ("audit_mu_G_LM", "audit, mean-normalised, G_LM median"))
  fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 4))
  for ax, (k, title) in zip(axes, keys + (("eval_loss", "final validation loss"),)):
    grid = np.full((len(warmups), len(lrs)), np.nan)
    for i, wu in enumerate(warmups):
      for j, lr in enumerate(lrs):
        v = by.get((lr, wu), {}).get(k)
        if v is not None and np.isfinite(v):
          grid[i, j] = v if k == "eval_loss" else np.log10(max(v, 1e-30))
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
    for i in range(len(warmups)):
      for j in range(len(lrs)):
        v = by.get((lrs[j], warmups[i]), {}).get(k)
        if v is not None:
          ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs], fontsize=7)
    ax.set_yticks(range(len(warmups)), [str(v) for v in warmups])
    ax.set_xlabel("max learning rate")
    ax.set_ylabel("warm-up steps")
    ax.set_title(title if k == "eval_loss" else f"log10 {title}", fontsize=8)
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  p = out / "sweep_grid.png"
  fig.savefig(p, dpi=100)
  plt.close(fig)
  written.append(p)

  fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
  for ax, (k, title) in zip(axes, keys):
    xs = [r["eval_loss"] for r in table if r[k] is not None and r["eval_loss"] is not None]
    ys = [r[k] for r in table if r[k] is not None and r["eval_loss"] is not None]
    names = [r["run"] for r in table if r[k] is not None and r["eval_loss"] is not None]
    ax.scatter(xs, ys, c=[math.log10(r["lr"]) for r in table
                          if r[k] is not None and r["eval_loss"] is not None], cmap="plasma")
    for x, y, n in zip(xs, ys, names):
      ax.annotate(n, (x, y), fontsize=6)
    if ys and min(ys) > 0:
      ax.set_yscale("log")
    c = corr.get(f"{k}_vs_eval_loss", {})
    rho = "n/a" if c.get("rho") is None else f"{c['rho']:+.2f}"
    ax.set_title(f"{title}\nSpearman rho vs validation loss: {rho} (n {c.get('n')})", fontsize=8)
    ax.set_xlabel("final validation loss")
    ax.grid(True, alpha=0.3)
  fig.tight_layout()
  p = out / "sweep_vs_loss.png"
  fig.savefig(p, dpi=100)
  plt.close(fig)
  written.append(p)

  fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in table:
    train, evals = read_metrics(out / r["run"])
    s = sorted(train)
    line, = ax_t.plot(s, [train[k]["loss"] for k in s], lw=1, label=r["run"])
    e = sorted(evals)
    ax_v.plot(e, [evals[k]["loss"] for k in e], "o-", ms=3, lw=1, color=line.get_color(),
              label=r["run"])
  for ax, t in ((ax_t, "train loss"), (ax_v, "validation loss")):
    ax.set_title(t)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
  ax_t.set_ylim(top=min(ax_t.get_ylim()[1], 8))
  fig.tight_layout()
  p = out / "sweep_curves.png"
  fig.savefig(p, dpi=100)
  plt.close(fig)
  written.append(p)
  return written


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--out", default="runs/criticality")
  parser.add_argument("--lrs", default=",".join(f"{v:g}" for v in DEFAULT_LRS),
                      help="max learning rates, comma-separated (default %(default)s)")
  parser.add_argument("--warmups", default=",".join(str(v) for v in DEFAULT_WARMUPS),
                      help="warm-up steps, comma-separated (default %(default)s)")
  parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
  parser.add_argument("--num_prompts", type=int, default=26)
  parser.add_argument("--prompt_len", type=int, default=64)
  parser.add_argument("--max_new_tokens", type=int, default=64)
  parser.add_argument("--audit_tokens", type=int, default=64)
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--top_p", type=float, default=0.8)
  parser.add_argument("--seed", type=int, default=0, help="sampling seed of the measurement")
  parser.add_argument("--no_measure", action="store_true", help="train only")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  launch = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id)
  index = distributed.launch_index(launch)
  if launch.mode != "single" and args.jobs != 1:
    parser.error("with several processes the runs share one coordinator: use --jobs 1")
  if args.jobs < 1:
    parser.error("--jobs must be >= 1")
  lrs = parse_list(args.lrs, float, "--lrs")
  warmups = parse_list(args.warmups, int, "--warmups")
  grid = [(lr, wu) for wu in warmups for lr in lrs]
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup: stop the children
  out = Path(args.out).resolve()

  gin_files = cli.parse_gin(args.gin_file, args.gin_param)  # fails here on a bad binding
  run = gin_configs.experiment()
  num_steps = run["train"].num_steps
  if any(wu >= num_steps for wu in warmups):
    raise errors.ConfigError(f"--warmups {warmups}: every warm-up must be shorter than "
                             f"TrainConfig.num_steps={num_steps}")
  data_workdir = Path(run["data_workdir"]).resolve() if run["data_workdir"] else out / "data"
  run["data_workdir"] = str(data_workdir)
  cli.check_run_folder(out, "--out")
  if index == 0:
    gin_configs.resolve_data(run)  # the shared dataset and tokenizer, built once before the runs
  settings = {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
              "max_new_tokens": args.max_new_tokens, "audit_tokens": args.audit_tokens,
              "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed}

  t0 = time.time()
  train_all(grid, gin_files, list(args.gin_param), out, data_workdir, num_steps, args.jobs,
            distributed.launch_flags(launch))
  if index != 0:
    print(f"process {index}: the training runs finished; process 0 measures them")
    return 0
  table = []
  for lr, wu in grid:
    wd = out / run_name(lr, wu)
    doc = None if args.no_measure else measure(wd, settings)
    table.append(row_of(lr, wu, wd, doc))
  corr = correlations(table)
  write_outputs(out, table, corr, {"num_steps": num_steps, "gin_files": gin_files,
                                   "gin_params": list(args.gin_param), "lrs": lrs,
                                   "warmups": warmups, "measure": settings,
                                   "data_workdir": str(data_workdir)})
  written = plot(out, table, lrs, warmups, corr)
  print_table(table, corr)
  print(f"\nsweep took {time.time() - t0:.0f}s\ntable: {out / 'sweep.csv'}, {out / 'sweep.json'}"
        f"\nplots: " + ", ".join(str(p) for p in written))
  return 0


if __name__ == "__main__":
  cli.main(main)

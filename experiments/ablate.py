#!/usr/bin/env python
"""G_LM ablation sweep: learned, identity, random, transferred G and inference-only.

  python experiments/ablate.py --gin_file=experiments/configs/ablate_tiny.gin \\
      [--gin_param=...] [--out runs/ablate] [--jobs 1]

Each training mode is a subprocess of experiments/pretrain.py with the same gin
files and bindings (same data, steps, seed) plus `PLDRConfig.g_mode`, its own
workdir `<out>/<mode>` and one shared `experiment.data_workdir` (the gin value,
else `<out>/data`; built once, here, before any run starts):

  learned         the full PLDR-LLM (metric learner + power-law attention)
  identity        G_LM = I (SDPA), no metric learner / power-law weights
  random          G_LM a fixed random tensor
  transferred     G_LM loaded from the learned run's final checkpoint
                  (experiment.g_source = <out>/learned/checkpoints)
  inference_only  no training: the learned model's weights without the metric
                  learner and power-law tensors, run as g_mode='transferred'
                  with the G_LM the learned model builds from the prompt
                  [START] alone; evaluated on the same validation batches

The sweep resumes: a run whose metrics.jsonl has a train record at the final
step is skipped; an unfinished one is started again with the same command
(pretrain.py resumes from its newest checkpoint); inference_only is redone
only when its result is missing or older than the learned checkpoint.
`--jobs N` runs up to N training runs at once (transferred waits for learned).

Several processes: start the sweep once per process with the
`--coordinator_address/--num_processes/--process_id` of pretrain.py (or the
JAX_* variables, or a SLURM/TPU cluster); each training run is then one
multi-process pretrain.py (one run at a time), and process 0 evaluates
inference_only and writes the table and plot.

Writes <out>/ablation.csv and ablation.json (final train loss/accuracy, final
validation loss/perplexity/accuracy per mode) and ablation.png (train and
validation loss and token accuracy per mode). Run logs: <out>/<mode>/log.txt.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
from pldr_jax import cli, errors, gin_configs
from pldr_jax.training import distributed
from pldr_jax.training.metrics_file import read_metrics

PRETRAIN = REPO / "experiments" / "pretrain.py"

TRAINED = ("learned", "identity", "random", "transferred")
MODES = TRAINED + ("inference_only",)
DEPENDS = {"transferred": "learned"}
START_ID = 2  # [START]
FIELDS = ("mode", "final_step", "train_loss", "train_accuracy", "eval_loss", "eval_perplexity",
          "eval_accuracy", "workdir")


# ---------------------------------------------------------------- configuration

def _gin_file(name: str) -> str:
  """Absolute path of a gin file given relative to the cwd or to the repo."""
  return cli.gin_file(name, (REPO,))


def _gin_str(s) -> str:
  return json.dumps(str(s))  # a double-quoted, escaped string literal gin accepts


def load_run(gin_files: list[str], gin_params: list[str]) -> dict:
  """The experiment dict (pldr_jax.gin_configs.experiment) of the gin files and bindings."""
  gin_configs.add_search_paths()
  cli.parse_gin(gin_files, gin_params, (REPO,))  # clears earlier bindings first
  return gin_configs.experiment()


def train_command(mode: str, gin_files: list[str], gin_params: list[str], out: Path,
                  data_workdir: Path, launch_flags: list[str] = ()) -> list[str]:
  params = list(gin_params) + [f"PLDRConfig.g_mode={_gin_str(mode)}",
                               f"experiment.data_workdir={_gin_str(data_workdir)}"]
  if mode == "transferred":
    params.append(f"experiment.g_source={_gin_str(out / 'learned' / 'checkpoints')}")
  return ([sys.executable, str(PRETRAIN)] + [f"--gin_file={f}" for f in gin_files]
          + [f"--workdir={out / mode}", "--no_progress"] + [f"--gin_param={p}" for p in params]
          + list(launch_flags))


# ---------------------------------------------------------------- metrics files

def is_finished(workdir: Path, num_steps: int) -> bool:
  return num_steps in read_metrics(workdir)[0]


# ---------------------------------------------------------------- the training runs

def run_training(modes, gin_files, gin_params, out: Path, data_workdir: Path, num_steps: int,
                 jobs: int, launch_flags: list[str] = ()) -> None:
  """Start the unfinished runs (up to `jobs` at once, dependencies first)."""
  todo = []
  for mode in modes:
    if is_finished(out / mode, num_steps):
      print(f"{mode}: finished (step {num_steps}) -- skipped", flush=True)
    else:
      todo.append(mode)
  running: dict[str, tuple[subprocess.Popen, object, float]] = {}
  done = set(m for m in modes if m not in todo)
  try:
    _schedule(todo, running, done, modes, gin_files, gin_params, out, data_workdir, num_steps,
              jobs, launch_flags)
  finally:  # interrupted (Ctrl-C, SIGTERM, a failed run): stop the children; rerun resumes
    for proc, log, _ in running.values():
      if proc.poll() is None:
        proc.terminate()
        proc.wait()
      log.close()


def _schedule(todo, running, done, modes, gin_files, gin_params, out, data_workdir, num_steps,
              jobs, launch_flags):
  while todo or running:
    for mode in list(todo):
      dep = DEPENDS.get(mode)
      if len(running) >= jobs or (dep is not None and dep in modes and dep not in done):
        continue
      wd = out / mode
      wd.mkdir(parents=True, exist_ok=True)
      cmd = train_command(mode, gin_files, gin_params, out, data_workdir, launch_flags)
      (wd / "command.json").write_text(json.dumps(cmd, indent=1))
      resumed = (wd / "metrics.jsonl").exists()
      print(f"{mode}: {'resuming' if resumed else 'starting'} -> {wd} (log: {wd / 'log.txt'})",
            flush=True)
      log = open(wd / "log.txt", "a")
      log.write(f"\n$ {' '.join(cmd)}\n")
      log.flush()
      running[mode] = (subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                       log, time.time())
      todo.remove(mode)
    time.sleep(0.2)
    for mode, (proc, log, t0) in list(running.items()):
      rc = proc.poll()
      if rc is None:
        continue
      log.close()
      del running[mode]
      if rc != 0 or not is_finished(out / mode, num_steps):
        log_path = out / mode / "log.txt"
        raise errors.TrainingError(f"{mode} run failed (exit {rc}): {_last_error(log_path)}; "
                                   f"its log is {log_path}. Rerun the sweep to resume.")
      done.add(mode)
      print(f"{mode}: finished in {time.time() - t0:.1f}s", flush=True)


def _last_error(log_path: Path) -> str:
  """The last 'error: ...' line of a run's log (pretrain.py's one-line error), else its
  last non-empty line."""
  try:
    lines = [l.strip() for l in log_path.read_text(errors="replace").splitlines() if l.strip()]
  except OSError:
    return "no log"
  errs = [l for l in lines if l.startswith("error: ")]
  last = errs[-1].removeprefix("error: ") if errs else (lines[-1] if lines else "empty log")
  return last.removesuffix(f" (run with {cli.DEBUG_FLAG} for the traceback)")


# ---------------------------------------------------------------- inference-only

def strip_metric_learner(params: dict, config) -> dict:
  """The parameters a fixed-G model of `config` has (drops metric learner and PLGA tensors)."""
  from pldr_jax.params import without_g_network
  del config  # every fixed-G config has the same layer keys
  return without_g_network(params)


def inference_only(run: dict, data, learned: Path, wd: Path, prompt=(START_ID,)) -> dict:
  """Evaluate the learned model as g_mode='transferred' with G_LM from `prompt`; cached."""
  import jax
  import numpy as np

  from pldr_jax.training import checkpoint as ckpt_lib, train as train_lib
  from pldr_jax import g_modes
  from pldr_jax.config import PLDRConfig
  from pldr_jax.data import load_tokenizer, make_eval_batches
  from pldr_jax.training.trainer import probe_g_lm, restore_for_inference

  ckdir = learned / "checkpoints"
  meta = ckpt_lib.load_meta(ckdir)
  step = int(meta["step"])
  result_path = wd / "metrics.json"
  if result_path.is_file():
    cached = json.loads(result_path.read_text())
    if cached.get("source_step") == step and cached.get("source") == str(ckdir):
      print(f"inference_only: done (learned step {step}) -- skipped", flush=True)
      return cached
  wd.mkdir(parents=True, exist_ok=True)
  config = PLDRConfig(**meta["model"])
  tc = run["train"]
  mesh = train_lib.make_mesh(tc)
  with jax.set_mesh(mesh):
    params, _, _ = restore_for_inference(ckdir, config, step)
    g = probe_g_lm(params, config, np.asarray(prompt, np.int32))["G_LM"]
    fixed = config.replace(g_mode="transferred")
    params = strip_metric_learner(params, fixed)
    g = g_modes.check_g(fixed, g)
    tok = load_tokenizer(data.tokenizer_path)
    batches = make_eval_batches(data, tok, shard_index=jax.process_index(),
                                shard_count=jax.process_count())
    eval_step = train_lib.make_eval_step(fixed, mesh, g)
    metrics = train_lib.evaluate(eval_step, params, batches, mesh)
  np.save(wd / "g_lm_prompt.npy", np.asarray(g, np.float32))
  result = {"source": str(ckdir), "source_step": step, "prompt": list(prompt),
            "g_mode": "transferred", "eval": metrics}
  result_path.write_text(json.dumps(result, indent=1))
  print(f"inference_only: eval loss {metrics['loss']:.4f} ppl {metrics['perplexity']:.2f} "
        f"acc {metrics['accuracy']:.4f} (learned weights of step {step}, G_LM from {list(prompt)})",
        flush=True)
  return result


# ---------------------------------------------------------------- table and plot

def summarize(out: Path, modes, num_steps: int) -> list[dict]:
  table = []
  for mode in modes:
    wd = out / mode
    row = dict.fromkeys(FIELDS)
    row.update(mode=mode, workdir=str(wd))
    if mode == "inference_only":
      path = wd / "metrics.json"
      if path.is_file():
        ev = json.loads(path.read_text())["eval"]
        row.update(final_step=0, eval_loss=ev["loss"], eval_perplexity=ev["perplexity"],
                   eval_accuracy=ev["accuracy"])
    else:
      train, evals = read_metrics(wd)
      if train:
        last = train[max(train)]
        row.update(final_step=max(train), train_loss=last["loss"],
                   train_accuracy=last.get("accuracy"))
      if evals:
        ev = evals[max(evals)]
        row.update(eval_loss=ev["loss"], eval_perplexity=ev["perplexity"],
                   eval_accuracy=ev["accuracy"])
    table.append(row)
  return table


def write_table(out: Path, table: list[dict], extra: dict) -> None:
  with open(out / "ablation.csv", "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    for row in table:
      w.writerow({k: ("" if v is None else v) for k, v in row.items()})
  clean = [{k: (v if not isinstance(v, float) or math.isfinite(v) else None)
            for k, v in row.items()} for row in table]
  (out / "ablation.json").write_text(json.dumps({**extra, "modes": clean}, indent=1))


def plot(out: Path, modes, table: list[dict]) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  (ax_tl, ax_vl), (ax_ta, ax_va) = axes
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  rows = {r["mode"]: r for r in table}
  x_max = 1
  for i, mode in enumerate(modes):
    c = colors[i % len(colors)]
    if mode == "inference_only":
      continue
    train, evals = read_metrics(out / mode)
    steps = sorted(train)
    if steps:
      x_max = max(x_max, steps[-1])
      ax_tl.plot(steps, [train[s]["loss"] for s in steps], color=c, lw=1, label=mode)
      ax_ta.plot(steps, [train[s].get("accuracy", float("nan")) for s in steps], color=c, lw=1,
                 label=mode)
    es = sorted(evals)
    if es:
      ax_vl.plot(es, [evals[s]["loss"] for s in es], "o-", color=c, ms=3, label=mode)
      ax_va.plot(es, [evals[s]["accuracy"] for s in es], "o-", color=c, ms=3, label=mode)
  if "inference_only" in rows and rows["inference_only"]["eval_loss"] is not None:
    c = colors[modes.index("inference_only") % len(colors)]
    r = rows["inference_only"]
    for ax, key in ((ax_vl, "eval_loss"), (ax_va, "eval_accuracy")):
      ax.axhline(r[key], color=c, ls="--", lw=1, label="inference_only (no training)")
      ax.plot([x_max], [r[key]], "*", color=c, ms=9)
  for ax, title in ((ax_tl, "train loss"), (ax_vl, "validation loss"),
                    (ax_ta, "train token accuracy"), (ax_va, "validation token accuracy")):
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  for ax in axes[1]:
    ax.set_xlabel("step")
  fig.suptitle(f"G_LM ablation: {out}", fontsize=10)
  fig.tight_layout()
  path = out / "ablation.png"
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def print_table(table: list[dict]) -> None:
  fmt = lambda v, p: "-" if v is None else f"{v:.{p}f}"
  print(f"\n{'mode':<15} {'step':>6} {'train loss':>10} {'eval loss':>10} {'eval ppl':>10} "
        f"{'eval acc':>9}")
  for r in table:
    print(f"{r['mode']:<15} {r['final_step'] if r['final_step'] is not None else '-':>6} "
          f"{fmt(r['train_loss'], 4):>10} {fmt(r['eval_loss'], 4):>10} "
          f"{fmt(r['eval_perplexity'], 2):>10} {fmt(r['eval_accuracy'], 4):>9}")


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--out", default="runs/ablate")
  parser.add_argument("--jobs", type=int, default=1, help="training runs at once")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  launch = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id)
  index = distributed.launch_index(launch)
  if launch.mode != "single" and args.jobs != 1:
    parser.error("with several processes the runs share one coordinator: use --jobs 1")
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup: stop the children
  out = Path(args.out).resolve()
  gin_files = [_gin_file(f) for f in args.gin_file]
  gin_params = list(args.gin_param)

  # The configs as every run will see them (fails here on a bad binding).
  run = load_run(gin_files, gin_params)
  num_steps = run["train"].num_steps
  data_workdir = Path(run["data_workdir"]).resolve() if run["data_workdir"] else out / "data"
  run["data_workdir"] = str(data_workdir)
  cli.check_run_folder(out, "--out")  # now, not inside the first run
  # builds the shared dataset/tokenizer once, before the runs (process 0; the other
  # processes' runs wait for it inside pretrain.py)
  data = gin_configs.resolve_data(run) if index == 0 else None

  t0 = time.time()
  run_training(TRAINED, gin_files, gin_params, out, data_workdir, num_steps, max(1, args.jobs),
               distributed.launch_flags(launch))
  if index != 0:
    print(f"process {index}: the training runs finished; process 0 writes the table")
    return 0
  inference_only(run, data, out / "learned", out / "inference_only")
  table = summarize(out, MODES, num_steps)
  write_table(out, table, {"num_steps": num_steps, "gin_files": gin_files,
                           "gin_params": gin_params, "data_workdir": str(data_workdir)})
  png = plot(out, MODES, table)
  print_table(table)
  print(f"\nsweep took {time.time() - t0:.1f}s\ntable: {out / 'ablation.csv'}, "
        f"{out / 'ablation.json'}\nplot:  {png}")
  return 0


if __name__ == "__main__":
  cli.main(main)

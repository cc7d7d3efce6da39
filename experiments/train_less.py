#!/usr/bin/env python
"""Train LESS kernels on a frozen pretrained model:
`python experiments/train_less.py --gin_file=experiments/configs/less_tiny.gin`.

Gin binds, at this entry point only, LessTrainConfig.* (policy and budgets,
rank R, hidden R', epochs, batches per epoch, lr, dropout, seed, validation
batches) and less_experiment.* (the pretraining workdir whose latest checkpoint
is the frozen model, optionally a step and an output directory). The model and
data configs come from the checkpoint's meta. Training batches stream from the
pretraining data pipeline (train split); validation batches are the first
`val_batches` batches of the eval split. The best-validation kernels are saved
to <model workdir>/less_kernels/<policy>_<budget>/ (Orbax + meta.json), to be
read back with less_jax.train_kernels.load_kernels.

Data parallel over every device of every process (one code path for 1 device,
N local devices and N processes); several processes take
`--coordinator_address/--num_processes/--process_id` (or the JAX_* variables,
or a SLURM/TPU cluster), each reads its own shard of the data, and the batch
size is per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from less_jax.config import LessTrainConfig
from less_jax.gin_configs import less_experiment
from pldr_jax import cli
from pldr_jax.training import distributed, host


def main(argv=None) -> int:
  host.retain_freed_memory()  # before the first JAX computation (pldr_jax.training.host)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--model_workdir", default=None,
                      help="overrides less_experiment.model_workdir")
  distributed.add_arguments(parser)
  args = parser.parse_args(argv)
  cli.parse_gin(args.gin_file, args.gin_param)  # a typo: the closest valid name
  run = less_experiment()
  if args.model_workdir:
    run["model_workdir"] = args.model_workdir
  from less_jax import train_kernels as tk
  if "://" not in str(run["model_workdir"]) and not Path(run["model_workdir"]).is_dir():
    raise cli.errors.ConfigError(f"--model_workdir {run['model_workdir']} is not a folder: "
                                 "give the --workdir of a pretrain.py run")
  # the kernels' folder can be written: found now, not after training
  cli.check_run_folder(run["out_dir"] or tk.kernels_dir(run["model_workdir"], run["train"]),
                       "less_experiment.out_dir" if run["out_dir"] else "the kernels folder")
  distributed.initialize(args)

  import jax
  import numpy as np
  from pldr_jax.data import load_tokenizer, make_eval_batches, make_train_iterator

  main_process = jax.process_index() == 0
  say = print if main_process else (lambda *_, **__: None)
  shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
  mesh = jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  tc: LessTrainConfig = run["train"]
  params, config, data, g_lm, step = tk.load_frozen_model(run["model_workdir"], run["step"])
  policy = tc.make_policy(max_len=min(config.max_len, data.seq_len))
  if g_lm is not None:
    g_lm = np.asarray(g_lm)  # a constant of the jitted steps on every process
  if tc.batch_size is not None:
    data = data.replace(batch_size=tc.batch_size, eval_batch_size=tc.batch_size)
  if (data.batch_size * jax.process_count()) % jax.device_count():
    parser.error(f"the global batch {data.batch_size} x {jax.process_count()} process(es) is "
                 f"not divisible by the {jax.device_count()} devices")
  say(f"frozen model: {run['model_workdir']} step {step} ({config.num_layers} layers, "
      f"{config.num_heads} heads of width {config.head_dim}, g_mode {config.g_mode})")
  say(f"policy {policy!r} (budget {policy.budget}), R={tc.rank}, R'={tc.hidden}, "
      f"{tc.epochs} epochs x {tc.epoch_steps} batches of {data.batch_size} x {data.seq_len} "
      f"tokens; devices: {jax.devices()}")
  tokenizer = load_tokenizer(data.tokenizer_path)
  train_it = make_train_iterator(data, tokenizer, **shard)
  val = (make_eval_batches(data.replace(max_eval_batches=tc.val_batches), tokenizer, **shard)
         if tc.val_batches else [])
  val = val[:min(distributed.gather_json(len(val)))]  # the same number on every process
  t0 = time.perf_counter()
  result = tk.train_kernels(params, config, tc, train_it, val, g_lm=g_lm, log=say, mesh=mesh)
  out = run["out_dir"] or tk.kernels_dir(run["model_workdir"], tc)
  path = tk.save_kernels(out, result.kernels, config, policy, extra_meta={
      "model_workdir": str(Path(run["model_workdir"]).resolve()), "model_step": step,
      "train": dataclasses.asdict(tc), "best_val": result.best_val,
      "best_epoch": result.best_epoch, "history": result.history})
  best = None if result.best_epoch is None else [e + 1 for e in result.best_epoch]
  say(f"trained in {time.perf_counter() - t0:.1f}s; best validation loss per layer "
      f"{result.best_val} (epochs {best}, counted from 1)")
  say(f"kernels saved to {path}")
  return 0


if __name__ == "__main__":
  cli.main(main)

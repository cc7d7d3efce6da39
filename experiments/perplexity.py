#!/usr/bin/env python
"""Validation perplexity of a checkpoint on any TFDS text dataset.

    python experiments/perplexity.py --checkpoint runs/tiny \\
        [--dataset c4/en:3.1.0 --data_dir /data/tfds --split validation --text_key text] \\
        [--seq_len 1024] [--batch_size 8] [--max_batches 50] [--step N]

Defaults come from the run's own DataConfig (stored in the checkpoint meta), so
with no flags it scores the run's validation split. The text is packed into
chunks of seq_len tokens with [END] after each document, as in training; the
loss ignores [PAD]. Prints loss, perplexity and token accuracy (and --out JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def checkpoints_dir(path: str) -> Path:
  p = Path(path)
  return p / "checkpoints" if (p / "checkpoints").is_dir() else p


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True, help="run workdir or its checkpoints/ dir")
  ap.add_argument("--step", type=int, default=None)
  ap.add_argument("--dataset", default=None, help="TFDS name (default: the run's)")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--split", default=None, help="default: the run's eval split")
  ap.add_argument("--text_key", default=None)
  ap.add_argument("--tokenizer", default=None, help="default: the run's tokenizer")
  ap.add_argument("--seq_len", type=int, default=None)
  ap.add_argument("--batch_size", type=int, default=None)
  ap.add_argument("--max_batches", type=int, default=None)
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)

  from pldr_jax import checkpoint as ckpt_lib, train
  from pldr_jax.config import PLDRConfig
  from pldr_jax.data import DataConfig, make_eval_batches
  from pldr_jax.trainer import restore_for_inference

  ckdir = checkpoints_dir(a.checkpoint)
  meta = ckpt_lib.load_meta(ckdir, a.step)
  config = PLDRConfig(**meta["model"])
  data = DataConfig(**meta["data"])
  overrides = {"dataset": a.dataset, "data_dir": a.data_dir, "eval_split": a.split,
               "text_key": a.text_key, "tokenizer_path": a.tokenizer, "seq_len": a.seq_len,
               "eval_batch_size": a.batch_size, "max_eval_batches": a.max_batches}
  data = data.replace(**{k: v for k, v in overrides.items() if v is not None})
  if data.seq_len > config.max_len:
    raise SystemExit(f"--seq_len {data.seq_len} is longer than the model's context {config.max_len}")
  params, g_lm, step = restore_for_inference(ckdir, config, a.step)
  mesh = train.make_mesh(train.TrainConfig(num_steps=1))
  batches = make_eval_batches(data)
  metrics = train.evaluate(train.make_eval_step(config, mesh, g_lm), params, batches, mesh)
  result = {"checkpoint": str(ckdir), "step": step, "dataset": data.dataset,
            "split": data.eval_split, "seq_len": data.seq_len, **metrics}
  print(f"{data.dataset}/{data.eval_split} (step {step}, {int(metrics['tokens'])} tokens): "
        f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  "
        f"token accuracy {metrics['accuracy']:.4f}")
  if a.out:
    Path(a.out).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

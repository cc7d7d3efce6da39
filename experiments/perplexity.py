#!/usr/bin/env python
"""Validation perplexity of a checkpoint on any TFDS text dataset.

    python experiments/perplexity.py --checkpoint runs/tiny \\
        [--dataset c4/en:3.1.0 --data_dir /data/tfds --split validation --text_key text] \\
        [--seq_len 1024] [--batch_size 8] [--max_batches 50] [--step N] [--g_prompt 32,128]

Defaults come from the run's own DataConfig (stored in the checkpoint meta), so
with no flags it scores the run's validation split. The text is packed into
chunks of seq_len tokens with [END] after each document, as in training; the
loss ignores [PAD]. Prints loss, perplexity and token accuracy (and --out JSON).

--g_prompt P1,P2,...: evaluate the way a learned-G model is used. Training and the
plain validation build A from the whole input sequence (in the reference,
non-causal mode that includes queries after the predicted position); at
inference A and G_LM come from the prompt. For each P this scores the targets
after the first P tokens twice: with whole-sequence A, and with G_LM fixed from
the first P tokens (prefill's G-cache), which is exactly teacher-forced decoding
with the KV- and G-cache after a P-token prompt. The difference is the part of
the validation score that comes from seeing later queries.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _nll_after(params, tokens, mask, g_lm, prompt_len, *, config):
  """(sum NLL, count) of the targets at index >= prompt_len, the model reading
  tokens[:, :-1]. tokens, mask: [B, S]; g_lm: None (computed from the input) or a
  prompt's G_LM (pldr_jax.inference.decode.prompt_g)."""
  from pldr_jax import model
  from pldr_jax.training import train
  inputs, lengths = train.model_inputs(tokens, mask)
  logits, _ = model.forward(params, inputs, lengths, config=config, g_lm=g_lm)
  return train.target_nll(logits, tokens, mask, prompt_len)


def prompt_g_eval(params, config, batches, prompt_lens) -> list[dict]:
  """Rows {prompt_len, whole_a_loss, prompt_g_loss, (perplexities), tokens} (learned G)."""
  import functools
  import math
  import jax
  import jax.numpy as jnp
  nll = jax.jit(functools.partial(_nll_after, config=config), static_argnums=(4,))
  from pldr_jax.inference import decode
  gfn = jax.jit(functools.partial(decode.prompt_g, config=config), static_argnums=(3,))
  rows = []
  from pldr_jax.training import train

  def sums(b, p):
    t, m = jnp.asarray(b["tokens"], jnp.int32), jnp.asarray(b["mask"], jnp.int32)
    if p >= t.shape[1]:
      raise SystemExit(f"--g_prompt {p} leaves no target in sequences of {t.shape[1]} tokens")
    s_w, n = nll(params, t, m, None, p)
    s_p, _ = nll(params, t, m, gfn(params, t, m, p), p)
    return {"whole": s_w, "prompt": s_p, "tokens": n}

  for p in prompt_lens:
    tot = {"whole": 0.0, "prompt": 0.0, "tokens": 0.0}
    tot.update(train.batch_totals(lambda b: sums(b, p), batches))
    cnt = max(tot.pop("tokens"), 1.0)
    row = {"prompt_len": p, "tokens": cnt}
    for k, v in tot.items():
      row[f"{k}_loss"] = v / cnt
      row[f"{k}_perplexity"] = math.exp(min(v / cnt, 50.0))
    rows.append(row)
  return rows


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
  ap.add_argument("--g_prompt", default=None,
                  help="comma-separated prompt lengths: also score with G_LM from the prompt")
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  from pldr_jax import cli
  if a.out:
    cli.check_output_file(a.out)  # now, not after the evaluation

  import pldr_jax
  from pldr_jax.config import TrainConfig
  from pldr_jax.data import make_eval_batches
  from pldr_jax.training import train

  m = pldr_jax.load(a.checkpoint, step=a.step, tokenizer=a.tokenizer)
  if m.data is None:
    raise SystemExit(f"--checkpoint {a.checkpoint}: not a pldr-jax run directory (a published "
                     "checkpoint has no data config; use a run's workdir)")
  config, data, ckdir = m.config, m.data, m.source
  overrides = {"dataset": a.dataset, "data_dir": a.data_dir, "eval_split": a.split,
               "text_key": a.text_key, "tokenizer_path": a.tokenizer, "seq_len": a.seq_len,
               "eval_batch_size": a.batch_size}
  data = data.replace(**{k: v for k, v in overrides.items() if v is not None},
                      max_eval_batches=a.max_batches)  # None: the whole split, not the run's cap
  if data.seq_len > config.max_len:
    raise SystemExit(f"--seq_len {data.seq_len} is longer than the model's context {config.max_len}")
  params, g_lm, step = m.params, m.g_lm, m.step
  mesh = train.make_mesh(TrainConfig(num_steps=1))
  batches = make_eval_batches(data)
  metrics = train.evaluate(train.make_eval_step(config, mesh, g_lm), params, batches, mesh)
  result = {"checkpoint": str(ckdir), "step": step, "dataset": data.dataset,
            "split": data.eval_split, "seq_len": data.seq_len, **metrics}
  print(f"{data.dataset}/{data.eval_split} (step {step}, {int(metrics['tokens'])} tokens): "
        f"loss {metrics['loss']:.4f}  perplexity {metrics['perplexity']:.2f}  "
        f"token accuracy {metrics['accuracy']:.4f}")
  if a.g_prompt:
    if not config.learned_g:
      raise SystemExit(f"--g_prompt needs a learned-G model; this one has g_mode "
                       f"{config.g_mode!r} (its G_LM does not depend on the input)")
    lens = [int(x) for x in a.g_prompt.split(",") if x.strip()]
    result["g_prompt"] = prompt_g_eval(params, config, batches, lens)
    for r in result["g_prompt"]:
      print(f"targets after {r['prompt_len']} tokens ({int(r['tokens'])}): whole-sequence A "
            f"loss {r['whole_loss']:.4f} (ppl {r['whole_perplexity']:.2f}); G_LM from the "
            f"prompt loss {r['prompt_loss']:.4f} (ppl {r['prompt_perplexity']:.2f})")
  if a.out:
    Path(a.out).write_text(json.dumps(result, indent=1))
  return 0


if __name__ == "__main__":
  from pldr_jax import cli
  cli.main(main)

#!/usr/bin/env python
"""Validation perplexity of a pretrained model under sparse KV caches and LESS:
`python experiments/less_eval.py --model_workdir DIR --budgets 16,32,64`.

For each budget T (absolute number of cache slots, as in the paper) it scores the
eval split of the model's own data config (`pldr_jax.data.make_eval_batches`) with

  full           pldr_jax.model.forward (the dense causal cache), once;
  h2o            H2O, heavy = T // 2, recent = T - heavy;
  h2o+           Baseline+ of h2o: T + R/2 slots (less_jax.policies.baseline_plus);
  h2o_less       H2O + LESS kernels from <kernels_root>/h2o_<T>;
  lambda         Λ-masking, sink = min(4, T - 1), recent = T - sink;
  lambda+        Baseline+ of lambda;
  lambda_less    Λ + LESS kernels from <kernels_root>/lambda_<T>;

(sparse/LESS rows through less_jax.model.less_forward_jit: the parallel scoring form,
position t's logits are what step-by-step sparse/LESS decoding gives at t).
Perplexity = exp(token-weighted mean next-token NLL over all batches, [PAD] ignored),
the same weighting as pldr_jax.training.train.loss_fn.

--g_prompt P (learned-G models): the G-cache on, as at inference: every row holds
G_LM at that of each sequence's first P tokens and scores only the targets after
them (the default builds G_LM from the whole scored sequence, like the model's
own validation loss).

Kernels: <kernels_root> defaults to <model_workdir>/less_kernels, the layout
experiments/train_less.py writes (less_jax.train_kernels.kernels_dir:
`<policy kind>_<budget>`). A LESS row is 'missing' when its directory has no
kernels, 'error: ...' when they do not fit (other model / policy). With
--train_missing, missing kernels are trained with a small LessTrainConfig
(--train_epochs x --train_steps batches) and saved there first.

Baseline+ equivalence: the LESS state of a layer is H [R, dk] + z [R] per head,
4 R (dk + 1) bytes in float32. One extra cache slot costs k, v [dk] each plus the
int32 position and the float32 H2O score: 2 dk * itemsize + 8 bytes. With a
float32 cache (itemsize 4) that is 8 (dk + 1) bytes, so R/2 slots cost exactly
4 R (dk + 1) bytes = the LESS state. Baseline+ therefore gets extra = R // 2
slots, R the rank of the budget's LESS kernels when they exist (else --rank,
default 8); with a bf16 cache R/2 slots are slightly cheaper than the LESS state
(the table records the real bytes of each). If T + R/2 exceeds the model's
context, the extra is clipped to fit.

Memory column: decode-state bytes per sequence at that budget,
less_jax.model.decode_state_bytes of the state less_prefill builds (shapes only,
via jax.eval_shape; it does not depend on the sequence length). Full cache:
k and v of every layer for the eval seq_len tokens, L * 2 * H * S * dk * itemsize
+ 4 (the length), G-cache excluded for all methods.

Gap closed (LESS and Baseline+ rows) = (ppl_sparse - ppl_method) / (ppl_sparse - ppl_full),
a fraction (1: as good as the full cache); empty when the sparse policy is as good
as the full cache (the denominator is 0).

Writes <out>/less_eval.csv, <out>/less_eval.json and <out>/less_eval.png
(<out> defaults to <model_workdir>/less_eval).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import json
import math
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from less_jax import model as less_model
from less_jax.config import LessTrainConfig
from less_jax.errors import KernelLoadError
from less_jax import policies as policies_lib
from less_jax import train_kernels as tk
from pldr_jax import cli
from pldr_jax import model as pmodel
from pldr_jax.training import train as ptrain

DEFAULT_RANK = 8
FIELDS = ["method", "policy", "budget", "slots", "perplexity", "nll", "tokens", "gap_closed",
          "memory_bytes", "status", "kernels"]
KINDS = ("h2o", "lambda")


# ----------------------------------------------------------------------------
# Policies.

def sparse_policy(kind: str, budget: int) -> policies_lib.Policy:
  """h2o: heavy = budget // 2, recent = the rest; lambda: sink min(4, budget - 1) + recent."""
  if budget < 2:
    raise ValueError(f"budgets must be >= 2, got {budget}")
  if kind == "h2o":
    heavy = budget // 2
    return policies_lib.h2o(heavy, budget - heavy)
  if kind == "lambda":
    sink = min(4, budget - 1)
    return policies_lib.lambda_mask(sink, budget - sink)
  raise ValueError(f"unknown kind {kind!r}")


def train_config(policy: policies_lib.Policy, rank: int, epochs: int, steps: int,
                 hidden: int = 64) -> LessTrainConfig:
  kw = ({"heavy": policy.heavy, "recent": policy.recent} if policy.kind == "h2o"
        else {"sink": policy.sink, "recent": policy.recent})
  return LessTrainConfig(policy=policy.kind, rank=rank, hidden=hidden, epochs=epochs,
                            epoch_steps=steps, val_batches=1, **kw)


def kernel_path(kernels_root, policy: policies_lib.Policy) -> str:
  """<kernels_root>/<kind>_<budget> (train_less.py's kernels_dir naming)."""
  return os.path.join(os.fspath(kernels_root), f"{policy.kind}_{policy.budget}")


# ----------------------------------------------------------------------------
# Scoring.

_nll_terms = jax.jit(ptrain.target_nll)


@functools.partial(jax.jit, static_argnames=("config",))
def _full_logits(params, tokens, lengths, g_lm, *, config):
  return pmodel.forward(params, tokens, lengths, config=config, g_lm=g_lm)[0]


def score(logits_fn, batches, first_target: int = 0) -> tuple[float, float]:
  """(mean NLL, counted tokens) over batches; logits_fn(inputs, lengths, g_lm) -> logits,
  g_lm the batch's 'g_lm' entry (a prompt's G_LM) or None."""
  def nll(b):
    tokens, mask = jnp.asarray(b["tokens"], jnp.int32), jnp.asarray(b["mask"], jnp.int32)
    inputs, lengths = ptrain.model_inputs(tokens, mask)
    s, n = _nll_terms(logits_fn(inputs, lengths, b.get("g_lm")), tokens, mask, first_target)
    return {"nll": s, "tokens": n}

  tot = ptrain.batch_totals(nll, batches)
  if not tot.get("tokens"):
    raise ValueError("the eval batches hold no target tokens")
  return tot["nll"] / tot["tokens"], tot["tokens"]


def state_bytes(params, config, policy, kernels, g_lm) -> int:
  """decode_state_bytes of less_prefill's state for one sequence (shapes only)."""
  tokens = jnp.zeros((1, 1), jnp.int32)
  fn = lambda p, t, k, g: less_model.less_prefill(p, t, None, config=config, policy=policy,
                                                   kernels=k, g_lm=g)[1]
  return less_model.decode_state_bytes(jax.eval_shape(fn, params, tokens, kernels, g_lm))


def full_cache_bytes(config, seq_len: int) -> int:
  item = jnp.dtype(config.compute_dtype).itemsize
  return int(config.num_layers * 2 * config.num_heads * seq_len * config.head_dim * item + 4)


def gap_closed(ppl_sparse, ppl_method, ppl_full):
  if ppl_sparse is None or ppl_method is None or ppl_full is None:
    return None
  denom = ppl_sparse - ppl_full
  if not np.isfinite(denom) or abs(denom) <= 1e-12 * max(1.0, abs(ppl_full)):
    return None
  return float((ppl_sparse - ppl_method) / denom)


# ----------------------------------------------------------------------------
# The evaluation.

def run_eval(model_workdir, budgets, *, kernels_root=None, max_batches=None, batches=None,
             train_missing=False, train_epochs=2, train_steps=4, rank=DEFAULT_RANK,
             step=None, g_prompt=None, log=print) -> list[dict]:
  """Returns the table rows (dicts with FIELDS). `batches`: use these eval batches
  ({'tokens', 'mask'}) instead of the model's eval split.

  g_prompt=P (learned-G models): every method runs with the G-cache on, G_LM
  held at that of each sequence's first P tokens (pldr_jax.inference.decode.prompt_g; the
  parallel form then equals prefill of the prompt + cached decode), and only
  the targets after the prompt count. Default: G_LM from the whole scored
  sequence, as the model's own validation loss."""
  params, config, data, g_lm, ck_step = tk.load_frozen_model(model_workdir, step)
  kernels_root = kernels_root or os.path.join(os.path.abspath(model_workdir), "less_kernels")
  tokenizer = None
  if batches is None or train_missing:
    from pldr_jax.data import load_tokenizer, make_eval_batches
    tokenizer = load_tokenizer(data.tokenizer_path)
  if batches is None:
    batches = make_eval_batches(data.replace(max_eval_batches=max_batches), tokenizer)
  elif max_batches is not None:
    batches = batches[:max_batches]
  batches = list(batches)
  if not batches:
    raise ValueError("no eval batches")
  seq_len = int(np.asarray(batches[0]["tokens"]).shape[1])
  n_inputs = seq_len - 1  # positions the model runs (tokens[:, :-1])
  first_target = 0
  if g_prompt is not None:
    if not config.learned_g:
      raise ValueError(f"g_prompt needs a learned-G model; this one has g_mode {config.g_mode!r}")
    if not 1 <= g_prompt < n_inputs:
      raise ValueError(f"g_prompt={g_prompt} must be in [1, {n_inputs})")
    from pldr_jax.inference import decode
    gfn = jax.jit(functools.partial(decode.prompt_g, config=config), static_argnums=(3,))
    batches = [{**b, "g_lm": gfn(params, jnp.asarray(b["tokens"], jnp.int32),
                                 jnp.asarray(b["mask"], jnp.int32), g_prompt)}
               for b in batches]
    first_target = g_prompt
    log(f"G-cache on: G_LM from each sequence's first {g_prompt} tokens; targets after them")
  log(f"model {model_workdir} step {ck_step}: {config.num_layers} layers, {config.num_heads} "
      f"heads of width {config.head_dim}, context {config.max_len}; {len(batches)} eval "
      f"batches of {np.asarray(batches[0]['tokens']).shape}")

  rows = []

  def add(method, policy, budget, slots, nll=None, cnt=None, memory=None, status="ok",
          kernels=""):
    rows.append({"method": method, "policy": repr(policy) if policy is not None else "full",
                 "budget": budget, "slots": slots,
                 "perplexity": None if nll is None else float(math.exp(nll)),
                 "nll": nll, "tokens": cnt, "gap_closed": None, "memory_bytes": memory,
                 "status": status, "kernels": kernels})
    r = rows[-1]
    log(f"  {method:<12} budget {budget!s:>5} slots {slots!s:>5}  ppl "
        f"{r['perplexity'] if r['perplexity'] is None else round(r['perplexity'], 4)!s:>10}"
        f"  mem {memory}  {status}")
    return r

  t0 = time.perf_counter()
  pick = lambda g: g_lm if g is None else g
  nll, cnt = score(lambda t, l, g: _full_logits(params, t, l, pick(g), config=config), batches,
                   first_target)
  full = add("full", None, None, seq_len, nll, cnt, full_cache_bytes(config, seq_len))
  ppl_full = full["perplexity"]

  def sparse_fn(policy, kernels):
    return lambda t, l, g: less_model.less_forward_jit(params, t, l, kernels, pick(g),
                                                       config=config, policy=policy)

  for budget in budgets:
    for kind in KINDS:
      policy = sparse_policy(kind, budget)
      if policy.budget > config.max_len:
        for m in (kind, kind + "+", kind + "_less"):
          add(m, policy, budget, None, status=f"skipped: budget > context {config.max_len}")
        continue
      nll, cnt = score(sparse_fn(policy, None), batches, first_target)
      sp = add(kind, policy, budget, policy.budget, nll, cnt,
               state_bytes(params, config, policy, None, g_lm))

      # LESS kernels (load, or train when asked).
      path = kernel_path(kernels_root, policy)
      kernels, status = None, "missing"
      try:
        kernels = tk.load_kernels(path, config, policy)
        status = "ok"
      except KernelLoadError as e:
        if os.path.isfile(os.path.join(path, "meta.json")):
          status = f"error: {e}"
      if kernels is None and status == "missing" and train_missing:
        from pldr_jax.data import make_train_iterator
        tc = train_config(policy, rank, train_epochs, train_steps)
        log(f"  training kernels for {policy!r} ({train_epochs} x {train_steps} batches)")
        res = tk.train_kernels(params, config, tc, make_train_iterator(data, tokenizer),
                               [{k: b[k] for k in ("tokens", "mask")} for b in batches[:1]],
                               g_lm=g_lm, log=None)
        tk.save_kernels(path, res.kernels, config, policy, extra_meta={
            "model_workdir": str(Path(model_workdir).resolve()), "model_step": ck_step,
            "train": dataclasses.asdict(tc), "best_val": res.best_val,
            "trained_by": "experiments/less_eval.py --train_missing"})
        kernels, status = res.kernels, "ok (trained)"
      r_used = kernels[0].rank if kernels is not None else rank

      # Baseline+: R/2 extra slots (the memory of the LESS state), clipped to the context.
      extra = min(r_used // 2, config.max_len - policy.budget)
      bp = policies_lib.baseline_plus(policy, extra)
      nll, cnt = score(sparse_fn(bp, None), batches, first_target)
      plus = add(kind + "+", bp, budget, bp.budget, nll, cnt,
                 state_bytes(params, config, bp, None, g_lm))
      # A budget that holds every input position never evicts: no gap to close.
      evicts = policy.budget < n_inputs
      if evicts:
        plus["gap_closed"] = gap_closed(sp["perplexity"], plus["perplexity"], ppl_full)

      if kernels is None:
        add(kind + "_less", policy, budget, policy.budget, status=status, kernels=path)
        continue
      nll, cnt = score(sparse_fn(policy, kernels), batches, first_target)
      less = add(kind + "_less", policy, budget, policy.budget, nll, cnt,
                 state_bytes(params, config, policy, kernels, g_lm), status, path)
      if evicts:
        less["gap_closed"] = gap_closed(sp["perplexity"], less["perplexity"], ppl_full)
  log(f"evaluated in {time.perf_counter() - t0:.1f}s")
  return rows


# ----------------------------------------------------------------------------
# Output.

def write_outputs(rows: list[dict], out_dir, meta: dict | None = None) -> dict:
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = {k: str(out_dir / f"less_eval.{k}") for k in ("csv", "json", "png")}
  with open(paths["csv"], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=FIELDS)
    w.writeheader()
    for r in rows:
      w.writerow({k: "" if r[k] is None else r[k] for k in FIELDS})
  with open(paths["json"], "w") as f:
    json.dump({"meta": meta or {}, "rows": rows}, f, indent=2)
  plot(rows, paths["png"])
  return paths


def plot(rows: list[dict], path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  full = [r for r in rows if r["method"] == "full" and r["perplexity"] is not None]
  methods = []
  for r in rows:
    if r["method"] != "full" and r["method"] not in methods:
      methods.append(r["method"])
  styles = {"h2o": "C0", "lambda": "C1"}
  for m in methods:
    pts = sorted((r["budget"], r["perplexity"]) for r in rows
                 if r["method"] == m and r["perplexity"] is not None)
    if not pts:
      continue
    kind = m.split("_")[0].rstrip("+")
    ls = {"less": "-", "plus": "--", "sparse": ":"}[
        "less" if m.endswith("_less") else "plus" if m.endswith("+") else "sparse"]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], ls,
            marker="s" if m.endswith("_less") else "o",
            markersize=8 if m.endswith("_less") else 5, color=styles.get(kind), label=m)
  if full:
    ax.axhline(full[0]["perplexity"], color="k", lw=1, label="full cache")
  budgets = sorted({r["budget"] for r in rows if r["budget"] is not None})
  if len(budgets) > 1:
    ax.set_xscale("log", base=2)
  ax.set_xticks(budgets)
  ax.set_xticklabels([str(b) for b in budgets])
  ax.set_xlabel("cache budget (tokens)")
  ax.set_ylabel("validation perplexity")
  ax.set_title("Sparse KV caches vs LESS")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def format_table(rows: list[dict]) -> str:
  lines = [f"{'method':<12} {'budget':>6} {'slots':>5} {'ppl':>10} {'gap':>7} {'mem_bytes':>10}  "
           "status"]
  for r in rows:
    ppl = "" if r["perplexity"] is None else f"{r['perplexity']:.4f}"
    gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.3f}"
    lines.append(f"{r['method']:<12} {r['budget'] if r['budget'] is not None else '-':>6} "
                 f"{r['slots'] if r['slots'] is not None else '-':>5} {ppl:>10} {gap:>7} "
                 f"{r['memory_bytes'] if r['memory_bytes'] is not None else '':>10}  "
                 f"{r['status']}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_workdir", required=True)
  parser.add_argument("--budgets", default="16,32,64",
                      help="comma-separated cache budgets (tokens)")
  parser.add_argument("--kernels_root", default=None,
                      help="default <model_workdir>/less_kernels")
  parser.add_argument("--out", default=None, help="default <model_workdir>/less_eval")
  parser.add_argument("--max_batches", type=int, default=None)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (latest)")
  parser.add_argument("--rank", type=int, default=DEFAULT_RANK,
                      help="R for Baseline+ when no kernels exist / for --train_missing")
  parser.add_argument("--train_missing", action="store_true")
  parser.add_argument("--train_epochs", type=int, default=2)
  parser.add_argument("--train_steps", type=int, default=4)
  parser.add_argument("--g_prompt", type=int, default=None,
                      help="G-cache on: G_LM from each sequence's first N tokens (learned G); "
                           "score the targets after them")
  args = parser.parse_args(argv)
  try:
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
  except ValueError:
    parser.error(f"--budgets must be comma-separated integers, got {args.budgets!r}")
  if not budgets or min(budgets) < 2:
    parser.error("--budgets must hold integers >= 2")
  if not os.path.isdir(args.model_workdir) and "://" not in args.model_workdir:
    raise cli.errors.ConfigError(f"--model_workdir {args.model_workdir} is not a folder: "
                                 "give the --workdir of a pretrain.py run")
  cli.check_run_folder(args.out or os.path.join(os.path.abspath(args.model_workdir), "less_eval"),
                       "--out")  # now, not after the evaluation
  rows = run_eval(args.model_workdir, budgets, kernels_root=args.kernels_root,
                  max_batches=args.max_batches, train_missing=args.train_missing,
                  train_epochs=args.train_epochs, train_steps=args.train_steps,
                  rank=args.rank, step=args.step, g_prompt=args.g_prompt)
  out = args.out or os.path.join(os.path.abspath(args.model_workdir), "less_eval")
  paths = write_outputs(rows, out, meta={"model_workdir": os.path.abspath(args.model_workdir),
                                         "budgets": budgets, "max_batches": args.max_batches,
                                         "g_prompt": args.g_prompt})
  print(format_table(rows))
  print("wrote " + ", ".join(paths.values()))
  return 0


if __name__ == "__main__":
  cli.main(main)

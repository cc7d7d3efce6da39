"""experiments/less_eval.py: sparse/Baseline+/LESS perplexity table on a tiny workdir."""

import csv
import dataclasses
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from less_jax import train_kernels as tk
from pldr_jax.training import checkpoint as ckpt_lib
from pldr_jax import config as config_lib
from pldr_jax import model as pmodel
from pldr_jax import params as params_lib

from helpers import load_script

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

REPO = Path(__file__).resolve().parents[1]
SEQ = 32  # eval seq_len; the model's context is 64


le = load_script("experiments/less_eval.py")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A pretraining workdir as pldr_jax.training.trainer writes it (random-init params)."""
  from pldr_jax.data import prepare_default_data
  root = tmp_path_factory.mktemp("less_eval")
  data = prepare_default_data(root / "data", vocab_size=512, seq_len=SEQ, batch_size=2,
                              eval_batch_size=2, max_tokenizer_documents=40, num_threads=0)
  config = config_lib.tiny(vocab_size=512, max_len=64, num_layers=1)
  params = params_lib.init_params(config, jax.random.key(0))
  wd = root / "model"
  with ckpt_lib.Checkpointer(wd / "checkpoints", async_save=False) as ck:
    ck.save(3, params=params, opt_state={}, data_state={},
            meta={"model": dataclasses.asdict(config), "data": dataclasses.asdict(data)})
  # LESS kernels for h2o at budget 8 (random init: the loading path, not their quality).
  policy = le.sparse_policy("h2o", 8)
  kern = tk.unstack_kernels(tk.init_stacked_kernels(jax.random.key(1), config, 4, 16))
  tk.save_kernels(le.kernel_path(wd / "less_kernels", policy), kern, config, policy)
  return wd, config, params, data


def test_table_plot_and_invariants(workdir, tmp_path):
  wd, config, params, data = workdir
  out = tmp_path / "out"
  assert le.main(["--model_workdir", str(wd), "--budgets", "8,32", "--max_batches", "2",
                  "--out", str(out)]) == 0
  table = json.loads((out / "less_eval.json").read_text())["rows"]
  with open(out / "less_eval.csv") as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == len(table) == 1 + 2 * 6
  assert (out / "less_eval.png").stat().st_size > 1000
  by = {(r["method"], r["budget"]): r for r in table}
  for b in (8, 32):
    for m in ("h2o", "h2o+", "h2o_less", "lambda", "lambda+", "lambda_less"):
      assert (m, b) in by, (m, b)

  # Full cache = exp(mean NLL) of pldr_jax.model.forward, computed independently.
  from pldr_jax.data import load_tokenizer, make_eval_batches
  batches = make_eval_batches(data.replace(max_eval_batches=2),
                              load_tokenizer(data.tokenizer_path))
  tot = cnt = 0.0
  for b in batches:
    # As training: the model reads tokens[:, :-1] and predicts tokens[:, 1:].
    tokens, mask = jnp.asarray(b["tokens"]), np.asarray(b["mask"])
    lengths = jnp.asarray(np.clip(mask.sum(-1) - 1, 1, SEQ - 1), jnp.int32)
    logits, _ = pmodel.forward(params, tokens[:, :-1], lengths, config=config)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:])
    tot += float(jnp.sum(ce * mask[:, 1:]))
    cnt += float(mask[:, 1:].sum())
  full = by[("full", None)]
  assert full["perplexity"] == pytest.approx(math.exp(tot / cnt), rel=1e-5)
  assert full["tokens"] == cnt

  # Budget >= the positions run: every sparse method sees the whole prefix = the full cache.
  for m in ("h2o", "h2o+", "lambda", "lambda+"):
    assert by[(m, 32)]["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4), m
    assert by[(m, 32)]["gap_closed"] is None  # 0 / 0
  # A small budget changes the perplexity.
  assert by[("h2o", 8)]["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)

  # LESS: loaded where saved, 'missing' elsewhere; gap closed by the formula.
  less = by[("h2o_less", 8)]
  assert less["status"] == "ok" and less["perplexity"] is not None
  sp = by[("h2o", 8)]["perplexity"]
  want = (sp - less["perplexity"]) / (sp - full["perplexity"])
  assert less["gap_closed"] == pytest.approx(want, rel=1e-9)
  plus = by[("h2o+", 8)]
  assert plus["gap_closed"] == pytest.approx(
      (sp - plus["perplexity"]) / (sp - full["perplexity"]), rel=1e-9)
  for key in (("lambda_less", 8), ("h2o_less", 32), ("lambda_less", 32)):
    assert by[key]["status"] == "missing" and by[key]["perplexity"] is None

  # Baseline+ = R/2 extra slots (R = 4 for the saved kernels, 8 by default).
  assert by[("h2o+", 8)]["slots"] == 8 + 2 and by[("lambda+", 8)]["slots"] == 8 + 4
  # Memory: fp32 cache, so R/2 extra slots cost exactly the LESS state (H, z).
  assert jnp.dtype(config.compute_dtype).itemsize == 4
  assert by[("h2o+", 8)]["memory_bytes"] == less["memory_bytes"]
  assert by[("h2o", 8)]["memory_bytes"] < less["memory_bytes"]
  assert by[("h2o", 8)]["memory_bytes"] == by[("lambda", 8)]["memory_bytes"]
  assert full["memory_bytes"] == le.full_cache_bytes(config, SEQ)


def test_g_cache_on_scores_like_prompt_g_forward(workdir):
  """--g_prompt: the full row is the forward with the prompt's G_LM over the targets
  after the prompt; a budget holding every position equals it; the rows differ
  from whole-sequence A."""
  wd, config, params, data = workdir
  from pldr_jax.inference import decode
  from pldr_jax.data import load_tokenizer, make_eval_batches
  batches = make_eval_batches(data.replace(max_eval_batches=1),
                              load_tokenizer(data.tokenizer_path))
  prompt = 8
  rows = le.run_eval(wd, [4, 32], batches=batches, g_prompt=prompt, log=lambda *_: None)
  by = {(r["method"], r["budget"]): r for r in rows}
  tot = cnt = 0.0
  for b in batches:
    tokens, mask = jnp.asarray(b["tokens"]), jnp.asarray(b["mask"])
    g = decode.prompt_g(params, tokens, mask, prompt, config=config)
    lengths = jnp.asarray(np.clip(np.asarray(mask).sum(-1) - 1, 1, SEQ - 1), jnp.int32)
    logits, _ = pmodel.forward(params, tokens[:, :-1], lengths, config=config, g_lm=g)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                         tokens[:, 1:])
    w = np.asarray(mask[:, 1:]) * (np.arange(1, SEQ) >= prompt)[None]
    tot += float(jnp.sum(ce * w))
    cnt += float(w.sum())
  full = by[("full", None)]
  assert full["tokens"] == cnt
  assert full["perplexity"] == pytest.approx(math.exp(tot / cnt), rel=1e-5)
  assert by[("h2o", 32)]["perplexity"] == pytest.approx(full["perplexity"], rel=1e-4)
  assert by[("h2o", 4)]["perplexity"] != pytest.approx(full["perplexity"], rel=1e-6)
  whole = le.run_eval(wd, [4], batches=batches, log=lambda *_: None)
  assert whole[0]["tokens"] > cnt  # all targets, not just those after the prompt
  with pytest.raises(ValueError, match="g_prompt"):
    le.run_eval(wd, [4], batches=batches, g_prompt=SEQ, log=lambda *_: None)


def test_gap_closed_formula():
  assert le.gap_closed(12.0, 10.0, 8.0) == pytest.approx(0.5)
  assert le.gap_closed(12.0, 13.0, 8.0) == pytest.approx(-0.25)
  assert le.gap_closed(8.0, 8.0, 8.0) is None
  assert le.gap_closed(None, 8.0, 8.0) is None


def test_policies_from_budget():
  p = le.sparse_policy("h2o", 33)
  assert (p.heavy, p.recent, p.budget) == (16, 17, 33)
  p = le.sparse_policy("lambda", 16)
  assert (p.sink, p.recent) == (4, 12)
  p = le.sparse_policy("lambda", 3)
  assert (p.sink, p.recent) == (2, 1)
  with pytest.raises(ValueError):
    le.sparse_policy("h2o", 1)

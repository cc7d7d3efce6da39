"""An lm-evaluation-harness model for PLDR-LLM checkpoints: `--model pldr-jax`.

    lm_eval --model pldr-jax --model_args checkpoint=RUN_DIR,batch_size=16,g_cache=True \\
        --tasks arc_easy

Importing this module registers the model with lm-eval (`@register_model`).
Model args: `checkpoint` (a run workdir holding `checkpoints/`, or the
checkpoints directory itself), `batch_size` (default 8), `g_cache`
(True/False, default True), `max_length` (default the model's max_len),
`tokenizer` (a SentencePiece `.model`; default the one named in the
checkpoint meta), `step` (default the latest).

Scoring semantics (what the G-cache means here):

* `loglikelihood(context, continuation)` runs the KV/G-cache path that
  generation uses: `decode.prefill` over the context, then one
  `decode.decode_step` per continuation token (teacher forcing). The
  deductive G_LM is therefore the one built from the *context* at prefill and
  held fixed over the continuation, exactly as in `pldr_jax.inference.generate`. With the
  default (non-causal) metric, g_cache on and off give the same scores (off
  recomputes G_LM from the cached A each step). This equals
  `model.forward(context + continuation, g_lm=<G_LM of the context>)`.
  An empty context is replaced by the [END] token (the document separator of
  the training data). Context + continuation are left-truncated to fit
  `max_length`.
* `loglikelihood_rolling(text)` is training-style perplexity: lm-eval's
  disjoint rolling windows of `max_length` tokens (the first one conditioned
  on [END]), each scored with one full `model.forward` (G_LM from the window).
* `generate_until` is greedy `pldr_jax.inference.generate.generate` (stop token [END]),
  `max_gen_toks` new tokens (default 256, capped by the window), the decoded
  text cut at the first `until` string.

Requests are sorted by length and batched; prompts are right-padded to length
buckets (powers of two) and the batch to `batch_size`, so each bucket compiles
once.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from pldr_jax.inference import decode
from pldr_jax import model
from pldr_jax.training import train
from pldr_jax.config import PLDRConfig
from pldr_jax.data.tokenizer import END_ID, PAD_ID
from pldr_jax.inference.caches import FullCache
from pldr_jax.inference.generate import SamplingConfig, bucket_length, default_buckets, generate

DEFAULT_MAX_GEN_TOKS = 256


def _as_bool(v) -> bool:
  if isinstance(v, bool):
    return v
  s = str(v).strip().lower()
  if s in ("1", "true", "yes", "on"):
    return True
  if s in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"not a boolean: {v!r}")


def resolve_checkpoint_dir(path) -> Path:
  """A run workdir (with checkpoints/) or the checkpoints dir itself."""
  p = Path(os.fspath(path)).expanduser().resolve()
  if (p / "checkpoints").is_dir():
    return p / "checkpoints"
  if not p.is_dir():
    raise FileNotFoundError(f"checkpoint directory not found: {p}")
  return p


def token_stats(logits, targets):
  """(log p(targets), greedy) from logits [..., V] and int targets [...].

  The log-probs are the training NLL's (`train.log_probs`, `train.token_logprobs`);
  greedy (lm-eval's is_greedy) says whether each target is the argmax of them.
  """
  lp = train.log_probs(logits)
  return train.token_logprobs(lp, targets), jnp.argmax(lp, axis=-1) == targets


def _pow2_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
  out, n = [], start
  while n < limit:
    out.append(n)
    n *= 2
  return tuple(out) + (limit,)


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "g_cache"))
def score_continuations(params, g_lm, ctx, ctx_len, cont, cont_len, *, config: PLDRConfig,
                        cache_len: int, g_cache: bool):
  """Log-probs of continuations through the KV/G-cache path.

  ctx: int32 [B, Sc] right-padded contexts, ctx_len [B] (>= 1); cont: int32
  [B, Nc] right-padded continuations, cont_len [B] (>= 1); every row needs
  ctx_len + cont_len - 1 <= cache_len. Returns (sum log p [B] float32,
  all-greedy [B] bool).
  """
  first, state, gcache = decode.prefill(params, ctx, ctx_len, config=config,
                                        cache_len=cache_len, g_cache=g_cache, g_lm=g_lm,
                                        all_logits=False)

  lp0, g0 = token_stats(first, cont[:, 0])
  step_params = decode.decode_params(params, config, g_cache)  # per layer, sliced once

  def body(state, xs):
    tok, nxt = xs
    lg, state = decode.decode_step(step_params, gcache, state, tok, config=config,
                                   g_cache=g_cache)
    return state, token_stats(lg, nxt)

  nc = cont.shape[1]
  if nc > 1:
    _, (lps, gs) = jax.lax.scan(body, state, (cont[:, :-1].T, cont[:, 1:].T))
    lps = jnp.concatenate([lp0[None], lps], axis=0).T   # [B, Nc]
    gs = jnp.concatenate([g0[None], gs], axis=0).T
  else:
    lps, gs = lp0[:, None], g0[:, None]
  valid = jnp.arange(nc)[None, :] < cont_len[:, None]
  return jnp.sum(jnp.where(valid, lps, 0.0), axis=1), jnp.all(gs | ~valid, axis=1)


@functools.partial(jax.jit, static_argnames=("config",))
def score_full(params, g_lm, tokens, lengths, first_pred, *, config: PLDRConfig):
  """Plain forward: sum of log p(tokens[t] | tokens[:t]) for t in [first_pred, length).

  tokens: int32 [B, S]; lengths, first_pred: int32 [B]. Returns (sum [B], greedy [B]).
  The forward reads all `lengths` tokens (not `train.model_inputs`' n - 1), so a
  learned G_LM sees the last token too; the log-probs and which targets count are
  the training NLL's (`train.target_weights`), summed per row.
  """
  logits, _ = model.forward(params, tokens, lengths, config=config, g_lm=g_lm)
  tok_lp, greedy = token_stats(logits[:, :-1], tokens[:, 1:])
  mask = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
  valid = train.target_weights(mask, first_pred) > 0
  return jnp.sum(jnp.where(valid, tok_lp, 0.0), axis=1), jnp.all(greedy | ~valid, axis=1)


@register_model("pldr-jax")
class PLDRJaxLM(LM):
  """lm-eval model over a pldr-jax checkpoint (see the module docstring)."""

  def __init__(self, checkpoint: str, batch_size=8, g_cache=True, max_length=None,
               tokenizer: str | None = None, step=None, max_gen_toks=DEFAULT_MAX_GEN_TOKS,
               **unused):
    super().__init__()
    import pldr_jax
    self.ckdir = resolve_checkpoint_dir(checkpoint)
    m = pldr_jax.load(self.ckdir, step=None if step is None else int(step), tokenizer=tokenizer)
    self.config, self.params, self.step = m.config, m.params, m.step
    self.g_lm = model.resolve_g_lm(self.config, m.g_lm)
    if m.tokenizer is None:
      raise ValueError("no tokenizer: pass tokenizer=PATH (the checkpoint meta names none, or "
                       "its file is gone)")
    self.tokenizer = m.tokenizer
    bs = str(batch_size if batch_size is not None else 8)
    self.batch_size = 8 if bs.startswith("auto") else max(1, int(bs))
    self.g_cache = _as_bool(g_cache)
    self.max_length = self.config.max_len if max_length is None else int(max_length)
    if not 2 <= self.max_length <= self.config.max_len:
      raise ValueError(f"max_length={self.max_length} must be in [2, {self.config.max_len}]")
    self.max_gen_toks = int(max_gen_toks)
    self.ctx_buckets = tuple(b for b in default_buckets(self.config.max_len)
                             if b < self.max_length) + (self.max_length,)
    self.cont_buckets = _pow2_buckets(self.max_length)

  # -- tokens ---------------------------------------------------------------

  def tok_encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def tok_decode(self, ids) -> str:
    return self.tokenizer.decode(list(ids))

  def _encode_pair(self, context: str, continuation: str):
    """Token ids of (context, continuation): whitespace moves to the continuation
    and the continuation is the tail of the joint encoding."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
      continuation = context[-n_space:] + continuation
      context = context[:-n_space]
    ctx = self.tok_encode(context)
    whole = self.tok_encode(context + continuation)
    if whole[:len(ctx)] == ctx and len(whole) > len(ctx):
      cont = whole[len(ctx):]
    else:
      cont = self.tok_encode(continuation)
    return ctx, cont

  def _fit(self, ctx: list[int], cont: list[int]):
    """Left-truncate so that prefill(ctx) + len(cont) - 1 decode steps fit max_length."""
    ctx = ctx or [END_ID]
    inp = (ctx + cont)[-(self.max_length + 1):]
    n = min(len(cont), len(inp) - 1)
    return inp[:-n], inp[-n:]

  # -- batching -------------------------------------------------------------

  def _pad(self, rows: Sequence[list[int]], width: int, batch: int):
    out = np.full((batch, width), PAD_ID, np.int32)
    lens = np.ones((batch,), np.int32)
    for i in range(batch):
      r = rows[i] if i < len(rows) else rows[0]   # pad rows: copies of the first
      out[i, :len(r)] = r
      lens[i] = len(r)
    return out, lens

  def score_pairs(self, pairs: Sequence[tuple[list[int], list[int]]]):
    """[(context ids, continuation ids)] -> [(sum log p, is_greedy)] via the KV/G-cache."""
    fitted = [self._fit(c, x) for c, x in pairs]
    order = sorted(range(len(fitted)), key=lambda i: -(len(fitted[i][0]) + len(fitted[i][1])))
    res: list = [None] * len(fitted)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      ctxs = [fitted[i][0] for i in idx]
      conts = [fitted[i][1] for i in idx]
      sc = bucket_length(max(map(len, ctxs)), self.ctx_buckets)
      nc = bucket_length(max(map(len, conts)), self.cont_buckets)
      ctx, ctx_len = self._pad(ctxs, sc, self.batch_size)
      cont, cont_len = self._pad(conts, nc, self.batch_size)
      lp, greedy = score_continuations(
          self.params, self.g_lm, ctx, ctx_len, cont, cont_len, config=self.config,
          cache_len=self.max_length, g_cache=self.g_cache)
      lp, greedy = np.asarray(lp), np.asarray(greedy)
      for j, i in enumerate(idx):
        res[i] = (float(lp[j]), bool(greedy[j]))
    return res

  def score_windows(self, windows: Sequence[tuple[list[int], list[int]]]) -> list[float]:
    """[(context ids, predicted ids)] -> sum log p of the predicted ids, one full forward each."""
    seqs = [(c + p, len(c)) for c, p in windows]
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    res: list = [None] * len(seqs)
    buckets = tuple(b for b in default_buckets(self.config.max_len)
                    if b < self.max_length + 1) + (self.max_length + 1,)
    for s in range(0, len(order), self.batch_size):
      idx = order[s:s + self.batch_size]
      rows = [seqs[i][0] for i in idx]
      width = min(bucket_length(max(map(len, rows)), buckets), self.config.max_len)
      tokens, lengths = self._pad(rows, width, self.batch_size)
      first = np.array([seqs[i][1] for i in idx] + [1] * (self.batch_size - len(idx)), np.int32)
      lp, _ = score_full(self.params, self.g_lm, tokens, lengths, first, config=self.config)
      lp = np.asarray(lp)
      for j, i in enumerate(idx):
        res[i] = float(lp[j])
    return res

  # -- the LM API -----------------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    pairs = [self._encode_pair(*req.args[:2]) for req in requests]
    out = self.score_pairs(pairs)
    for req, r in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", req.args, r)
    return out

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    # The window must fit one forward: context (>= 1 token) + predictions <= config.max_len.
    win = min(self.max_length, self.config.max_len - 1)
    all_windows, owner = [], []
    for k, req in enumerate(requests):
      ids = self.tok_encode(req.args[0])
      for w in get_rolling_token_windows(ids, END_ID, win, 1):
        all_windows.append(make_disjoint_window(w))
        owner.append(k)
    sums = np.zeros(len(requests))
    if all_windows:
      for k, v in zip(owner, self.score_windows(all_windows)):
        sums[k] += v
    out = [float(x) for x in sums]
    for req, r in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, r)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False):
    jobs = []
    for k, req in enumerate(requests):
      context, kwargs = req.args[0], dict(req.args[1] if len(req.args) > 1 else {})
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
      max_new = max(1, min(max_new, self.max_length - 1))
      ids = self.tok_encode(context) or [END_ID]
      ids = ids[-(self.max_length - max_new):]
      jobs.append((k, ids, max_new, until))
    res: list = [None] * len(jobs)
    sampling = SamplingConfig(temperature=0.0, stop_token=END_ID)
    jobs.sort(key=lambda j: (j[2], -len(j[1])))
    for s in range(0, len(jobs), self.batch_size):
      group = jobs[s:s + self.batch_size]
      # Same max_new within a compiled program: use the group's largest.
      max_new = max(j[2] for j in group)
      max_new = min(max_new, self.max_length - max(len(j[1]) for j in group))
      prompts = [j[1] for j in group]
      prompts += [prompts[0]] * (self.batch_size - len(prompts))
      outs = generate(self.params, prompts, config=self.config, max_new_tokens=max_new,
                      sampling=sampling, cache=FullCache(g_cache=self.g_cache), g_lm=self.g_lm,
                      buckets=self.ctx_buckets, cache_len=self.max_length)
      for j, (k, _, own_max, until) in enumerate(group):
        toks = [t for t in outs[j][:own_max] if t != END_ID]
        if len(outs[j]) and END_ID in outs[j][:own_max]:
          toks = outs[j][:outs[j].index(END_ID)]
        text = self.tok_decode(toks)
        for u in until:
          if u and u in text:
            text = text[:text.index(u)]
        res[k] = text
        self.cache_hook.add_partial("generate_until", requests[k].args, text)
    return res

"""Sampling and generation: greedy, temperature, top-k, top-p, stop token.

`generate` runs prefill and the whole token loop inside one jit
(`lax.while_loop`); `stream` yields tokens one step at a time for notebooks.
Prompts are right-padded to a length bucket, so prompts of different lengths
in the same bucket reuse one compiled program. Sampling settings are traced
arrays, not static arguments: changing them does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import decode, model
from pldr_jax.config import PLDRConfig

PAD_ID = 0


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; stop_token -1 = none."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  stop_token: int = -1

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"top_k must be >= 0, got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def as_arrays(self) -> dict:
    return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p), "stop_token": jnp.int32(self.stop_token)}


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """Draw one token per row. logits: [B, V]; scalars may be traced -> int32 [B].

  Greedy when temperature == 0. top-k keeps the k largest logits; top-p keeps
  the smallest set of most likely tokens whose probability reaches top_p.
  """
  lf = logits.astype(jnp.float32)
  greedy = jnp.argmax(lf, axis=-1).astype(jnp.int32)
  scaled = lf / jnp.maximum(temperature, 1e-6)
  neg = jnp.finfo(jnp.float32).min
  desc = -jnp.sort(-scaled, axis=-1)                                   # [B, V]
  v = lf.shape[-1]
  kth = desc[:, jnp.clip(top_k - 1, 0, v - 1)][:, None]
  keep_k = (top_k <= 0) | (scaled >= kth)
  desc_k = jnp.where((top_k <= 0) | (jnp.arange(v) < top_k), desc, neg)
  probs = jax.nn.softmax(desc_k, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs           # mass of strictly better tokens
  n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)
  pth = jnp.take_along_axis(desc_k, (n_keep - 1)[:, None], axis=-1)
  keep_p = scaled >= pth
  masked = jnp.where(keep_k & keep_p, scaled, neg)
  sampled = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
  return jnp.where(temperature > 0, sampled, greedy)


def default_buckets(max_len: int) -> tuple[int, ...]:
  """Powers of two from 16 up to max_len (max_len itself included)."""
  out, n = [], 16
  while n < max_len:
    out.append(n)
    n *= 2
  return tuple(out) + (max_len,)


def bucket_length(n: int, buckets: Sequence[int]) -> int:
  for b in sorted(buckets):
    if n <= b:
      return b
  raise model.InputError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")


def pad_prompts(prompts, config: PLDRConfig, max_new_tokens: int,
                buckets: Sequence[int] | None = None, cache_len: int | None = None):
  """Validate prompts (lists of ids) and right-pad them to a length bucket.

  Returns (tokens int32 [B, bucket], lengths int32 [B]).
  """
  cache_len = config.max_len if cache_len is None else cache_len
  if len(prompts) == 0:
    raise model.InputError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if np.any(lengths == 0):
    raise model.InputError(f"empty prompt at index {int(np.flatnonzero(lengths == 0)[0])}")
  longest = int(lengths.max())
  if longest > config.max_len:
    raise model.InputError(f"prompt of {longest} tokens is longer than the context length "
                           f"{config.max_len}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if longest + max_new_tokens > cache_len:
    raise model.InputError(
        f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the context "
        f"length {cache_len}; shorten the prompt or ask for fewer tokens")
  width = bucket_length(longest, buckets or default_buckets(config.max_len))
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = np.asarray(p, np.int64)
  model.check_inputs(tokens, lengths, config, capacity=cache_len)
  return tokens, lengths


def auto_cache_len(width: int, max_new_tokens: int, config: PLDRConfig,
                   buckets: Sequence[int] | None = None) -> int:
  """The KV-cache size for prompts padded to `width`: the smallest length bucket
  holding width + max_new_tokens (capped at the context).

  A decode step reads every cache slot, so a cache sized to the request rather
  than to the context makes short generations cheaper; being a function of the
  prompt bucket, it adds no compilations.
  """
  need = width + max_new_tokens
  if need >= config.max_len:
    return config.max_len
  return min(bucket_length(need, tuple(buckets or default_buckets(config.max_len))
                           + (config.max_len,)), config.max_len)


TRACE_COUNT = {"generate": 0}


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len", "g_cache"))
def generate_tokens(params, tokens, lengths, key, sampling: dict, g_lm=None, *,
                    config: PLDRConfig, max_new_tokens: int, cache_len: int,
                    g_cache: bool = True):
  """Prefill + decode loop in one program.

  tokens: int32 [B, S] right-padded; lengths: int32 [B]; key: typed PRNG key;
  sampling: SamplingConfig.as_arrays(). Returns (out int32 [B, max_new_tokens]
  padded with PAD after a stop token or the end, num int32 [B] generated
  tokens per sequence, stop token included).
  """
  TRACE_COUNT["generate"] += 1
  b = tokens.shape[0]
  logits, state, gcache = decode.prefill(params, tokens, lengths, config=config,
                                         cache_len=cache_len, g_cache=g_cache, g_lm=g_lm)
  last = jax.vmap(lambda row, n: row[n - 1])(logits, lengths)
  draw = lambda lg, i: sample_logits(lg, jax.random.fold_in(key, i), sampling["temperature"],
                                     sampling["top_k"], sampling["top_p"])
  out = jnp.full((b, max_new_tokens), PAD_ID, jnp.int32)
  init = (jnp.int32(0), draw(last, 0), state, out, jnp.zeros((b,), bool),
          jnp.zeros((b,), jnp.int32))

  def cond(carry):
    i, _, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, tok, state, out, done, num = carry
    out = out.at[:, i].set(jnp.where(done, PAD_ID, tok))
    num = num + (~done).astype(jnp.int32)
    done = done | (tok == sampling["stop_token"])
    logits, state = decode.decode_step(params, gcache, state, tok, config=config,
                                       g_cache=g_cache)
    return i + 1, draw(logits, i + 1), state, out, done, num

  _, _, _, out, _, num = jax.lax.while_loop(cond, body, init)
  return out, num


def generate(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
             key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
             g_cache: bool = True, g_lm=None, buckets: Sequence[int] | None = None,
             cache_len: int | None = None) -> list[list[int]]:
  """Generate continuations for a list of prompts (lists of token ids).

  Returns one list of new token ids per prompt (ending at the stop token, if
  it was produced). The decode loop runs in one jitted `lax.while_loop`.
  """
  tokens, lengths = pad_prompts(prompts, config, max_new_tokens, buckets, cache_len)
  if cache_len is None:
    cache_len = auto_cache_len(tokens.shape[1], max_new_tokens, config, buckets)
  key = jax.random.key(0) if key is None else key
  g_lm = model.resolve_g_lm(config, g_lm)
  out, num = generate_tokens(params, tokens, lengths, key, sampling.as_arrays(), g_lm,
                             config=config, max_new_tokens=max_new_tokens,
                             cache_len=cache_len, g_cache=g_cache)
  out, num = np.asarray(out), np.asarray(num)
  return [out[i, :num[i]].tolist() for i in range(len(prompts))]


def stream(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
           key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
           g_cache: bool = True, g_lm=None, buckets: Sequence[int] | None = None,
           cache_len: int | None = None) -> Iterator[np.ndarray]:
  """Yield the next token of every prompt, one step at a time: int32 [B] arrays.

  A sequence that has produced the stop token yields PAD afterwards; the
  iteration ends when every sequence stopped or after max_new_tokens steps.
  Draws the same tokens as `generate` with the same key.
  """
  tokens, lengths = pad_prompts(prompts, config, max_new_tokens, buckets, cache_len)
  if cache_len is None:
    cache_len = auto_cache_len(tokens.shape[1], max_new_tokens, config, buckets)
  key = jax.random.key(0) if key is None else key
  g_lm = model.resolve_g_lm(config, g_lm)
  arrays = sampling.as_arrays()
  logits, state, gcache = decode.prefill_jit(params, tokens, lengths, g_lm, config=config,
                                             cache_len=cache_len, g_cache=g_cache)
  last = jax.vmap(lambda row, n: row[n - 1])(logits, jnp.asarray(lengths))
  done = np.zeros(len(prompts), bool)
  for i in range(max_new_tokens):
    tok = _sample_jit(last, jax.random.fold_in(key, i), arrays)
    tok_np = np.asarray(tok)
    yield np.where(done, PAD_ID, tok_np)
    done |= tok_np == sampling.stop_token
    if done.all() or i + 1 == max_new_tokens:
      return
    last, state = decode.decode_step_jit(params, gcache, state, tok, config=config,
                                         g_cache=g_cache)


@jax.jit
def _sample_jit(logits, key, s):
  return sample_logits(logits, key, s["temperature"], s["top_k"], s["top_p"])

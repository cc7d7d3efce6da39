"""Sampling and generation: greedy, temperature, top-k, top-p, stop token.

One sampling step, `_sample_step`, takes a `SamplerState` (the decode cache,
the last token, the tokens written so far) to the next: it runs the cache's
decode step on the last token, draws the next one and records it. `generate`
runs prefill and then that step inside one jit (`lax.while_loop`); `stream`
runs the same step from a Python loop and yields each token (notebooks). Both
stop after the last token is drawn: no decode step is run whose logits are
not used. The cache is any object of the decode-cache protocol
(`pldr_jax.inference.caches`): `FullCache()` by default, `FullCache(g_cache=False)`
without the G-cache, or a plugin's (`less_jax.SparseCache`).
Prompts are right-padded to a length bucket, so prompts of different lengths
in the same bucket reuse one compiled program. The sampling *path* is static
(`SamplingConfig.path`: greedy or not, top_k, top-p on or off), so greedy
decoding is one argmax and top-k one `lax.top_k`, with no sort of the whole
vocabulary; temperature, top_p and the stop token are traced: changing them
does not recompile, changing the path compiles one more program.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pldr_jax import errors
from pldr_jax import model
from pldr_jax import params as params_lib
from pldr_jax import sharding as sharding_lib
from pldr_jax.config import PLDRConfig, SamplingConfig, SamplingPath
from pldr_jax.inference.caches import FullCache, check_cache

PAD_ID = 0


def _nucleus(sorted_logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keep mask over logits sorted in descending order: the smallest prefix whose
  probability reaches top_p (always at least one). [B, K] -> bool [B, K]."""
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs           # mass of strictly better tokens
  return (before < top_p) | (jnp.arange(sorted_logits.shape[-1]) == 0)


def sample_logits(logits: jax.Array, key: jax.Array, temperature: jax.Array,
                  top_p: jax.Array, path: SamplingPath) -> jax.Array:
  """Draw one token per row. logits: [B, V]; temperature, top_p may be traced;
  path static -> int32 [B].

  Greedy: argmax. Otherwise logits / temperature; top_k > 0 takes the k largest
  with `lax.top_k` and samples among them (top-p over those candidates only);
  top_k = 0 with top-p sorts the whole vocabulary.
  """
  lf = logits.astype(jnp.float32)
  if path.greedy:
    return jnp.argmax(lf, axis=-1).astype(jnp.int32)
  scaled = lf / jnp.maximum(temperature, 1e-6)
  neg = jnp.finfo(jnp.float32).min
  k = min(path.top_k, lf.shape[-1])
  if k <= 0 and not path.top_p:
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
  if k > 0:
    cand, idx = jax.lax.top_k(scaled, k)                                # [B, k], descending
  else:
    idx = jnp.argsort(-scaled, axis=-1)
    cand = jnp.take_along_axis(scaled, idx, axis=-1)
  if path.top_p:
    cand = jnp.where(_nucleus(cand, top_p), cand, neg)
  choice = jax.random.categorical(key, cand, axis=-1)
  return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


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
  raise errors.InputError(f"prompt of {n} tokens is longer than the largest bucket {max(buckets)}")


def pad_prompts(prompts, config: PLDRConfig, max_new_tokens: int,
                buckets: Sequence[int] | None = None, cache_len: int | None = None):
  """Validate prompts (lists of ids) and right-pad them to a length bucket.

  Returns (tokens int32 [B, bucket], lengths int32 [B]).
  """
  cache_len = config.max_len if cache_len is None else cache_len
  if len(prompts) == 0:
    raise errors.InputError("no prompts given")
  lengths = np.array([len(p) for p in prompts], np.int32)
  if np.any(lengths == 0):
    raise errors.InputError(f"empty prompt at index {int(np.flatnonzero(lengths == 0)[0])}")
  longest = int(lengths.max())
  if longest > config.max_len:
    raise errors.InputError(f"prompt of {longest} tokens is longer than the context length "
                           f"{config.max_len}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if longest + max_new_tokens > cache_len:
    raise errors.InputError(
        f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the context "
        f"length {cache_len}; shorten the prompt or ask for fewer tokens")
  width = bucket_length(longest, buckets or default_buckets(config.max_len))
  tokens = np.full((len(prompts), width), PAD_ID, np.int32)
  for i, p in enumerate(prompts):
    ids = np.asarray(p)
    if ids.dtype.kind not in "iu":  # 5.5 would silently become token 5
      raise errors.InputError(f"prompt {i} holds {ids.dtype} values: token ids must be "
                             "integers (e.g. tokenizer.encode(text))")
    tokens[i, :len(p)] = ids.astype(np.int64)
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


@struct.dataclass
class SamplerState:
  """Everything that changes from one generated token to the next.

  step    int32 []      tokens drawn so far (the next one's index)
  token   int32 [B]     the last token drawn: the next decode step's input
  decode  the cache's decode state (KVCache, less_jax's SparseState, ...)
  out     int32 [B, N]  the tokens drawn, PAD after a sequence's stop token
  done    bool [B]      the sequence has produced the stop token
  num     int32 [B]     tokens generated per sequence, stop token included
  """
  step: jax.Array
  token: jax.Array
  decode: object
  out: jax.Array
  done: jax.Array
  num: jax.Array


def _draw(logits, key, step, sampling: dict, path: SamplingPath) -> jax.Array:
  """Token `step` of every sequence: [B, V] -> int32 [B], key folded with the step."""
  return sample_logits(logits, jax.random.fold_in(key, step), sampling["temperature"],
                       sampling["top_p"], path)


def _record(state: SamplerState, tok: jax.Array, stop_token) -> SamplerState:
  """Write token `state.step` (PAD for a sequence that had stopped) and advance."""
  i = state.step
  return state.replace(step=i + 1, token=tok,
                       out=state.out.at[:, i].set(jnp.where(state.done, PAD_ID, tok)),
                       num=state.num + (~state.done).astype(jnp.int32),
                       done=state.done | (tok == stop_token))


def _start(last_logits, decode_state, key, sampling: dict, *, path: SamplingPath,
           max_new_tokens: int) -> SamplerState:
  """The state after the first token, drawn from the prefill's last logits [B, V]."""
  b = last_logits.shape[0]
  state = SamplerState(step=jnp.int32(0), token=jnp.zeros((b,), jnp.int32), decode=decode_state,
                       out=jnp.full((b, max_new_tokens), PAD_ID, jnp.int32),
                       done=jnp.zeros((b,), bool), num=jnp.zeros((b,), jnp.int32))
  return _record(state, _draw(last_logits, key, 0, sampling, path), sampling["stop_token"])


def _sample_step(step_params, gcache, state: SamplerState, key, sampling: dict, cache, *,
                 config: PLDRConfig, path: SamplingPath, mesh=None) -> SamplerState:
  """One token: the cache's decode step on `state.token`, then draw and record the next."""
  logits, decode_state = _step(step_params, gcache, state.decode, state.token, cache,
                               config=config, mesh=mesh)
  tok = _draw(logits, key, state.step, sampling, path)
  return _record(state.replace(decode=decode_state), tok, sampling["stop_token"])


def _constrain(tree, abstract, mesh):
  """Pin a cache to the shardings its logical axes give on `mesh` (None: as is)."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, sharding_lib.shardings(abstract, mesh))


def _prefill(params, tokens, lengths, g_lm, cache, *, config, cache_len, mesh=None):
  """cache.prefill (each prompt's last logits [B, V], decode state, G-cache), with the
  decode state and G-cache pinned to their shardings."""
  with sharding_lib.kernel_mesh(config.attention, mesh):  # flash: per batch shard
    logits, state, gcache = cache.prefill(params, tokens, lengths, g_lm, config=config,
                                          cache_len=cache_len)
  if mesh is not None:
    s_abs, g_abs = cache.abstract(config=config, batch=tokens.shape[0], cache_len=cache_len)
    state, gcache = _constrain(state, s_abs, mesh), _constrain(gcache, g_abs, mesh)
  return logits, state, gcache


def _step(params, gcache, state, tokens, cache, *, config, mesh=None):
  """cache.step, with the new decode state pinned to its shardings."""
  logits, state = cache.step(params, gcache, state, tokens, config=config)
  if mesh is not None:
    s_abs, _ = cache.abstract(config=config, batch=tokens.shape[0],
                              cache_len=getattr(state, "cache_len", None))
    state = _constrain(state, s_abs, mesh)
  return logits, state


def place(params, tokens, lengths, g_lm, cache, *, config: PLDRConfig, mesh):
  """Put generation's inputs on `mesh`: parameters by their logical axes (the
  training layout), the prompts split over the batch axes, the rest replicated."""
  if mesh is None:
    return params, tokens, lengths, g_lm, cache
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  on_batch = lambda x: jax.device_put(x, sharding_lib.logical_sharding(
      x.shape, ("batch",) + (None,) * (x.ndim - 1), mesh))
  return (jax.device_put(params, params_lib.param_shardings(config, mesh)), on_batch(tokens),
          on_batch(lengths), None if g_lm is None else jax.device_put(g_lm, rep),
          jax.device_put(cache, rep))


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "cache_len", "path",
                                             "mesh"))
def generate_tokens(params, tokens, lengths, key, sampling: dict, g_lm=None, cache=FullCache(),
                    *, config: PLDRConfig, max_new_tokens: int, cache_len: int,
                    path: SamplingPath = SamplingPath(), mesh=None):
  """Prefill + the sampling loop in one program.

  tokens: int32 [B, S] right-padded; lengths: int32 [B]; key: typed PRNG key;
  sampling: SamplingConfig.as_arrays(); path: SamplingConfig.path; cache: a
  decode cache (a pytree: its static fields select the program).
  Returns (out int32 [B, max_new_tokens] padded with PAD after a stop token or
  the end, num int32 [B] generated tokens per sequence, stop token included).
  """
  last, state, gcache = _prefill(params, tokens, lengths, g_lm, cache, config=config,
                                 cache_len=cache_len, mesh=mesh)
  step_params = cache.step_params(params, config=config, batch=tokens.shape[0])  # once
  state = _start(last, state, key, sampling, path=path, max_new_tokens=max_new_tokens)
  state = jax.lax.while_loop(
      lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done),
      lambda s: _sample_step(step_params, gcache, s, key, sampling, cache, config=config,
                             path=path, mesh=mesh), state)
  return state.out, state.num


def _inputs(params, prompts, config, max_new_tokens, key, g_lm, buckets, cache_len, cache,
            mesh):
  """What generate and stream share: validated, padded and placed inputs."""
  tokens, lengths = pad_prompts(prompts, config, max_new_tokens, buckets, cache_len)
  if cache_len is None:
    cache_len = auto_cache_len(tokens.shape[1], max_new_tokens, config, buckets)
  key = jax.random.key(0) if key is None else key
  g_lm = model.resolve_g_lm(config, g_lm)
  params, tokens, lengths, g_lm, cache = place(params, tokens, lengths, g_lm, check_cache(cache),
                                               config=config, mesh=mesh)
  return params, tokens, lengths, key, g_lm, cache, cache_len


def generate(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
             key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
             g_lm=None, buckets: Sequence[int] | None = None, cache_len: int | None = None,
             cache=None, mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
  """Generate continuations for a list of prompts (lists of token ids).

  cache: None / FullCache() (the KV-cache and the G-cache), FullCache(g_cache=False)
  (G_LM recomputed from the cached A at every step), or a plugin's cache such as
  less_jax.SparseCache(policy, kernels) (H2O, Λ-masking, sliding window, LESS),
  the way a kvpress user passes a press: no model change.
  mesh: decode sharded like training (pldr_jax.training.train.make_mesh): weights by
  their logical axes, prompts and caches split over the batch axes by the same
  Flax logical-axis rules (pldr_jax.sharding); the tokens equal one device's.
  Returns one list of new token ids per prompt (ending at the stop token, if
  it was produced). The decode loop runs in one jitted `lax.while_loop`.
  """
  params, tokens, lengths, key, g_lm, cache, cache_len = _inputs(
      params, prompts, config, max_new_tokens, key, g_lm, buckets, cache_len, cache, mesh)
  out, num = generate_tokens(params, tokens, lengths, key, sampling.as_arrays(), g_lm, cache,
                             config=config, max_new_tokens=max_new_tokens, cache_len=cache_len,
                             path=sampling.path, mesh=mesh)
  out, num = np.asarray(out), np.asarray(num)
  return [out[i, :num[i]].tolist() for i in range(len(prompts))]


def stream(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
           key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
           g_lm=None, buckets: Sequence[int] | None = None, cache_len: int | None = None,
           cache=None, mesh: jax.sharding.Mesh | None = None) -> Iterator[np.ndarray]:
  """Yield the next token of every prompt, one step at a time: int32 [B] arrays.

  A sequence that has produced the stop token yields PAD afterwards; the
  iteration ends when every sequence stopped or after max_new_tokens steps.
  The same `_sample_step` as `generate`: the same tokens for the same key and cache.
  """
  params, tokens, lengths, key, g_lm, cache, cache_len = _inputs(
      params, prompts, config, max_new_tokens, key, g_lm, buckets, cache_len, cache, mesh)
  arrays, path = sampling.as_arrays(), sampling.path
  last, state, gcache = _prefill_jit(params, tokens, lengths, g_lm, cache, config=config,
                                     cache_len=cache_len, mesh=mesh)
  step_params = _step_params_jit(params, cache, config=config, batch=tokens.shape[0])
  state = _start_jit(last, state, key, arrays, path=path, max_new_tokens=max_new_tokens)
  for i in range(max_new_tokens):
    yield np.array(state.out[:, i])
    if i + 1 == max_new_tokens or np.array(state.done).all():
      return
    state = _sample_step_jit(step_params, gcache, state, key, arrays, cache, config=config,
                             path=path, mesh=mesh)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "cache_len", "mesh"))
_start_jit = jax.jit(_start, static_argnames=("path", "max_new_tokens"),
                     donate_argnames=("decode_state",))
_sample_step_jit = jax.jit(_sample_step, static_argnames=("config", "path", "mesh"),
                           donate_argnames=("state",))
# The cache's decode step alone (what `_sample_step` runs first): pldr_jax.aot compiles it.
_step_jit = jax.jit(_step, static_argnames=("config", "mesh"), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("config", "batch"))
def _step_params_jit(params, cache, *, config, batch):
  return cache.step_params(params, config=config, batch=batch)

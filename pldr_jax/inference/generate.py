"""Sampling and generation: greedy, temperature, top-k, top-p, stop token.

`generate` runs prefill and the whole token loop inside one jit
(`lax.while_loop`); `stream` yields tokens one step at a time for notebooks.
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
from pldr_jax.inference import decode, kv_cache
from pldr_jax import model
from pldr_jax import params as params_lib
from pldr_jax import sharding as sharding_lib
from pldr_jax.config import PLDRConfig, SamplingConfig, SamplingPath
from pldr_jax.inference.kv_cache import GCache, KVCache

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
class FullCache:
  """The default cache: a KV-cache sized to the request, plus the G-cache
  (g_cache=False recomputes G_LM from the cached A at every step)."""
  g_cache: bool = struct.field(pytree_node=False, default=True)

  def prefill(self, params, tokens, lengths, g_lm, *, config, cache_len):
    """-> (each prompt's last logits [B, V], KVCache, GCache)."""
    return decode.prefill(params, tokens, lengths, config=config, cache_len=cache_len,
                          g_cache=self.g_cache, g_lm=g_lm, all_logits=False)

  def step_params(self, params, *, config, batch=None):
    """What `step` reads: per-layer weights without the unused G network."""
    return decode.decode_params(params, config, self.g_cache, batch)

  def abstract(self, *, config, batch, cache_len):
    """(KVCache, GCache) of ArrayInfo: shapes, dtypes, logical axes."""
    return (KVCache.abstract(config, batch, cache_len, self.g_cache),
            GCache.abstract(config, batch, self.g_cache))

  def step(self, params, gcache, state, tokens, *, config):
    """params: `step_params(...)` -> (logits [B, V], KVCache)."""
    return decode.decode_step(params, gcache, state, tokens, config=config,
                              g_cache=self.g_cache)


@struct.dataclass
class SparseCache:
  """A fixed-size sparse cache: `policy` (less_jax: H2O, Λ-masking, sliding window)
  and optional LESS `kernels` (one KernelParams or None per layer), prefilled
  'one_shot' (default) or 'greedy' (less_jax.model.less_prefill). Its memory does
  not grow with the sequence. A pytree: the kernels are traced, policy and
  prefill mode static (changing them compiles another program)."""
  policy: object = struct.field(pytree_node=False)
  kernels: object = None
  prefill_mode: str = struct.field(pytree_node=False, default="one_shot")

  def prefill(self, params, tokens, lengths, g_lm, *, config, cache_len):
    """-> (each prompt's last logits [B, V], less_jax SparseState, GCache)."""
    from less_jax import model as less_model
    del cache_len  # the budget fixes the size
    return less_model.less_prefill(params, tokens, lengths, config=config, policy=self.policy,
                                   kernels=self.kernels, g_lm=g_lm, mode=self.prefill_mode,
                                   all_logits=False)

  def step_params(self, params, *, config, batch=None):
    """What `step` reads: per-layer weights without the G network (G-cache)."""
    return decode.decode_params(params, config, batch=batch)

  def abstract(self, *, config, batch, cache_len):
    """(SparseState, GCache) of ArrayInfo: shapes, dtypes, logical axes."""
    from less_jax import cache as cache_lib, kernels as kernels_lib, model as less_model
    del cache_len
    ranks = tuple(kernels_lib.kernel_rank(k)
                  for k in less_model.check_kernels_list(self.kernels, config))
    return (cache_lib.SparseState.abstract(batch, config.num_heads, config.head_dim,
                                           self.policy.budget, ranks, config.compute_dtype),
            GCache.abstract(config, batch))

  def step(self, params, gcache, state, tokens, *, config):
    """params: `step_params(...)` -> (logits [B, V], less_jax SparseState)."""
    from less_jax import model as less_model
    return less_model.less_decode_step(params, gcache, state, tokens, config=config,
                                       policy=self.policy, kernels=self.kernels)


def _check_cache(cache):
  if cache is None:
    return FullCache()
  if not isinstance(cache, (FullCache, SparseCache)):
    raise TypeError(f"cache must be a generate.FullCache or generate.SparseCache, got {cache!r}")
  return cache


def _constrain(tree, abstract, mesh):
  """Pin a cache to the shardings its logical axes give on `mesh` (None: as is)."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, kv_cache.shardings(abstract, mesh))


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
  """Prefill + decode loop in one program.

  tokens: int32 [B, S] right-padded; lengths: int32 [B]; key: typed PRNG key;
  sampling: SamplingConfig.as_arrays(); path: SamplingConfig.path; cache: a
  FullCache or SparseCache (a pytree: its static fields select the program).
  Returns (out int32 [B, max_new_tokens] padded with
  PAD after a stop token or the end, num int32 [B] generated tokens per
  sequence, stop token included).
  """
  b = tokens.shape[0]
  last, state, gcache = _prefill(params, tokens, lengths, g_lm, cache, config=config,
                                 cache_len=cache_len, mesh=mesh)
  step_params = cache.step_params(params, config=config, batch=b)  # once, outside the loop
  draw = lambda lg, i: sample_logits(lg, jax.random.fold_in(key, i), sampling["temperature"],
                                     sampling["top_p"], path)
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
    logits, state = _step(step_params, gcache, state, tok, cache, config=config, mesh=mesh)
    return i + 1, draw(logits, i + 1), state, out, done, num

  _, _, _, out, _, num = jax.lax.while_loop(cond, body, init)
  return out, num


def generate(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
             key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
             g_cache: bool = True, g_lm=None, buckets: Sequence[int] | None = None,
             cache_len: int | None = None, cache=None,
             mesh: jax.sharding.Mesh | None = None) -> list[list[int]]:
  """Generate continuations for a list of prompts (lists of token ids).

  cache: None / FullCache() (the KV-cache and, unless g_cache=False, the
  G-cache) or SparseCache(policy, kernels) (H2O, Λ-masking, sliding window,
  LESS), the way a kvpress user passes a press: no model change.
  mesh: decode sharded like training (pldr_jax.training.train.make_mesh): weights by
  their logical axes, prompts and caches split over the batch axes by the same
  Flax logical-axis rules (pldr_jax.sharding); the tokens equal one device's.
  Returns one list of new token ids per prompt (ending at the stop token, if
  it was produced). The decode loop runs in one jitted `lax.while_loop`.
  """
  tokens, lengths = pad_prompts(prompts, config, max_new_tokens, buckets, cache_len)
  if cache_len is None:
    cache_len = auto_cache_len(tokens.shape[1], max_new_tokens, config, buckets)
  key = jax.random.key(0) if key is None else key
  g_lm = model.resolve_g_lm(config, g_lm)
  cache = _check_cache(cache if cache is not None else FullCache(g_cache))
  params, tokens, lengths, g_lm, cache = place(params, tokens, lengths, g_lm, cache,
                                               config=config, mesh=mesh)
  out, num = generate_tokens(params, tokens, lengths, key, sampling.as_arrays(), g_lm, cache,
                             config=config, max_new_tokens=max_new_tokens, cache_len=cache_len,
                             path=sampling.path, mesh=mesh)
  out, num = np.asarray(out), np.asarray(num)
  return [out[i, :num[i]].tolist() for i in range(len(prompts))]


def stream(params, prompts, *, config: PLDRConfig, max_new_tokens: int,
           key: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
           g_cache: bool = True, g_lm=None, buckets: Sequence[int] | None = None,
           cache_len: int | None = None, cache=None,
           mesh: jax.sharding.Mesh | None = None) -> Iterator[np.ndarray]:
  """Yield the next token of every prompt, one step at a time: int32 [B] arrays.

  A sequence that has produced the stop token yields PAD afterwards; the
  iteration ends when every sequence stopped or after max_new_tokens steps.
  Draws the same tokens as `generate` with the same key and cache.
  """
  tokens, lengths = pad_prompts(prompts, config, max_new_tokens, buckets, cache_len)
  if cache_len is None:
    cache_len = auto_cache_len(tokens.shape[1], max_new_tokens, config, buckets)
  key = jax.random.key(0) if key is None else key
  g_lm = model.resolve_g_lm(config, g_lm)
  arrays = sampling.as_arrays()
  cache = _check_cache(cache if cache is not None else FullCache(g_cache))
  params, tokens, lengths, g_lm, cache = place(params, tokens, lengths, g_lm, cache,
                                               config=config, mesh=mesh)
  last, state, gcache = _prefill_jit(params, tokens, lengths, g_lm, cache, config=config,
                                     cache_len=cache_len, mesh=mesh)
  step_params = _step_params_jit(params, cache, config=config, batch=tokens.shape[0])
  done = np.zeros(len(prompts), bool)
  for i in range(max_new_tokens):
    tok = _sample_jit(last, jax.random.fold_in(key, i), arrays, sampling.path)
    tok_np = np.asarray(tok)
    yield np.where(done, PAD_ID, tok_np)
    done |= tok_np == sampling.stop_token
    if done.all() or i + 1 == max_new_tokens:
      return
    last, state = _step_jit(step_params, gcache, state, tok, cache, config=config, mesh=mesh)


_prefill_jit = jax.jit(_prefill, static_argnames=("config", "cache_len", "mesh"))
_step_jit = jax.jit(_step, static_argnames=("config", "mesh"), donate_argnames=("state",))


@functools.partial(jax.jit, static_argnames=("config", "batch"))
def _step_params_jit(params, cache, *, config, batch):
  return cache.step_params(params, config=config, batch=batch)


@functools.partial(jax.jit, static_argnames=("path",))
def _sample_jit(logits, key, s, path):
  return sample_logits(logits, key, s["temperature"], s["top_p"], path)

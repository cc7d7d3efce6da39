"""KV-cache and G-cache decoding: prefill a prompt, then one token per step.

Two typed values travel between steps (pldr_jax.inference.kv_cache):
  * the `KVCache` (donated each step): k (after rotary) and v, one fixed
    buffer [B, H, dk, T] of T = cache_len slots per layer (time-minor: the
    step's two matrix products read each head's [dk, T] block as dk rows of
    T contiguous values, the layout XLA:CPU reads fastest), the
    per-sequence `lengths` [B], and (causal metric without G-cache) the running
    raw sum of q q^T [L, B, H, dk, dk] that the metric input is built from;
  * the `GCache` (constant, never donated): the deductive tensors computed at
    prefill. With `g_cache=True` it holds G_LM, which decode reads; with `g_cache=False` it holds A only and every step
    recomputes A_LM, A_P, G_LM with the power-law step. In the reference
    (non-causal) mode the two give identical outputs. Fixed-G modes keep
    their constant G_LM there.

Both steps are `pldr_jax.model.decoder` with their own attention: prefill is
the full forward pass (layers scanned) plus writing the prompt into the
caches; a decode step runs the layers unrolled, writes one token per sequence
into each layer's buffer in place and attends over it. Decode is fastest on
per-layer weights (`decode_params`, once per generation): on XLA:CPU every
slice of a stacked weight is a copy, which a step would pay each time.

As in the reference KVG-cache implementation, the deductive outputs come from
the prompt: the metric learner runs once, at prefill. With `causal_metric` and
no G-cache, each step extends the running sum with the new query and reruns the
metric learner, which reproduces the causal-metric forward exactly.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from pldr_jax import backend, metric, model, nn, plga, power_law
from pldr_jax.errors import InputError
from pldr_jax import params as params_lib
from pldr_jax.config import PLDRConfig
from pldr_jax.inference.kv_cache import GCache, KVCache


def _write_one(buf: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
  """buf: [B, H, dk, T]; new: [B, H, dk]; pos: int [B] -> buf with new at [b, :, :, pos_b].

  One scatter with explicit (batch, head, slot) indices: with the cache
  donated XLA:CPU writes it in place, and the step's attention then reads the
  updated buffer without a copy. A position outside the cache is dropped.
  """
  b, h = buf.shape[:2]
  bi = jnp.arange(b)[:, None]
  hi = jnp.arange(h)[None, :]
  return buf.at[bi, hi, :, pos[:, None]].set(new.astype(buf.dtype), mode="drop",
                                            unique_indices=True)


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, *, config: PLDRConfig,
            cache_len: int | None = None, g_cache: bool = True, g_lm=None,
            unroll: bool | None = None, all_logits: bool = True):
  """Run right-padded prompts and build the KV-cache and the G-cache.

  tokens: int [B, S]; lengths: int [B] (1 <= length <= S <= cache_len);
  g_lm: the constant G_LM of a fixed-G mode, [L, H, dk, dk] (or [L, B, ...]).
  all_logits=False: the LM head runs at each prompt's last token only, and the
  logits are [B, V] (what generation needs; a 110M prefill of 128-1024 tokens
  15-26% faster on a CPU: benchmarks/results/prefill_last_logits_2026-11-27.md).
  Returns (logits [B, S, V], KVCache, GCache); the cache's lengths = lengths.
  """
  cache_len = config.max_len if cache_len is None else cache_len
  model.check_inputs(tokens, lengths, config, capacity=cache_len)
  b, s = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  logits, aux = model.forward(params, tokens, lengths, config=config, g_lm=g_lm,
                              return_aux=True, unroll=unroll,
                              logits_at_last=None if all_logits else lengths)
  info = KVCache.abstract(config, b, cache_len, g_cache)
  # The prompt fills slots [0, S) of each layer's [B, H, dk, T] buffer.
  zeros = jnp.zeros(info.k[0].shape, info.k[0].dtype)
  fill = lambda t: tuple(
      zeros.at[..., :s].set(jnp.transpose(t[i], (0, 2, 3, 1)).astype(zeros.dtype))
      for i in range(config.num_layers))
  gram = None
  if info.gram is not None:  # causal metric without the G-cache: the running q q^T sum
    gram = _at_prompt_end(aux["gram"], lengths, config).astype(info.gram.dtype)
  return (logits, KVCache(k=fill(aux["k"]), v=fill(aux["v"]), lengths=lengths, gram=gram),
          prompt_gcache(aux, lengths, config, g_cache))


def _at_prompt_end(t: jax.Array, lengths: jax.Array, config: PLDRConfig) -> jax.Array:
  """A deductive tensor of the prompt as decode holds it: t [L, B, ...] as is, or
  with the causal metric t [L, B, S, ...] at each prompt's last token."""
  return model.at_last(t, lengths, batch_axis=1) if config.causal_metric else t


def prompt_gcache(ded: dict, lengths: jax.Array, config: PLDRConfig,
                  g_cache: bool = True) -> GCache:
  """The G-cache of a prompt from its per-layer deductive tensors stacked on [L]
  ('A', 'A_LM', 'G_LM' of a learned G; 'G_LM' alone for a given G; none for the
  identity). Used by `prefill` and by less_jax's `less_prefill`.

  Learned G: with the G-cache G_LM; without it A only (each step recomputes
  the rest), or nothing with the causal metric (the KVCache then carries the
  running q q^T sum instead).
  """
  if "A" not in ded:  # a given G, or the identity (empty)
    return GCache(g_lm=ded.get("G_LM"))
  pick = lambda name: _at_prompt_end(ded[name], lengths, config)
  if g_cache:
    return GCache(g_lm=pick("G_LM"))
  return GCache() if config.causal_metric else GCache(a=pick("A"))


def prompt_g(params: dict, tokens: jax.Array, mask: jax.Array, prompt_len: int, *,
             config: PLDRConfig) -> jax.Array:
  """G_LM of each sequence's first prompt_len tokens, as decoding after that prompt uses it.

  tokens, mask: [B, S] (right-padded; the model input is tokens[:, :-1], as in
  training). Non-causal metric: the prefill's G-cache, [L, B, H, dk, dk].
  Causal metric: the prompt's own positions keep their per-position G and every
  later position gets the G of the last prompt token (what the G-cache holds),
  [L, B, S-1, H, dk, dk]. `model.forward(tokens[:, :-1], g_lm=prompt_g(...))` is
  then teacher-forced decoding with the KV- and G-cache after that prompt.
  """
  lengths = jnp.clip(jnp.sum(mask, -1), 1, prompt_len).astype(jnp.int32)
  prompt = tokens[:, :prompt_len]
  if not config.causal_metric:
    _, _, gcache = prefill(params, prompt, lengths, config=config, cache_len=prompt_len)
    return gcache.g_lm
  _, aux = model.forward(params, prompt, lengths, config=config, return_aux=True)
  pos = jnp.minimum(jnp.arange(tokens.shape[1] - 1)[None, :], lengths[:, None] - 1)
  return aux["G_LM"][:, jnp.arange(tokens.shape[0])[:, None], pos]  # [L, B, S-1, H, dk, dk]


def _decode_g(layer_p: dict, gram, layer_g: GCache, q: jax.Array, config: PLDRConfig,
              g_cache: bool):
  """G_LM for one decode step of one layer, with the deductive tensors used.

  q: [B, 1, H, dk]; gram: the layer's running q q^T sum or None.
  Returns (G_LM [B, H, dk, dk] or None, new gram, aux).
  """
  if layer_g.g_lm is not None and (g_cache or not config.learned_g):
    return layer_g.g_lm, gram, {"G_LM": layer_g.g_lm}
  if not config.learned_g:
    return None, gram, {}
  if config.causal_metric:
    valid = jnp.ones(q.shape[:2], bool)
    gram = gram + metric.query_gram(q, valid, causal=False)
    a_in = metric.metric_input(layer_p["ln_a"], gram, config.ln_eps)
    a = metric.metric_learner(layer_p["res_units"], a_in.astype(config.compute_dtype),
                              config.ln_eps)
  elif layer_g.a is None:
    raise InputError("decode with g_cache=False needs the GCache a prefill with "
                     "g_cache=False builds (A); this one holds G_LM only")
  else:
    a = layer_g.a
  aux = {"A": a, **power_law.power_law_step(layer_p["plga"], a)}
  return aux["G_LM"], gram, aux


def decode_step(params: dict, gcache: GCache, cache: KVCache, tokens: jax.Array, *,
                config: PLDRConfig, g_cache: bool = True, return_deductive: bool = False):
  """Append one token per sequence and return its logits.

  params: stacked or per-layer (`decode_params`: no weight copies per step).
  tokens: int [B] written at position cache.lengths; every sequence must
  have room (lengths < cache_len): the Python-level `generate`/`stream` check it.
  Returns (logits [B, V], new KVCache) and, with return_deductive, a per-layer
  list of the deductive tensors used (G_LM, and A/A_LM/A_P when recomputed).
  """
  chex.assert_rank(tokens, 1)
  chex.assert_equal_shape([tokens, cache.lengths])
  chex.assert_equal(len(cache.k), config.num_layers)
  pos = cache.lengths
  visible = jnp.arange(cache.cache_len, dtype=jnp.int32)[None, :] <= pos[:, None]  # [B, T]

  def attend(i, layer_p, layer_xs, _, q, k, v):
    kc, vc, gram, layer_g = layer_xs
    g, gram, aux = _decode_g(layer_p, gram, layer_g, q, config, g_cache)
    kc, vc = _write_one(kc, k[:, 0], pos), _write_one(vc, v[:, 0], pos)
    out = plga.cached_attention(q[:, 0], kc, vc, g, visible)[:, None]
    return out, None, (kc, vc, gram, aux)

  layer = params_lib.layer_slice  # None (no gram, an empty GCache field) stays None
  xs = [(cache.k[i], cache.v[i], layer(cache.gram, i), layer(gcache, i))
        for i in range(config.num_layers)]  # a list: the layers run unrolled
  logits, _, ys = model.decoder(params, tokens[:, None], pos[:, None], attend, xs,
                                config=config)
  gram = None if cache.gram is None else jnp.stack([y[2] for y in ys])
  new_cache = KVCache(k=tuple(y[0] for y in ys), v=tuple(y[1] for y in ys), lengths=pos + 1,
                      gram=gram)
  if return_deductive:
    return logits[:, 0], new_cache, [y[3] for y in ys]
  return logits[:, 0], new_cache


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "g_cache", "unroll",
                                             "all_logits"))
def prefill_jit(params, tokens, lengths, g_lm=None, *, config, cache_len=None, g_cache=True,
                unroll=None, all_logits=True):
  """Jitted `prefill` (config, cache_len, g_cache, unroll and all_logits static)."""
  return prefill(params, tokens, lengths, config=config, cache_len=cache_len,
                 g_cache=g_cache, g_lm=g_lm, unroll=unroll, all_logits=all_logits)


def decode_params(params: dict, config: PLDRConfig, g_cache: bool = True,
                  batch: int | None = None) -> dict:
  """The parameters a decode step reads, one tree per layer (copied once).

  Decode runs the layers unrolled; from stacked weights each step would copy
  every layer's slice on XLA:CPU, so generation takes them apart once, fusing
  q/k/v into one [d, 3d] matmul and the FFN's two GLU inputs into one
  [d, 2 d_ff] matmul on the way. With the G-cache (or a fixed G) decode never
  runs the metric learner or the power-law step, so their tensors are left out.
  With batch=1 on CPU the layers' kernels are stored output-major
  (`nn.output_major`): XLA:CPU's vector-matrix product reads them faster that
  way (a 110M step 4-16% faster at batch 1, 4-7% slower at batch 8:
  benchmarks/results/decode_layout_2026-11-27.md); the LM head stays
  input-major, faster at both. Idempotent for the same arguments.
  """
  if not (config.learned_g and not g_cache):
    params = params_lib.without_g_network(params)
  if not backend.choice("decode_unstacked_weights"):
    # TPU/GPU: slices of the stacked weights cost nothing in the step, so no
    # per-layer copy (docs/tpu.md, "Backend choices").
    return {**params, "layers": _fused(params["layers"])}
  params = params_lib.unstack_layers(params)
  major = batch == 1 and backend.choice("decode_output_major_b1")
  return {**params, "layers": [_fused(layer, major) for layer in params["layers"]]}


def _fused(layer: dict, output_major: bool = False) -> dict:
  """One layer's decode weights with q/k/v and the FFN's two GLU inputs fused
  (one matmul each instead of three and two; pldr_jax.nn.fuse_dense), kernels
  stored output-major or not (`nn.output_major`). Idempotent."""
  if "wqkv" not in layer:
    out = {k: v for k, v in layer.items() if k not in ("wq", "wk", "wv")}
    out["wqkv"] = nn.fuse_dense(layer["wq"], layer["wk"], layer["wv"])
    ffn = layer["ffn"]
    out["ffn"] = {"w12": nn.fuse_dense(ffn["w1"], ffn["w2"]), "w3": ffn["w3"]}
    layer = out
  major = lambda p: nn.output_major(p, output_major)
  return {**layer, "wqkv": major(layer["wqkv"]), "wo": major(layer["wo"]),
          "ffn": {k: major(v) for k, v in layer["ffn"].items()}}


def is_decode_params(params) -> bool:
  """Whether `params` are in the decode layout `decode_params` builds (fused q/k/v)."""
  layers = params.get("layers") if isinstance(params, dict) else None
  first = layers[0] if isinstance(layers, (list, tuple)) and layers else layers
  return isinstance(first, dict) and "wqkv" in first


@functools.partial(jax.jit, static_argnames=("config", "g_cache"),
                   donate_argnames=("cache",))
def _decode_step_jit(params, gcache, cache, tokens, *, config, g_cache=True):
  return decode_step(params, gcache, cache, tokens, config=config, g_cache=g_cache)


def decode_step_jit(params, gcache, cache, tokens, *, config, g_cache=True):
  """Jitted `decode_step`: the KVCache is donated; params and G-cache are not.

  params: `decode_params(params, config, g_cache)`, built once per generation:
  the parameters `init_params` / `pldr_jax.load` return are refused with an
  InputError, because a step on them re-lays every weight each time (a 110M
  hand loop ran at 7.9 tokens/s on them against 36 on the decode layout).
  """
  if not is_decode_params(params):
    raise InputError("decode_step_jit takes the decode layout: pass "
                     "decode.decode_params(params, config) (built once per generation), "
                     "not the parameters init_params / pldr_jax.load return")
  return _decode_step_jit(params, gcache, cache, tokens, config=config, g_cache=g_cache)


decode_step_jit.lower = _decode_step_jit.lower  # AOT: the same jitted function

"""KV-cache and G-cache decoding: prefill a prompt, then one token per step.

Two pytrees travel between steps:
  * the decode state (donated each step): per layer k (after rotary) and v in
    fixed head-major buffers [B, H, T, dk] of T = cache_len slots (the layout
    the step's two matrix products read without a transpose), the per-sequence
    `lengths` [B], and (causal metric without G-cache) the running raw sum of
    q q^T [B, H, dk, dk] that the metric input is built from;
  * the G-cache (constant, never donated): per layer the deductive tensors
    computed at prefill. With `g_cache=True` it holds A, A_LM and G_LM and
    decode reads G_LM from it; with `g_cache=False` it holds A only and every
    step recomputes A_LM, A_P, G_LM with the power-law step. In the reference
    (non-causal) mode the two give identical outputs. Fixed-G modes keep
    their constant G_LM there.

As in the reference KVG-cache implementation, the deductive outputs come from
the prompt: the metric learner runs once, at prefill. With `causal_metric` and
no G-cache, each step extends the running sum with the new query and reruns the
metric learner, which reproduces the causal-metric forward exactly.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pldr_jax import metric, model, plga, power_law
from pldr_jax.config import PLDRConfig


def _write_one(buf: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
  """buf: [B, H, T, dk]; new: [B, H, dk]; pos: int [B] -> buf with new at [b, :, pos_b].

  One scatter with explicit (batch, head, slot) indices: with the state donated
  XLA:CPU writes it in place, and the step's attention then reads the updated
  buffer without a copy (a vmapped dynamic_update_slice, or reading the old
  cache beside the write, makes it copy every layer's cache each step).
  A position outside the cache is dropped.
  """
  b, h = buf.shape[:2]
  bi = jnp.arange(b)[:, None]
  hi = jnp.arange(h)[None, :]
  return buf.at[bi, hi, pos[:, None]].set(new.astype(buf.dtype), mode="drop",
                                         unique_indices=True)


def _at_last(x: jax.Array, lengths: jax.Array) -> jax.Array:
  """x: [B, S, ...] -> x[b, lengths_b - 1]: [B, ...]."""
  return jax.vmap(lambda xb, n: xb[n - 1])(x, lengths)


def prefill(params: dict, tokens: jax.Array, lengths: jax.Array, *, config: PLDRConfig,
            cache_len: int | None = None, g_cache: bool = True, g_lm=None):
  """Run right-padded prompts and build the decode state and the G-cache.

  tokens: int [B, S]; lengths: int [B] (1 <= length <= S <= cache_len);
  g_lm: the constant G_LM of a fixed-G mode, [L, H, dk, dk] (or [L, B, ...]).
  Returns (logits [B, S, V], state, gcache); state['lengths'] = lengths.
  """
  cache_len = config.max_len if cache_len is None else cache_len
  model.check_inputs(tokens, lengths, config, capacity=cache_len)
  b, s = tokens.shape
  lengths = jnp.asarray(lengths, jnp.int32)
  logits, auxes = model.forward(params, tokens, lengths, config=config, g_lm=g_lm,
                                return_aux=True)
  cd = jnp.dtype(config.compute_dtype)
  zeros = jnp.zeros((b, config.num_heads, cache_len, config.head_dim), cd)
  layers, glayers = [], []
  for aux in auxes:
    # The prompt fills slots [0, S) of the head-major cache.
    layer = {name: zeros.at[:, :, :s].set(jnp.swapaxes(aux[name], 1, 2).astype(cd))
             for name in ("k", "v")}
    g = {}
    if "A" in aux:  # learned G
      pick = (lambda t: _at_last(t, lengths)) if config.causal_metric else (lambda t: t)
      if config.causal_metric and not g_cache:
        layer["gram"] = pick(aux["gram"])
      else:
        g["A"] = pick(aux["A"])
        if g_cache:
          g["A_LM"] = pick(aux["A_LM"])
          g["G_LM"] = pick(aux["G_LM"])
    elif "G_LM" in aux:  # a constant G
      g["G_LM"] = aux["G_LM"]
    layers.append(layer)
    glayers.append(g)
  state = {"lengths": lengths, "layers": layers}
  return logits, state, {"layers": glayers}


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
    return jnp.stack([g["G_LM"] for g in gcache["layers"]])
  _, ded = model.forward(params, prompt, lengths, config=config, return_deductive=True)
  pos = jnp.minimum(jnp.arange(tokens.shape[1] - 1)[None, :], lengths[:, None] - 1)
  take = jax.vmap(lambda g, i: g[i])  # [P, H, dk, dk], [S-1] -> [S-1, H, dk, dk]
  return jnp.stack([take(layer["G_LM"], pos) for layer in ded])


def _decode_g(layer_p: dict, layer_s: dict, layer_g: dict, q: jax.Array, config: PLDRConfig,
              g_cache: bool):
  """G_LM for one decode step of one layer, with the deductive tensors used.

  q: [B, 1, H, dk]. Returns (G_LM [B, H, dk, dk] or None, new layer_s, aux).
  """
  if "G_LM" in layer_g and (g_cache or not config.learned_g):
    return layer_g["G_LM"], layer_s, {"G_LM": layer_g["G_LM"]}
  if not config.learned_g:
    return None, layer_s, {}
  if config.causal_metric:
    valid = jnp.ones(q.shape[:2], bool)
    gram = layer_s["gram"] + metric.query_gram(q, valid, causal=False)
    layer_s = {**layer_s, "gram": gram}
    a_in = metric.metric_input(layer_p["ln_a"], gram, config.ln_eps)
    a = metric.metric_learner(layer_p["res_units"], a_in.astype(config.compute_dtype),
                              config.ln_eps)
  else:
    a = layer_g["A"]
  aux = {"A": a, **power_law.power_law_step(layer_p["plga"], a)}
  return aux["G_LM"], layer_s, aux


def decode_step(params: dict, gcache: dict, state: dict, tokens: jax.Array, *,
                config: PLDRConfig, g_cache: bool = True, return_deductive: bool = False):
  """Append one token per sequence and return its logits.

  tokens: int [B] written at position state['lengths']; every sequence must
  have room (lengths < cache_len): the Python-level `generate`/`stream` check it.
  Returns (logits [B, V], new state) and, with return_deductive, a per-layer
  list of the deductive tensors used (G_LM, and A/A_LM/A_P when recomputed).
  """
  pos = state["lengths"]
  x = model.embed(params, tokens[:, None], config)
  positions = pos[:, None]
  new_layers, deductive = [], []
  for layer_p, layer_s, layer_g in zip(params["layers"], state["layers"], gcache["layers"]):
    q, k, v = model.qkv(layer_p, x, positions, config)
    g, layer_s, aux = _decode_g(layer_p, layer_s, layer_g, q, config, g_cache)
    layer_s = {**layer_s, "k": _write_one(layer_s["k"], k[:, 0], pos),
               "v": _write_one(layer_s["v"], v[:, 0], pos)}
    t = layer_s["k"].shape[2]
    visible = jnp.arange(t, dtype=jnp.int32)[None, :] <= pos[:, None]  # [B, T]
    out = plga.cached_attention(q[:, 0], layer_s["k"], layer_s["v"], g, visible)[:, None]
    x = model.finish_layer(layer_p, x, out, config)
    new_layers.append(layer_s)
    deductive.append(aux)
  logits = model.lm_head(params, x[:, 0])
  new_state = {"lengths": pos + 1, "layers": new_layers}
  if return_deductive:
    return logits, new_state, deductive
  return logits, new_state


@functools.partial(jax.jit, static_argnames=("config", "cache_len", "g_cache"))
def prefill_jit(params, tokens, lengths, g_lm=None, *, config, cache_len=None, g_cache=True):
  """Jitted `prefill` (config, cache_len and g_cache static)."""
  return prefill(params, tokens, lengths, config=config, cache_len=cache_len,
                 g_cache=g_cache, g_lm=g_lm)


_G_NETWORK = ("ln_a", "res_units", "plga")


def decode_params(params: dict, config: PLDRConfig, g_cache: bool = True) -> dict:
  """The parameters a decode step reads.

  With the G-cache (or a fixed G) decode never runs the metric learner or the
  power-law step, so their tensors (ln_a, res_units, plga: ~600 arrays in the
  110M model) are left out: an executable's per-call cost grows with its
  number of arguments (measured: 22.1 -> 20.8 ms per 110M decode step).
  """
  if config.learned_g and not g_cache:
    return params
  return {**params, "layers": [{k: v for k, v in layer.items() if k not in _G_NETWORK}
                               for layer in params["layers"]]}


@functools.partial(jax.jit, static_argnames=("config", "g_cache"), donate_argnames=("state",))
def _decode_step_jitted(params, gcache, state, tokens, *, config, g_cache=True):
  return decode_step(params, gcache, state, tokens, config=config, g_cache=g_cache)


def decode_step_jit(params, gcache, state, tokens, *, config, g_cache=True):
  """Jitted `decode_step` on `decode_params(params)`: the state is donated;
  params and G-cache are not."""
  return _decode_step_jitted(decode_params(params, config, g_cache), gcache, state, tokens,
                             config=config, g_cache=g_cache)


def _lower_decode_step(params, gcache, state, tokens, *, config, g_cache=True):
  return _decode_step_jitted.lower(decode_params(params, config, g_cache), gcache, state,
                                   tokens, config=config, g_cache=g_cache)


decode_step_jit.lower = _lower_decode_step

"""The PLDR-LLM decoder: embedding, post-LN PLGA decoder layers, LM head.

    x0 = LN(Embed(tokens) * sqrt(d))
    h1 = LN(x + PLGA_attention(x));  h2 = LN(h1 + FFN(h1))
    logits = dense(h_L)            (no final LayerNorm)

`forward` returns the logits and, on request, every deductive output per layer.
Sequences are right-padded; `lengths` says how many tokens of each are real.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import errors
from pldr_jax import metric, nn, plga, power_law, rotary
from pldr_jax.config import PLDRConfig
from pldr_jax.g_modes import check_g
from pldr_jax.params import init_params  # re-exported: model.init_params

__all__ = ["forward", "init_params", "embed", "check_inputs", "InputError"]


InputError = errors.InputError  # the one error hierarchy: pldr_jax.errors


def _is_traced(*xs) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in xs)


def check_inputs(tokens, lengths, config: PLDRConfig, capacity: int | None = None) -> None:
  """Host-side checks of concrete inputs (skipped under tracing).

  tokens: int [B, S]; lengths: int [B]. Raises InputError for an empty prompt,
  a length outside [1, S], a sequence longer than the context (or `capacity`),
  or a token id outside [0, vocab_size).
  """
  if _is_traced(tokens, lengths):
    return
  tokens = np.asarray(tokens)
  if tokens.ndim != 2:
    raise InputError(f"tokens must be [batch, seq], got shape {tokens.shape}")
  if not np.issubdtype(tokens.dtype, np.integer):
    raise InputError(f"tokens must be integer ids, got dtype {tokens.dtype}")
  b, s = tokens.shape
  limit = config.max_len if capacity is None else capacity
  if s == 0:
    raise InputError("empty prompt: sequences must have at least one token")
  lengths = np.full((b,), s) if lengths is None else np.asarray(lengths)
  if lengths.shape != (b,):
    raise InputError(f"lengths must be [batch]={b}, got shape {lengths.shape}")
  if np.any(lengths < 1):
    raise InputError(f"empty prompt: sequence(s) {np.flatnonzero(lengths < 1).tolist()} "
                     "have length 0")
  if np.any(lengths > s):
    raise InputError(f"lengths {lengths.tolist()} exceed the token array's length {s}")
  if s > limit:
    raise InputError(f"sequence of {s} tokens is longer than the context length {limit}")
  real = np.arange(s)[None, :] < lengths[:, None]
  bad = real & ((tokens < 0) | (tokens >= config.vocab_size))
  if bad.any():
    i, j = np.argwhere(bad)[0]
    raise InputError(f"token id {int(tokens[i, j])} at sequence {i}, position {j} is outside "
                     f"the vocabulary [0, {config.vocab_size})")


def embed(params: dict, tokens: jax.Array, config: PLDRConfig) -> jax.Array:
  """tokens: int [B, S] -> x0 = LN(Embed(tokens) * sqrt(d)), [B, S, d] in compute dtype."""
  cd = jnp.dtype(config.compute_dtype)
  x = jnp.take(params["embed"], tokens, axis=0).astype(cd) * math.sqrt(config.d_model)
  return nn.layer_norm(params["ln_embed"], x, config.ln_eps)


def qkv(layer_p: dict, x: jax.Array, positions: jax.Array, config: PLDRConfig):
  """x: [B, S, d]; positions: int [B, S] -> q, k (after rotary), v: [B, S, H, dk]."""
  split = lambda t: t.reshape(*t.shape[:-1], config.num_heads, config.head_dim)
  rope = lambda t: rotary.apply_rotary(t, positions, config.rope_base,
                                       interleaved=config.rope_interleaved)
  q = rope(split(nn.dense(layer_p["wq"], x)))
  k = rope(split(nn.dense(layer_p["wk"], x)))
  return q, k, split(nn.dense(layer_p["wv"], x))


def finish_layer(layer_p: dict, x: jax.Array, attn: jax.Array, config: PLDRConfig) -> jax.Array:
  """Output projection and the two post-LN residual blocks.

  x: [B, S, d] layer input; attn: [B, S, H, dk] -> [B, S, d].
  """
  attn = nn.dense(layer_p["wo"], attn.reshape(*attn.shape[:-2], config.d_model))
  h1 = nn.layer_norm(layer_p["ln1"], x + attn, config.ln_eps)
  return nn.layer_norm(layer_p["ln2"], h1 + nn.glu(layer_p["ffn"], h1), config.ln_eps)


def lm_head(params: dict, x: jax.Array) -> jax.Array:
  """x: [..., d] -> logits [..., V] (compute dtype)."""
  return nn.dense(params["head"], x)


def deductive_g(layer_p: dict, q: jax.Array, valid: jax.Array, config: PLDRConfig) -> dict:
  """The learned G_LM of one layer from its queries, with every intermediate.

  q: [B, S, H, dk]; valid: bool [B, S]. Returns {'gram', 'A_in', 'A', 'A_LM',
  'A_P', 'G_LM'}, each [B, H, dk, dk] (causal metric: [B, S, H, dk, dk]).
  """
  gram, a_in, a = metric.deductive_a(
      layer_p, q, valid, causal=config.causal_metric, eps=config.ln_eps,
      compute_dtype=jnp.dtype(config.compute_dtype))
  return {"gram": gram, "A_in": a_in, "A": a, **power_law.power_law_step(layer_p["plga"], a)}


def _layer_g(g_lm: Any, i: int, batch: int) -> jax.Array | None:
  """Layer i's given G_LM broadcast to [B, H, dk, dk] (None stays None)."""
  if g_lm is None:
    return None
  g = g_lm[i]
  return jnp.broadcast_to(g, (batch, *g.shape[-3:])) if g.ndim == 3 else g


def resolve_g_lm(config: PLDRConfig, g_lm):
  """Check a given G_LM (or its absence) against config.g_mode."""
  if g_lm is None:
    if config.g_mode in ("random", "transferred"):
      raise ValueError(f"g_mode={config.g_mode!r} needs its constant G_LM: pass "
                       "g_lm=pldr_jax.g_modes.make_fixed_g(config, ...)")
    return None
  return check_g(config, g_lm)


def decoder_layer(layer_p: dict, x: jax.Array, positions: jax.Array, valid: jax.Array,
                  mask: jax.Array, config: PLDRConfig, g: jax.Array | None):
  """One decoder layer over a whole (right-padded) sequence.

  x: [B, S, d]; positions: int [B, S]; valid: bool [B, S]; mask: bool [B, S, S];
  g: a given G_LM [B, H, dk, dk] or None (learned: computed here; identity: I).
  Returns (x_out [B, S, d], aux) with aux holding k, v, the deductive
  tensors and the pre-mask 'logits' [B, H, S, S].
  """
  q, k, v = qkv(layer_p, x, positions, config)
  aux = {"k": k, "v": v}
  if g is None and config.learned_g:
    aux.update(deductive_g(layer_p, q, valid, config))
    g = aux["G_LM"]
  elif g is not None:
    aux["G_LM"] = g
  out, aux["logits"] = plga.plga_attention(q, k, v, g, mask)
  return finish_layer(layer_p, x, out, config), aux


DEDUCTIVE_KEYS = ("A_in", "A", "A_LM", "A_P", "G_LM", "logits")


def forward(params: dict, tokens: jax.Array, lengths: jax.Array | None = None, *,
            config: PLDRConfig, g_lm=None, return_deductive: bool = False,
            return_aux: bool = False):
  """The full forward pass.

  tokens: int [B, S] right-padded; lengths: int [B] (None: all S real);
  g_lm: optional G_LM [L, H, dk, dk], [L, B, H, dk, dk] or [L, B, S, H, dk, dk] used instead of the
  computed one (required for g_mode 'random'/'transferred').
  Returns (logits [B, S, V], deductive): deductive is None unless
  return_deductive, else one dict per layer with 'A_in', 'A', 'A_LM', 'A_P',
  'G_LM' ([B, H, dk, dk]; causal metric [B, S, H, dk, dk]), the parameters
  'P', 'a', 'b_a' [H, dk, dk] and the pre-mask 'logits' [B, H, S, S].
  return_aux=True returns the raw per-layer aux (k, v, gram, ...) instead.
  """
  check_inputs(tokens, lengths, config)
  g_lm = resolve_g_lm(config, g_lm)
  b, s = tokens.shape
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  valid = positions < lengths[:, None]
  mask = plga.causal_mask(positions, positions, lengths)
  x = embed(params, tokens, config)
  auxes = []
  for i, layer_p in enumerate(params["layers"]):
    x, aux = decoder_layer(layer_p, x, positions, valid, mask, config, _layer_g(g_lm, i, b))
    auxes.append(aux)
  logits = lm_head(params, x)
  if return_aux:
    return logits, auxes
  if not return_deductive:
    return logits, None
  deductive = []
  for layer_p, aux in zip(params["layers"], auxes):
    d = {key: aux[key] for key in DEDUCTIVE_KEYS if key in aux}
    if "plga" in layer_p:
      d.update({key: layer_p["plga"][key] for key in ("P", "a", "b_a")})
    deductive.append(d)
  return logits, deductive

"""The PLDR-LLM decoder: embedding, post-LN PLGA decoder layers, LM head.

    x0 = LN(Embed(tokens) * sqrt(d))
    h1 = LN(x + PLGA_attention(x));  h2 = LN(h1 + FFN(h1))
    logits = dense(h_L)            (no final LayerNorm)

`forward` returns the logits and, on request, every deductive output per layer.
Sequences are right-padded; `lengths` says how many tokens of each are real.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import metric, nn, plga, power_law, rotary
from pldr_jax import params as params_lib
from pldr_jax.config import PLDRConfig
from pldr_jax.g_modes import check_g
from pldr_jax.errors import InputError

__all__ = ["forward", "decoder", "scan_layers", "embed", "check_inputs"]


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
  """x: [B, S, d]; positions: int [B, S] -> q, k (after rotary), v: [B, S, H, dk].

  layer_p holds wq, wk, wv, or their fused 'wqkv' (nn.fuse_dense: one matmul).
  """
  split = lambda t: t.reshape(*t.shape[:-1], config.num_heads, config.head_dim)
  rope = lambda t: rotary.apply_rotary(t, positions, config.rope_base,
                                       interleaved=config.rope_interleaved)
  if "wqkv" in layer_p:
    q, k, v = jnp.split(nn.dense(layer_p["wqkv"], x), 3, axis=-1)
  else:
    q, k, v = (nn.dense(layer_p[name], x) for name in ("wq", "wk", "wv"))
  return rope(split(q)), rope(split(k)), split(v)


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


def resolve_g_lm(config: PLDRConfig, g_lm):
  """Check a given G_LM (or its absence) against config.g_mode."""
  if g_lm is None:
    if config.g_mode in ("random", "transferred"):
      raise ValueError(f"g_mode={config.g_mode!r} needs its constant G_LM: pass "
                       "g_lm=pldr_jax.g_modes.make_fixed_g(config, ...)")
    return None
  return check_g(config, g_lm)


def given_g(g_lm, batch: int):
  """A checked given G_LM as per-layer xs for `decoder`: [L, B, H, dk, dk]
  ([L, B, S, H, dk, dk] stays), or None."""
  if g_lm is None:
    return None
  if g_lm.ndim == 4:  # [L, H, dk, dk]: one G for every sequence
    return jnp.broadcast_to(g_lm[:, None], (g_lm.shape[0], batch, *g_lm.shape[1:]))
  return g_lm


def sequence_g(layer_p: dict, q: jax.Array, valid: jax.Array, g: jax.Array | None,
               config: PLDRConfig) -> tuple[jax.Array | None, dict]:
  """G_LM of one layer over a whole sequence, and the deductive tensors.

  q: [B, S, H, dk]; valid: bool [B, S]; g: a given G_LM [B, H, dk, dk] (or
  [B, S, H, dk, dk]) or None. Learned G with nothing given: computed from q
  (`deductive_g`); given: that one ({'G_LM': g}); identity: (None, {}).
  """
  if g is None and config.learned_g:
    ded = deductive_g(layer_p, q, valid, config)
    return ded["G_LM"], ded
  if g is not None:
    return g, {"G_LM": g}
  return None, {}


def scan_layers(body: Callable, carry, layers, xs=None, *, unroll: bool = False):
  """Run body(carry, (i, layer_params, layer_xs)) -> (carry, ys) over the stacked layers.

  layers: the stacked layer parameters ([L, ...] leaves); xs: a pytree of
  per-layer inputs with a leading [L] axis, or a list of L per-layer inputs
  (e.g. LESS kernels, some None), which forces the unrolled loop. i is the
  layer index (traced under the scan, a Python int unrolled). unroll=False is
  one `lax.scan` (the layer traced and compiled once); unroll=True a Python
  loop over static layer slices. Returns (carry, ys stacked on a leading [L];
  a list of L with per-layer xs).
  """
  listed = isinstance(layers, (list, tuple))  # per-layer trees (params_lib.unstack_layers)
  n = len(layers) if listed else params_lib.num_stacked(layers)
  per_layer = isinstance(xs, list)
  if per_layer and len(xs) != n:
    raise ValueError(f"{len(xs)} per-layer inputs for {n} layers")
  if not (unroll or per_layer or listed):
    return jax.lax.scan(body, carry, (jnp.arange(n, dtype=jnp.int32), layers, xs))
  ys = []
  for i in range(n):
    layer_xs = xs[i] if per_layer else params_lib.layer_slice(xs, i)
    layer_p = layers[i] if listed else params_lib.layer_slice(layers, i)
    carry, y = body(carry, (i, layer_p, layer_xs))
    ys.append(y)
  return carry, (ys if per_layer else params_lib.stack_trees(ys))


Attend = Callable[..., tuple[jax.Array, Any, Any]]


_REMAT = {"minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
          "full": jax.checkpoint_policies.nothing_saveable}


def decoder(params: dict, tokens: jax.Array, positions: jax.Array, attend: Attend, xs=None,
            state=None, *, config: PLDRConfig, unroll: bool = False, remat: str = "none",
            logits_at_last: jax.Array | None = None, head: bool = True):
  """The one decoder core: embedding, L post-LN PLGA layers, LM head.

  tokens, positions: int [B, S] (decode: S = 1).
  attend(i, layer_p, layer_xs, state, q, k, v) -> (out [B, S, H, dk], state, ys)
  is layer i's attention (q, k after rotary, [B, S, H, dk]), which reads and
  writes whatever cache it uses: full causal attention (training, prefill),
  the KV- and G-cache (decode), a sparse or LESS cache. It gets layer i's
  slice of `xs` (per-layer inputs: an [L]-leading pytree, or a list of L
  entries) and the whole `state`, carried from layer to layer (a stacked cache
  it updates in place at layer i).
  remat: a `PLDRConfig.remat` policy, applied to each layer (`jax.checkpoint`);
  whole-sequence passes (`forward`) pass config.remat, decode leaves "none".
  logits_at_last: None, or int [B] sequence lengths: the LM head then runs at
  each sequence's last position only (all a prefill for generation needs)
  and the logits are [B, V].
  head: False returns the last layer's output [B, S, d] in place of the logits
  (the caller applies `lm_head`, e.g. in chunks).
  Returns (logits [B, S, V], state, ys stacked [L, ...]).
  """
  chex.assert_rank([tokens, positions], 2)
  chex.assert_equal_shape([tokens, positions])
  x = embed(params, tokens, config)

  def layer_fn(carry, i, layer_p, layer_xs):
    x, state = carry
    q, k, v = qkv(layer_p, x, positions, config)
    out, state, ys = attend(i, layer_p, layer_xs, state, q, k, v)
    return (finish_layer(layer_p, x, out, config), state), ys

  def body(carry, layer):
    i, layer_p, layer_xs = layer
    if remat == "none":
      return layer_fn(carry, i, layer_p, layer_xs)
    # i stays a closed-over constant (a Python int when unrolled); inside one
    # lax.scan, CSE across iterations is already impossible (prevent_cse=False).
    scanned = isinstance(i, jax.Array)
    f = jax.checkpoint(lambda c, p, lx: layer_fn(c, i, p, lx), policy=_REMAT[remat],
                       prevent_cse=not scanned)
    return f(carry, layer_p, layer_xs)

  (x, state), ys = scan_layers(body, (x, state), params["layers"], xs, unroll=unroll)
  if logits_at_last is not None:
    x = at_last(x, logits_at_last)
  return (lm_head(params, x) if head else x), state, ys


def at_last(x: jax.Array, lengths: jax.Array, batch_axis: int = 0) -> jax.Array:
  """Each sequence's last real position: x [..., B, S, ...] (B at `batch_axis`,
  S right after it), lengths [B] -> x[..., b, lengths_b - 1, ...]: [..., B, ...]."""
  lead = (slice(None),) * batch_axis
  return x[lead + (jnp.arange(x.shape[batch_axis]), lengths - 1)]


def sequence_inputs(tokens, lengths):
  """(lengths int32 [B], positions [B, S], valid [B, S], causal mask [B, S, S])."""
  b, s = tokens.shape
  lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  return lengths, positions, positions < lengths[:, None], plga.causal_mask(
      positions, positions, lengths)


DEDUCTIVE_KEYS = ("A_in", "A", "A_LM", "A_P", "G_LM", "logits")


def forward(params: dict, tokens: jax.Array, lengths: jax.Array | None = None, *,
            config: PLDRConfig, g_lm=None, return_deductive: bool = False,
            return_aux: bool = False, unroll: bool | None = None,
            logits_at_last: jax.Array | None = None, head: bool = True):
  """The full forward pass (training, scoring, prefill).

  tokens: int [B, S] right-padded; lengths: int [B] (None: all S real);
  g_lm: optional G_LM [L, H, dk, dk], [L, B, H, dk, dk] or [L, B, S, H, dk, dk] used instead of the
  computed one (required for g_mode 'random'/'transferred').
  Returns (logits [B, S, V], deductive): deductive is None unless
  return_deductive, else one dict per layer with 'A_in', 'A', 'A_LM', 'A_P',
  'G_LM' ([B, H, dk, dk]; causal metric [B, S, H, dk, dk]), the parameters
  'P', 'a', 'b_a' [H, dk, dk] and the pre-mask 'logits' [B, H, S, S].
  return_aux=True returns the per-layer aux stacked on [L] instead: k, v
  [L, B, S, H, dk], the deductive tensors and 'gram' (learned G).
  unroll: None follows config.scan_layers.
  logits_at_last: see `decoder` (logits [B, V] at positions logits_at_last - 1).
  head: False returns the last layer's output [B, S, d] in place of the logits.
  """
  check_inputs(tokens, lengths, config)
  g_lm = resolve_g_lm(config, g_lm)
  lengths, positions, valid, mask = sequence_inputs(tokens, lengths)

  fused = config.attention != "plain" and not return_deductive  # the scores are returned

  def attend(i, layer_p, g, state, q, k, v):
    g, ded = sequence_g(layer_p, q, valid, g, config)
    if fused:
      out, logits = plga.fused_attention(q, k, v, g, lengths, config.attention), None
    else:
      out, logits = plga.plga_attention(q, k, v, g, mask)
    if return_aux:
      return out, state, {"k": k, "v": v, **ded}
    if return_deductive:
      return out, state, {**{key: ded[key] for key in DEDUCTIVE_KEYS if key in ded},
                          "logits": logits}
    return out, state, None

  logits, _, ys = decoder(params, tokens, positions, attend, given_g(g_lm, tokens.shape[0]),
                       config=config, remat=config.remat,
                       unroll=(not config.scan_layers) if unroll is None else unroll,
                       logits_at_last=logits_at_last, head=head)
  if return_aux:
    return logits, ys
  if not return_deductive:
    return logits, None
  deductive = []
  for i in range(config.num_layers):
    d = params_lib.layer_slice(ys, i)
    if "plga" in params["layers"]:
      d.update({key: params["layers"]["plga"][key][i] for key in ("P", "a", "b_a")})
    deductive.append(d)
  return logits, deductive

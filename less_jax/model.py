"""LESS and the sparse KV-cache policies on any pldr_jax model.

Works for every `PLDRConfig.g_mode`: "identity" (plain SDPA), "learned" (PLGA
with the G-cache) and the fixed-G ablations ("random", "transferred"). The
PLGA score is (q G_LM) k^T / sqrt(dk), so the LESS core (less_jax.cache /
less_jax.parallel) is simply given the effective query

    q_eff = q @ G_LM          (pldr_jax.plga.apply_g; G_LM = I for identity)

with q, k taken after the rotary embedding. Nothing else of the model changes:
embedding, output projection, post-LN blocks and LM head are pldr_jax's own.

Entry points

  less_prefill(params, tokens, lengths, *, config, policy, kernels, g_lm, max_len)
      -> (logits [B, S, V], state, gcache)
  less_decode_step(params, gcache, state, tokens, *, config, policy, kernels)
      -> (logits [B, V], state)
  less_forward(params, tokens, lengths, *, config, policy, kernels, g_lm)
      -> logits [B, S, V]           (parallel form: perplexity scoring)
  collect_layer_io(params, tokens, lengths, *, config, g_lm)
      -> per layer {q_eff, k, v, out, wo}   (kernel training data)
  decode_state_bytes(state) -> int

plus jitted wrappers `less_prefill_jit`, `less_decode_step_jit` (state
donated), `less_forward_jit`, `collect_layer_io_jit` (config, policy static).

Decode state (donated each step; its size depends on the policy budget T and
the kernel rank R only, never on the sequence length or the context):

    SparseState(lengths int32 [B],
                layers=(SparseKVCache(k, v [B, H, T, dk], pos, score [B, H, T],
                                      h [B, H, R, dk], z [B, H, R]) per layer))

G-cache (constant, never donated), exactly what pldr_jax.inference.decode.prefill builds
with g_cache=True: a pldr_jax.inference.kv_cache.GCache with g_lm [L, B, H, dk, dk]
(learned), g_lm only (a given/fixed G) or empty (identity). Decode reads only
g_lm from it, so decode costs the sparse attention over T slots, one q @ G_LM
per head and the low-rank part.

Where G_LM comes from
  * Prefill computes G_LM from the prompt as pldr_jax does
    (pldr_jax.model.deductive_g: the metric input A sums q q^T over the prompt;
    with config.causal_metric, per prompt position). The prompt's logits use
    that G_LM; decode holds the prompt's G_LM fixed (G-cache). With the causal
    metric the G-cache holds the G_LM at the last prompt token, as pldr_jax.
  * less_forward (scoring) uses the same G_LM that pldr_jax.model.forward
    uses for the same tokens: in the reference (non-causal) mode A sums over
    the WHOLE scored sequence (so position t sees a dk x dk summary of later
    queries, like the full model's own perplexity); with config.causal_metric
    it is the causal G_LM of each position. Pass `g_lm` to hold a G fixed
    instead, e.g. the G-cache of a prompt: then less_forward over
    prompt + continuation equals less_prefill + less_decode_step position by
    position.

Kernels: None (plain sparse attention, rank 0) or a list with one entry per
layer, each a less_jax.KernelParams (LESS on that layer) or None (sparse only
on that layer). The decode state's per-layer rank must match the kernels
given at decode (a clear ValueError otherwise).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from less_jax import cache as cache_lib
from less_jax import kernels as kernels_lib
from less_jax import parallel as parallel_lib
from less_jax import policies as policies_lib
from less_jax.errors import KernelError, SparseStateError
from pldr_jax.errors import ConfigError, InputError
from pldr_jax.inference import decode as pdecode
from pldr_jax import model as pmodel
from pldr_jax import params as params_lib
from pldr_jax import plga
from pldr_jax.config import PLDRConfig
from pldr_jax.inference.kv_cache import GCache
from less_jax.cache import SparseState

__all__ = [
    "less_prefill",
    "less_decode_step",
    "less_forward",
    "collect_layer_io",
    "decode_state_bytes",
    "check_kernels_list",
    "less_prefill_jit",
    "less_decode_step_jit",
    "less_forward_jit",
    "collect_layer_io_jit",
]


# ----------------------------------------------------------------------------
# Validation helpers.

def _check_config(config) -> None:
  if not isinstance(config, PLDRConfig):
    raise ConfigError(f"config must be a pldr_jax PLDRConfig, got {type(config)}")


def _check_policy(policy, context: int) -> None:
  if not isinstance(policy, policies_lib.Policy):
    raise policies_lib.PolicyError(
        f"policy must be a less_jax Policy (h2o, lambda_mask, sliding_window), got {policy!r}")
  policy.check_context(context)


def check_kernels_list(kernels, config: PLDRConfig) -> list:
  """Normalises `kernels` to a list of num_layers entries (KernelParams or None).

  Raises ValueError if it is not None / a sequence of one entry per layer, or
  if a layer's kernels do not fit the model's heads (head width dk, H or 1
  heads, consistent rank); the message names the layer.
  """
  n = config.num_layers
  if kernels is None:
    return [None] * n
  if isinstance(kernels, kernels_lib.KernelParams):
    raise KernelError(
        "kernels must be a list with one KernelParams (or None) per layer, got a single "
        f"KernelParams; pass [kernels] * {n} to use it on every layer")
  if not isinstance(kernels, Sequence) or isinstance(kernels, (str, bytes)):
    raise KernelError(f"kernels must be None or a list of {n} KernelParams/None, got "
                     f"{type(kernels)}")
  kernels = list(kernels)
  if len(kernels) != n:
    raise KernelError(f"kernels has {len(kernels)} entries but the model has {n} layers")
  for i, kern in enumerate(kernels):
    try:
      kernels_lib.check_kernels(kern, config.num_heads, config.head_dim)
    except ValueError as e:
      raise KernelError(f"layer {i}: {e} (model: {config.num_heads} heads of width "
                       f"{config.head_dim})") from e
  return kernels


# ----------------------------------------------------------------------------
# The decoder with a sparse / LESS attention.

def _run(params: dict, tokens, lengths, config: PLDRConfig, g_lm, capacity: int,
         attend: Callable, kernels: list, all_logits: bool = True):
  """pldr_jax.model.decoder over whole sequences with attend(i, layer_p, q, q_eff,
  k, v, ded, kern, lengths, positions) -> (out [B, S, H, dk], record) as each
  layer's attention; G_LM per layer as pldr_jax computes it (or `g_lm`).

  Layers run unrolled: each may have its own kernels (rank, heads) or none.
  Returns (logits [B, S, V] (all_logits=False: [B, V] at each sequence's last
  token), records (one per layer), lengths int32 [B]).
  """
  _check_config(config)
  pmodel.check_inputs(tokens, lengths, config, capacity=capacity)
  g_lm = pmodel.resolve_g_lm(config, g_lm)
  lengths, positions, valid, _ = pmodel.sequence_inputs(tokens, lengths)
  given = pmodel.given_g(g_lm, tokens.shape[0])
  xs = [(None if given is None else given[i], kernels[i]) for i in range(config.num_layers)]

  def layer_attend(i, layer_p, layer_xs, state, q, k, v):
    g, kern = layer_xs
    g, ded = pmodel.sequence_g(layer_p, q, valid, g, config)
    out, rec = attend(i, layer_p, q, plga.apply_g(q, g), k, v, ded, kern, lengths, positions)
    return out, state, rec

  logits, _, records = pmodel.decoder(params, tokens, positions, layer_attend, xs,
                                      config=config,
                                      logits_at_last=None if all_logits else lengths)
  return logits, records, lengths


# ----------------------------------------------------------------------------
# Public API.

def less_forward(params: dict, tokens, lengths=None, *, config: PLDRConfig,
                 policy: policies_lib.Policy, kernels=None, g_lm=None):
  """Parallel (scoring / training) form: every layer's attention is sparse/LESS.

  Each layer's attention is less_jax.less_attention_parallel(q_eff, k, v) with
  the causal kept-set mask of `policy` (H2O: the greedy causal mask, built
  from q_eff k^T scores) and, where kernels are given, the LESS low-rank part.
  Position t's logits are what step-by-step sparse/LESS decoding gives at t.

  G_LM: the same one pldr_jax.model.forward computes for these tokens (in the
  reference non-causal mode, A summed over the whole sequence; see the module
  docstring), or `g_lm` if given ([L, H, dk, dk] or [L, B, H, dk, dk]; required
  for g_mode 'random'/'transferred').

  tokens: int [B, S] right-padded; lengths: int [B] (None: all S real).
  Returns logits [B, S, V] (padding positions: whatever the model makes of
  zero attention there; ignore them).
  """
  _check_config(config)
  _check_policy(policy, config.max_len)
  kernels = check_kernels_list(kernels, config)

  def attend(i, layer_p, q, q_eff, k, v, ded, kern, lengths, positions):
    return parallel_lib.less_attention_parallel(q_eff, k, v, lengths, policy, kern), None

  logits, _, _ = _run(params, tokens, lengths, config, g_lm, config.max_len, attend, kernels)
  return logits


def less_prefill(params: dict, tokens, lengths=None, *, config: PLDRConfig,
                 policy: policies_lib.Policy, kernels=None, g_lm=None,
                 max_len: int | None = None, mode: str = "one_shot",
                 all_logits: bool = True):
  """Runs right-padded prompts and builds the sparse/LESS decode state.

  mode 'one_shot' (default, as the H2O / LESS authors' generation code): the
  prompt runs with full attention (its logits are pldr_jax.model.forward's),
  then each layer's cache is evicted once to the budget by the prompt's
  accumulated attention, evicted pairs folded into the LESS state.
  mode 'greedy': the prompt's attention is the parallel sparse form, so its
  logits are what the policy gives token by token (equal to `less_forward` on
  the prompt). See less_jax.cache.sparse_prefill. G_LM is computed from the
  prompt as pldr_jax does (or `g_lm` is used) and goes to the G-cache; decode
  holds it fixed.

  Args:
    tokens: int [B, S]; lengths: int [B], 1 <= lengths <= S (None: all S).
    policy: sparse policy (static under jit); each layer's cache has
      policy.budget slots per head, whatever max_len is.
    kernels: None or a list per layer of KernelParams / None.
    g_lm: a given G_LM [L, H, dk, dk] or [L, B, H, dk, dk] (required for
      g_mode 'random'/'transferred').
    max_len: the context length the sequences may reach (default
      config.max_len): prompts must fit in it and the policy budget must not
      exceed it. It does not size anything.
    all_logits: False runs the LM head at each prompt's last token only
      (pldr_jax.inference.decode.prefill's option): logits [B, V].

  Returns:
    (logits [B, S, V], state, gcache); state = SparseState(lengths int32 [B],
    layers: one SparseKVCache per layer), gcache = a GCache as pldr_jax's
    G-cache (see the module docstring).
  """
  _check_config(config)
  context = config.max_len if max_len is None else max_len
  _check_policy(policy, context)
  kernels = check_kernels_list(kernels, config)
  cd = jnp.dtype(config.compute_dtype)

  def attend(i, layer_p, q, q_eff, k, v, ded, kern, lengths, positions):
    out, cache = cache_lib.sparse_prefill(q_eff, k, v, lengths, policy, kern, dtype=cd,
                                          mode=mode)
    return out, (cache, {key: ded[key] for key in ("A", "A_LM", "G_LM") if key in ded})

  logits, records, lengths = _run(params, tokens, lengths, config, g_lm, context, attend,
                                  kernels, all_logits)
  ded = params_lib.stack_trees([r[1] for r in records])
  gcache = pdecode.prompt_gcache(ded, lengths, config)
  return logits, SparseState(lengths=lengths, layers=tuple(r[0] for r in records)), gcache


def _check_state(state, config: PLDRConfig, batch: int):
  if not isinstance(state, SparseState):
    raise SparseStateError(f"state must be the SparseState returned by less_prefill, got "
                     f"{type(state).__name__}")
  if len(state.layers) != config.num_layers:
    raise SparseStateError(f"state has {len(state.layers)} layers, the model has "
                     f"{config.num_layers}")
  if tuple(state.lengths.shape) != (batch,):
    raise SparseStateError(f"tokens are [B] = [{batch}] but the state holds "
                     f"{tuple(state.lengths.shape)} sequences")


def less_decode_step(params: dict, gcache: GCache, state: SparseState, tokens, *,
                     config: PLDRConfig, policy: policies_lib.Policy, kernels=None,
                     active=None):
  """Appends one token per sequence and returns its logits.

  Per layer: q, k, v of the new token (rotary at position state.lengths),
  q_eff = q @ G_LM (G_LM from the G-cache; identity: q), sparse/LESS attention
  over the layer's fixed-size cache (less_jax.sparse_decode_step: attend,
  update H2O scores, evict + fold into H, z), output projection and post-LN
  blocks; then the LM head.

  tokens: int [B]. active: optional bool [B]; where False the sequence's cache
  and length are left unchanged (its logits are still computed), for batches
  whose sequences finish at different steps. Positions are not checked against
  the context length (nothing grows; the caller bounds generation).
  Jittable with config and policy static (see less_decode_step_jit).
  Returns (logits [B, V], new state).
  """
  _check_config(config)
  _check_policy(policy, None)
  kernels = check_kernels_list(kernels, config)
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 1:
    raise InputError(f"tokens must be [B] (one token per sequence), got shape {tokens.shape}")
  b = tokens.shape[0]
  _check_state(state, config, b)
  if not isinstance(gcache, GCache):
    raise SparseStateError("gcache must be the GCache returned by less_prefill")
  if gcache.g_lm is None and config.g_mode != "identity":
    raise SparseStateError("the G-cache has no G_LM: build it with less_prefill")
  pos = state.lengths
  if active is None:
    active = jnp.ones((b,), bool)
  else:
    active = jnp.asarray(active).astype(bool)
    if active.shape != (b,):
      raise InputError(f"active must be bool [B] = [{b}], got shape {active.shape}")
  xs = [(state.layers[i], None if gcache.g_lm is None else gcache.g_lm[i], kernels[i])
        for i in range(config.num_layers)]

  def attend(i, layer_p, layer_xs, _, q, k, v):
    cache, g, kern = layer_xs
    q_eff = plga.apply_g(q, g)
    try:
      out, cache = cache_lib.sparse_decode_step(
          cache, q_eff[:, 0], k[:, 0], v[:, 0], pos, policy, kern, active=active)
    except ValueError as e:
      raise type(e)(f"layer {i}: {e}") from e
    return out[:, None], None, cache

  logits, _, caches = pmodel.decoder(params, tokens[:, None], pos[:, None], attend, xs,
                                     config=config)
  new_state = SparseState(lengths=pos + active.astype(pos.dtype), layers=tuple(caches))
  return logits[:, 0], new_state


def collect_layer_io(params: dict, tokens, lengths=None, *, config: PLDRConfig,
                     g_lm=None) -> list[dict]:
  """The frozen model's per-layer attention inputs and true outputs (kernel training).

  Runs the full model (dense causal PLGA, exactly pldr_jax.model.forward) and
  returns, per layer, a dict with
    'q_eff': q @ G_LM [B, S, H, dk] (q after rotary; identity: q),
    'k', 'v': [B, S, H, dk] (k after rotary),
    'out':   the true attention output softmax(q_eff k^T / sqrt(dk)) V,
             [B, S, H, dk], before the output projection,
    'wo':    the layer's output projection params {'kernel', 'bias'}.
  Padding positions (>= lengths) hold zeros in 'out'. G_LM as in
  `less_forward` (the full forward's, or `g_lm`).
  """
  def attend(i, layer_p, q, q_eff, k, v, ded, kern, lengths, positions):
    mask = plga.causal_mask(positions, positions, lengths)
    out, _ = plga.plga_attention(q_eff, k, v, None, mask)
    real = positions < lengths[:, None]
    rec = {"q_eff": q_eff, "k": k, "v": v,
           "out": jnp.where(real[:, :, None, None], out, jnp.zeros((), out.dtype)),
           "wo": layer_p["wo"]}
    return out, rec

  _, records, _ = _run(params, tokens, lengths, config, g_lm, config.max_len, attend,
                       [None] * config.num_layers)
  return records


def decode_state_bytes(state: Any) -> int:
  """Bytes held by a decode state (any pytree of arrays: every leaf counted).

  For less_prefill's state: L * (2 B H T dk * itemsize + 8 B H T
  + 4 B H R (dk + 1)) + 4 B, independent of the sequence length. The
  G-cache is not part of it (constant, [B, H, dk, dk] per layer).
  """
  return cache_lib.cache_bytes(state)


# ----------------------------------------------------------------------------
# Jitted wrappers.

@functools.partial(jax.jit, static_argnames=("config", "policy", "max_len", "mode",
                                             "all_logits"))
def less_prefill_jit(params, tokens, lengths, kernels=None, g_lm=None, *, config, policy,
                     max_len=None, mode="one_shot", all_logits=True):
  """Jitted `less_prefill` (config, policy, max_len, mode, all_logits static)."""
  return less_prefill(params, tokens, lengths, config=config, policy=policy,
                      kernels=kernels, g_lm=g_lm, max_len=max_len, mode=mode,
                      all_logits=all_logits)


@functools.partial(jax.jit, static_argnames=("config", "policy"), donate_argnames=("state",))
def less_decode_step_jit(params, gcache, state, tokens, kernels=None, active=None, *, config,
                         policy):
  """Jitted `less_decode_step`: the state is donated; params, G-cache, kernels are not
  (the metric learner and power-law tensors are unused, so jit leaves them out)."""
  return less_decode_step(params, gcache, state, tokens, config=config, policy=policy,
                          kernels=kernels, active=active)


@functools.partial(jax.jit, static_argnames=("config", "policy"))
def less_forward_jit(params, tokens, lengths=None, kernels=None, g_lm=None, *, config,
                     policy):
  """Jitted `less_forward` (config, policy static)."""
  return less_forward(params, tokens, lengths, config=config, policy=policy,
                      kernels=kernels, g_lm=g_lm)


@functools.partial(jax.jit, static_argnames=("config",))
def collect_layer_io_jit(params, tokens, lengths=None, g_lm=None, *, config):
  """Jitted `collect_layer_io` (config static)."""
  return collect_layer_io(params, tokens, lengths, config=config, g_lm=g_lm)

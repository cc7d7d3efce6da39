"""Fixed-size sparse KV cache with eviction, plus the LESS state: decode step.

One cache per layer, a pytree of static shape that never grows:

    SparseKVCache(
      k     [B, H, T, D]  cache dtype   keys in slots (after rotary)
      v     [B, H, T, D]  cache dtype   values in slots
      pos   [B, H, T]     int32         token position held by each slot, -1 empty
      score [B, H, T]     float32       accumulated H2O score of each slot
      h     [B, H, R, D]  float32       LESS state H (R = 0 without kernels)
      z     [B, H, R]     float32       LESS state z
    )

T = policy.budget. Slots are per head (H2O keeps a different set per head);
Λ-masking and the sliding window keep the same positions in every head. The
slot order is arbitrary (a token takes the slot of the token it replaces);
only `pos` says which token a slot holds.

Decode (`sparse_decode_step`), per sequence b and head h, for the new token at
position lengths[b]:
  1. attend to the valid slots + the new token itself (fp32 softmax), plus the
     low-rank part phi(q) H, phi(q) z when kernels are given;
  2. add this softmax to the slots' scores (the new token's score starts at its
     own attention weight);
  3. write the new token into the first empty slot, or, if the cache is full,
     into the slot of the policy's victim, whose (k, v) is folded into (H, z)
     exactly once (H += psi(k)^T v, z += psi(k)) before being overwritten.

`sparse_prefill` builds the cache from a prompt, in one of two ways:

  one_shot (default; what the H2O and LESS authors' generation code does, and
      what kvpress users expect): the prompt runs with full causal attention,
      then the cache is evicted once down to the budget. H2O's scores are the
      attention each prompt key received from every prompt query under that
      dense softmax; the policy then chooses the kept set exactly as it would
      evict (the `recent` newest prompt tokens stay; H2O keeps the highest
      scores among the rest, Λ-masking the sink tokens). With kernels, every
      evicted pair is folded into (H, z). The prompt's own outputs are those of
      the full model.
  greedy: the same metadata transition as decoding, token by token, in a
      lax.scan (`less_jax.parallel.policy_scan`), with the parallel form for the
      outputs: equal to feeding the prompt through `sparse_decode_step` (so the
      prompt's own outputs already see a sparse cache once it exceeds the budget).

H2O's scores during decode accumulate the softmax over the kept set (as the
authors' decode code); their training-time mask uses the dense softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from less_jax import kernels as kernels_lib
from less_jax import parallel as parallel_lib
from less_jax import policies as policies_lib
from less_jax import state as state_lib
from less_jax.errors import PolicyError, SparseStateError
from pldr_jax import backend, nn
from pldr_jax import params as params_lib
from pldr_jax.config import check_int
from pldr_jax.errors import ConfigError, InputError
from pldr_jax.sharding import ArrayInfo

__all__ = [
    "SparseKVCache",
    "SparseState",
    "init_cache",
    "check_cache",
    "sparse_decode_step",
    "sparse_prefill",
    "cache_bytes",
    "PREFILL_MODES",
]

PREFILL_MODES = ("one_shot", "greedy")
_EVICTED = np.iinfo(np.int32).max  # position marking a token out of the candidate set


@struct.dataclass
class SparseKVCache:
  """Per-layer decode state (see the module docstring for shapes)."""

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  score: jax.Array
  h: jax.Array
  z: jax.Array

  @property
  def budget(self) -> int:
    return int(self.k.shape[2])

  @property
  def rank(self) -> int:
    return int(self.h.shape[2])

  @classmethod
  def abstract(cls, batch: int, num_heads: int, head_dim: int, budget: int, rank: int = 0,
               dtype=jnp.float32) -> "SparseKVCache":
    """Shapes, dtypes and logical axes of each field (pldr_jax.sharding.ArrayInfo)."""
    slots = ("batch", "heads", "cache_seq")
    f32 = jnp.dtype(jnp.float32)
    return cls(k=ArrayInfo((batch, num_heads, budget, head_dim), slots + ("head_dim",),
                           jnp.dtype(dtype)),
               v=ArrayInfo((batch, num_heads, budget, head_dim), slots + ("head_dim",),
                           jnp.dtype(dtype)),
               pos=ArrayInfo((batch, num_heads, budget), slots, jnp.dtype(jnp.int32)),
               score=ArrayInfo((batch, num_heads, budget), slots, f32),
               h=ArrayInfo((batch, num_heads, rank, head_dim),
                           ("batch", "heads", "rank", "head_dim"), f32),
               z=ArrayInfo((batch, num_heads, rank), ("batch", "heads", "rank"), f32))


@struct.dataclass
class SparseState:
  """The decode state of a sparse / LESS model: one SparseKVCache per layer
  (each layer may have its own LESS rank) and the tokens seen per sequence.
  Its size depends on the budget and ranks only, never on the sequence."""

  lengths: jax.Array                       # [B] int32
  layers: tuple[SparseKVCache, ...]        # L entries

  @classmethod
  def abstract(cls, batch: int, num_heads: int, head_dim: int, budget: int,
               ranks: tuple[int, ...], dtype=jnp.float32) -> "SparseState":
    return cls(lengths=ArrayInfo((batch,), ("batch",), jnp.dtype(jnp.int32)),
               layers=tuple(SparseKVCache.abstract(batch, num_heads, head_dim, budget, r, dtype)
                            for r in ranks))


def init_cache(batch: int, num_heads: int, head_dim: int,
               policy: policies_lib.Policy, *, rank: int = 0,
               dtype=jnp.float32, max_len: int | None = None) -> SparseKVCache:
  """Empty cache with policy.budget slots and an R = rank LESS state.

  Args:
    batch, num_heads, head_dim: B, H, D.
    policy: the sparse policy (gives T = policy.budget).
    rank: R of the kernels that will be used (0: no kernels).
    dtype: dtype of the stored k, v.
    max_len: optional context length the budget must fit in.
  """
  if not isinstance(policy, policies_lib.Policy):
    raise PolicyError(f"policy must be a less_jax Policy, got {policy!r}")
  policy.check_context(max_len)
  for name, value in (("batch", batch), ("num_heads", num_heads),
                      ("head_dim", head_dim)):
    check_int(f"init_cache: {name}", value, 1)
  check_int("init_cache: rank", rank, 0)
  t = policy.budget
  h, z = state_lib.init_state(batch, num_heads, rank, head_dim)
  return SparseKVCache(
      k=jnp.zeros((batch, num_heads, t, head_dim), dtype),
      v=jnp.zeros((batch, num_heads, t, head_dim), dtype),
      pos=jnp.full((batch, num_heads, t), -1, jnp.int32),
      score=jnp.zeros((batch, num_heads, t), jnp.float32),
      h=h, z=z)


def cache_bytes(cache) -> int:
  """Bytes held by a pytree of arrays (e.g. a cache or a list of caches)."""
  return params_lib.tree_bytes(cache)


def check_cache(cache: SparseKVCache, policy: policies_lib.Policy,
                kernels: kernels_lib.KernelParams | None) -> tuple[int, int, int]:
  """Validates a cache against the policy and kernels; returns (B, H, D)."""
  if not isinstance(cache, SparseKVCache):
    raise SparseStateError(f"cache must be a SparseKVCache, got {type(cache)}")
  if not isinstance(policy, policies_lib.Policy):
    raise PolicyError(f"policy must be a less_jax Policy, got {policy!r}")
  b, h, t, d = cache.k.shape
  if t != policy.budget:
    raise SparseStateError(
        f"cache has {t} slots but {policy!r} needs budget {policy.budget}; "
        "build the cache with init_cache(..., policy)")
  expect = {"v": (b, h, t, d), "pos": (b, h, t), "score": (b, h, t),
            "z": (b, h, cache.rank)}
  for name, shape in expect.items():
    if tuple(getattr(cache, name).shape) != shape:
      raise SparseStateError(f"cache.{name} has shape {getattr(cache, name).shape}, expected {shape}")
  if tuple(cache.h.shape) != (b, h, cache.rank, d):
    raise SparseStateError(f"cache.h has shape {cache.h.shape}, expected {(b, h, cache.rank, d)}")
  r = kernels_lib.kernel_rank(kernels)
  if r != cache.rank:
    raise SparseStateError(
        f"cache holds a rank-{cache.rank} LESS state but the kernels have rank {r}; "
        f"build the cache with init_cache(..., rank={r})")
  kernels_lib.check_kernels(kernels, h, d)
  return b, h, d


def sparse_decode_step(cache: SparseKVCache, q: jax.Array, k_new: jax.Array,
                       v_new: jax.Array, lengths: jax.Array,
                       policy: policies_lib.Policy,
                       kernels: kernels_lib.KernelParams | None = None, *,
                       active: jax.Array | None = None,
                       scale: float | None = None):
  """One decode step of sparse (kernels None) or LESS attention for one layer.

  Args:
    cache: SparseKVCache of this layer.
    q: [B, H, D] query of the new token (after rotary; PLDR: q G_LM).
    k_new: [B, H, D] its key (after rotary).
    v_new: [B, H, D] its value.
    lengths: [B] int, tokens already in each sequence = position of the new
      token (per sequence; sequences may have different lengths).
    policy: sparse policy (static under jit).
    kernels: KernelParams of this layer, or None (plain sparse attention);
      the cache rank must equal the kernels' rank (0 for None).
    active: optional [B] bool; where False the cache of that sequence is left
      unchanged (its output is still computed). Default: all active.
    scale: score scale (default 1/sqrt(D)).

  Returns:
    out [B, H, D] in v_new's dtype (computed in float32), new cache.
  """
  b, h, d = check_cache(cache, policy, kernels)
  for name, x in (("q", q), ("k_new", k_new), ("v_new", v_new)):
    if tuple(x.shape) != (b, h, d):
      raise InputError(f"{name} must be [B, H, D] = {(b, h, d)}, got {tuple(x.shape)}")
  lengths = jnp.asarray(lengths)
  if lengths.shape != (b,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise InputError(f"lengths must be int [B] = [{b}], got {lengths.dtype}{list(lengths.shape)}")
  if active is None:
    active = jnp.ones((b,), bool)
  else:
    active = jnp.asarray(active)
    if active.shape != (b,):
      raise InputError(f"active must be [B] = [{b}], got {list(active.shape)}")
    active = active.astype(bool)
  sc = float(1.0 / np.sqrt(d)) if scale is None else float(scale)
  t_slots = cache.budget

  # 1. Attention over the kept slots and the new token itself (fp32).
  valid = cache.pos >= 0
  f32 = jnp.float32  # fp32 results from bf16 operands, per platform (nn.einsum_f32)
  logit_slots = nn.einsum_f32("bhd,bhtd->bht", q, cache.k, f32) * sc
  logit_new = nn.einsum_f32("bhd,bhd->bh", q, k_new.astype(cache.k.dtype), f32) * sc
  p_slots, p_new, lse = state_lib.slot_softmax(logit_slots, valid, logit_new)
  v_in = v_new.astype(cache.v.dtype).astype(jnp.float32)
  sparse_out = (nn.einsum_f32("bht,bhtd->bhd", p_slots, cache.v, f32)
                + p_new[..., None] * v_in)
  if kernels is None:
    out = sparse_out
  else:
    out = state_lib.less_combine(lse, sparse_out, kernels_lib.phi(kernels, q),
                                 cache.h, cache.z)

  # 2-3. Scores, victim, fold-in, write.
  new_pos = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None], (b, h))
  act = jnp.broadcast_to(active[:, None], (b, h))
  pos, score, slot, evict = policies_lib.insert_token(
      policy, cache.pos, cache.score, jax.lax.stop_gradient(p_slots),
      jax.lax.stop_gradient(p_new), new_pos, act)
  hs, zs = cache.h, cache.z
  k_write, v_write = k_new.astype(cache.k.dtype), v_new.astype(cache.v.dtype)
  ordered = backend.choice("less_ordered_writes")
  after = _after if ordered else lambda x, _: x
  if kernels is not None:
    k_old = jnp.take_along_axis(cache.k, slot[..., None, None], axis=2)[..., 0, :]
    v_old = jnp.take_along_axis(cache.v, slot[..., None, None], axis=2)[..., 0, :]
    hs, zs = state_lib.fold_in(hs, zs, kernels_lib.psi(kernels, k_old), v_old, evict)
    k_write, v_write = after(k_write, k_old), after(v_write, v_old)
  v_write = after(v_write, out[..., :1])
  bi = jnp.arange(b, dtype=jnp.int32)[:, None]
  hi = jnp.arange(h, dtype=jnp.int32)[None, :]
  slot_w = jnp.where(act, slot, t_slots)  # out of range: dropped
  k_c = cache.k.at[bi, hi, slot_w].set(k_write, mode="drop")
  v_c = cache.v.at[bi, hi, slot_w].set(v_write, mode="drop")
  new_cache = SparseKVCache(k=k_c, v=v_c, pos=pos, score=score, h=hs, z=zs)
  return out.astype(v_new.dtype), new_cache


def _after(x: jax.Array, read: jax.Array) -> jax.Array:
  """x, made to depend on `read` (x + 0 * read: the same values, NaN aside).

  The decode step reads a layer's old slots (scores, output, the evicted pair)
  and then overwrites one slot of the donated buffer. XLA updates the buffer in
  place only when every read is ordered before the write by data dependencies;
  otherwise it copies the whole buffer first (measured: k and v copied twice
  per layer per step). Feeding the reads into the written values orders them.
  """
  return x + jnp.zeros_like(x) * read.astype(x.dtype)


def _fold_evicted(kernels, k, v_bh, kept, lengths):
  """The LESS state (H, z) of the prompt pairs that left the cache, each folded once.

  k: [B, S, H, D] prompt keys; v_bh: [B, H, S, D] values; kept: bool [B, H, S]
  (prompt positions still in the cache); lengths: [B]. Without kernels: the
  empty rank-0 state.
  """
  b, s, h, d = k.shape
  hs, zs = state_lib.init_state(b, h, kernels_lib.kernel_rank(kernels), d)
  if kernels is None:
    return hs, zs
  real = jnp.arange(s)[None, None, :] < lengths[:, None, None]
  evicted = real & ~kept  # [B, H, S]
  psi_k = jnp.moveaxis(kernels_lib.psi(kernels, k), 1, 2)  # [B, H, S, R]
  psi_k = jnp.where(evicted[..., None], psi_k, 0.0)
  return (hs + jnp.einsum("bhsr,bhsd->bhrd", psi_k, v_bh.astype(jnp.float32)),
          zs + jnp.sum(psi_k, axis=2))


def _one_shot_keep(logits: jax.Array, lengths: jax.Array, policy: policies_lib.Policy):
  """Full causal attention over the prompt, then one eviction down to the budget.

  logits: [B, H, S, S] f32 pre-mask scores; lengths: [B].
  Returns (probs [B, H, S, S] dense causal softmax, kept bool [B, H, S],
  score [B, H, S] the attention each key received from the prompt's queries).
  The kept set is what the policy's own `victim` leaves when it evicts one token
  at a time from the whole prompt (the last prompt token counts as the newest).
  """
  b, h, s, _ = logits.shape
  t_slots = policy.budget
  j = jnp.arange(s, dtype=jnp.int32)
  real = j[None, :] < lengths[:, None]                                  # [B, S]
  visible = (j[None, :] <= j[:, None])[None] & real[:, None, :] & real[:, :, None]
  neg = jnp.finfo(jnp.float32).min
  masked = jnp.where(visible[:, None], logits, neg)
  probs = jnp.where(visible[:, None], jax.nn.softmax(masked, axis=-1), 0.0)
  score = jnp.sum(probs, axis=2)                                        # [B, H, S]
  pos = jnp.broadcast_to(jnp.where(real, j[None, :], _EVICTED)[:, None, :], (b, h, s))
  newest = jnp.broadcast_to((lengths - 1).astype(jnp.int32)[:, None], (b, h))
  count = jnp.broadcast_to(lengths.astype(jnp.int32)[:, None], (b, h))

  def evict_one(_, carry):
    pos, count = carry
    active = count > t_slots
    slot = policy.victim(pos, score, newest)
    hit = (j[None, None, :] == slot[..., None]) & active[..., None]
    return jnp.where(hit, _EVICTED, pos), count - active.astype(jnp.int32)

  if s > t_slots:
    pos, _ = jax.lax.fori_loop(0, s - t_slots, evict_one, (pos, count))
  return probs, pos != _EVICTED, score


def _one_shot_prefill(q, k_c, v_c, lengths, policy, kernels, dtype, scale):
  b, s, h, d = q.shape
  t_slots = policy.budget
  logits = parallel_lib.attention_logits(q, k_c, scale)
  probs, kept, score = _one_shot_keep(logits, lengths, policy)
  v_bh = jnp.moveaxis(v_c, 1, 2)  # [B, H, S, D]
  k_bh = jnp.moveaxis(k_c, 1, 2)
  out = jnp.einsum("bhst,bhtd->bshd", probs, v_bh.astype(jnp.float32)).astype(v_c.dtype)
  # Kept tokens into the T slots, oldest first; the rest of the slots stay empty.
  j = jnp.arange(s, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(kept, j, _EVICTED), axis=-1)            # [B, H, S]
  if s < t_slots:
    order = jnp.concatenate([order, jnp.zeros((b, h, t_slots - s), order.dtype)], -1)
  order = order[..., :t_slots]
  in_slot = jnp.take_along_axis(kept, order, axis=-1) & (jnp.arange(t_slots) < s)
  pos = jnp.where(in_slot, order, -1).astype(jnp.int32)
  slot_score = jnp.where(in_slot, jnp.take_along_axis(score, order, axis=-1), 0.0)
  take = lambda x: jnp.where(in_slot[..., None],
                             jnp.take_along_axis(x, order[..., None], axis=2), 0).astype(dtype)
  hs, zs = _fold_evicted(kernels, k_c, v_bh, kept, lengths)
  cache = SparseKVCache(k=take(k_bh), v=take(v_bh), pos=pos, score=slot_score.astype(jnp.float32),
                        h=hs, z=zs)
  return out, cache


def sparse_prefill(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                   policy: policies_lib.Policy,
                   kernels: kernels_lib.KernelParams | None = None, *,
                   dtype=None, scale: float | None = None,
                   max_len: int | None = None, mode: str = "one_shot"):
  """Builds the cache from prompts and returns the prompts' attention outputs.

  mode 'one_shot' (default): full causal attention over the prompt, then one
  eviction down to the budget (see the module docstring). mode 'greedy': equal
  to feeding each prompt token by token through `sparse_decode_step` (same
  outputs, same cache: slots, positions, scores, H, z).

  Args:
    q, k, v: [B, S, H, D] prompt queries/keys (after rotary) and values.
    lengths: [B] int prompt lengths (positions >= lengths[b] are padding and
      never enter the cache; their outputs are 0).
    policy: sparse policy (static under jit); the cache gets policy.budget slots.
    kernels: KernelParams or None.
    dtype: dtype of the cached k, v (default: k's dtype).
    scale: score scale (default 1/sqrt(D)).
    max_len: optional context length the budget must fit in.

  Returns:
    out [B, S, H, D], SparseKVCache ready for decoding at positions lengths[b].
  """
  b, s, h, d = parallel_lib.check_qkv(q, k, v, lengths)
  if not isinstance(policy, policies_lib.Policy):
    raise PolicyError(f"policy must be a less_jax Policy, got {policy!r}")
  if mode not in PREFILL_MODES:
    raise ConfigError(f"prefill mode must be one of {PREFILL_MODES}, got {mode!r}")
  policy.check_context(max_len)
  kernels_lib.check_kernels(kernels, h, d)
  dtype = k.dtype if dtype is None else dtype
  k_c = k.astype(dtype)
  v_c = v.astype(dtype)
  lengths = jnp.asarray(lengths)
  if mode == "one_shot":
    return _one_shot_prefill(q, k_c, v_c, lengths, policy, kernels, dtype, scale)
  logits = parallel_lib.attention_logits(q, k_c, scale)
  mask, pos, score = parallel_lib.policy_scan(logits, lengths, policy)
  out = parallel_lib.less_attention_parallel(
      q, k_c, v_c, lengths, policy, kernels, mask=mask, scale=scale)

  k_bh = jnp.moveaxis(k_c, 1, 2)  # [B, H, S, D]
  v_bh = jnp.moveaxis(v_c, 1, 2)
  valid = (pos >= 0)[..., None]
  idx = jnp.maximum(pos, 0)[..., None]
  k_slots = jnp.where(valid, jnp.take_along_axis(k_bh, idx, axis=2), 0).astype(dtype)
  v_slots = jnp.where(valid, jnp.take_along_axis(v_bh, idx, axis=2), 0).astype(dtype)

  bi = jnp.arange(b, dtype=jnp.int32)[:, None, None]
  hi = jnp.arange(h, dtype=jnp.int32)[None, :, None]
  kept = jnp.zeros((b, h, s), bool).at[bi, hi, jnp.where(pos >= 0, pos, s)].set(
      True, mode="drop")
  hs, zs = _fold_evicted(kernels, k_c, v_bh, kept, lengths)
  cache = SparseKVCache(k=k_slots, v=v_slots, pos=pos, score=score, h=hs, z=zs)
  return out, cache

"""Whole-sequence (parallel) form of sparse attention and LESS.

For kernel training and perplexity scoring: every query position at once, with
the causal sparse kept-set mask of the policy. It equals, position by
position, the step-by-step decode of `less_jax.cache.sparse_decode_step`.

  * mask[b, h, t, j] = key j is in C_t, the set query t attends to
    (the cache after token t-1, plus t itself). Policies with a closed form
    (Λ-masking, sliding window) build it directly; H2O uses `policy_scan`, a
    lax.scan over positions that runs the very cache-metadata transition of the
    decode step (same scores, same victims) on slot positions only.
  * The low-rank state seen by query t is H_t = sum over keys evicted before t
    (j < t, j not in C_t) of psi(k_j)^T v_j, so
        phi(q_t) H_t = sum_j E[t, j] (phi(q_t) . psi(k_j)) v_j,
    with E = strictly causal & ~mask: an O(S^2) matrix, like the attention
    itself, instead of a sequential scan over H.

Layouts: q, k, v [B, S, H, D] (position-major, like the model); masks and
logits [B, H, S, S] (query t, key j); lengths [B] int: positions >= lengths[b]
are padding (their outputs are zeros; they never affect real positions).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from less_jax import kernels as kernels_lib
from less_jax import policies as policies_lib
from less_jax import state as state_lib
from pldr_jax import nn
from pldr_jax.errors import InputError

__all__ = [
    "attention_logits",
    "policy_scan",
    "sparse_mask",
    "less_attention_parallel",
    "full_causal_attention",
    "check_qkv",
    "loss_positions",
]


def check_qkv(q, k, v, lengths):
  """Validates [B, S, H, D] q, k, v and [B] lengths; returns (B, S, H, D)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if getattr(x, "ndim", None) != 4:
      raise InputError(f"{name} must be [B, S, H, D], got shape {getattr(x, 'shape', None)}")
  if not (q.shape == k.shape == v.shape):
    raise InputError(f"q, k, v shapes differ: {q.shape}, {k.shape}, {v.shape}")
  b, s, h, d = q.shape
  if getattr(lengths, "shape", None) != (b,):
    raise InputError(f"lengths must be [B] = [{b}], got shape {getattr(lengths, 'shape', None)}")
  if not jnp.issubdtype(jnp.asarray(lengths).dtype, jnp.integer):
    raise InputError(f"lengths must be integers, got {jnp.asarray(lengths).dtype}")
  _check_range("lengths", lengths, 0, s)
  return b, s, h, d


def _check_range(name, x, lo, hi):
  """Checks lo <= x <= hi when x is concrete (skipped under jit)."""
  try:
    arr = np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return
  if (arr < lo).any() or (arr > hi).any():
    raise InputError(f"{name} must lie in [{lo}, {hi}], got {arr.tolist()}")


def _scale(d, scale):
  return float(1.0 / np.sqrt(d)) if scale is None else float(scale)


def attention_logits(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
  """s = q k^T * scale (default 1/sqrt(D)). q, k [B, S, H, D] -> [B, H, S, S] f32."""
  # fp32 scores from bf16 operands, per platform (pldr_jax.nn.einsum_f32).
  return nn.einsum_f32("bshd,bthd->bhst", q, k, jnp.float32) * _scale(q.shape[-1], scale)


@functools.partial(jax.jit, static_argnames=("policy",))
def policy_scan(logits: jax.Array, lengths: jax.Array, policy: policies_lib.Policy):
  """Runs the cache policy over a sequence, position by position.

  Jitted (policy static) so that eager callers compile the scan once per
  policy and shape; inside an outer jit it is simply inlined.

  The same transition as the decode step, on slot metadata only: query t
  attends to C_t = kept slots U {t}; the softmax over C_t is added to the
  slots' scores; token t takes the first empty slot or the victim's slot.
  Positions t >= lengths[b] change nothing.

  Args:
    logits: [B, H, S, S] float32 attention scores (query t, key j).
    lengths: [B] int, real length of each sequence.
    policy: the sparse policy (static).

  Returns:
    mask [B, H, S, S] bool (row t = C_t), and the final slot metadata
    pos [B, H, T] int32 (-1: empty) and score [B, H, T] float32, exactly the
    `pos`/`score` of a cache fed the sequence token by token.
  """
  b, h, s, _ = logits.shape
  t_slots = policy.budget
  logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
  rows = jnp.moveaxis(logits, 2, 0)  # [S, B, H, S]
  bi = jnp.arange(b, dtype=jnp.int32)[:, None, None]
  hi = jnp.arange(h, dtype=jnp.int32)[None, :, None]
  key_idx = jnp.arange(s, dtype=jnp.int32)
  lengths = jnp.asarray(lengths).astype(jnp.int32)

  def step(carry, xs):
    pos, score = carry
    row, t = xs
    valid = pos >= 0
    logit_slots = jnp.take_along_axis(row, jnp.maximum(pos, 0), axis=-1)
    logit_new = jax.lax.dynamic_index_in_dim(row, t, axis=-1, keepdims=False)
    p_slots, p_new, _ = state_lib.slot_softmax(logit_slots, valid, logit_new)
    kept = jnp.zeros((b, h, s), bool).at[bi, hi, jnp.where(valid, pos, s)].set(
        True, mode="drop")
    kept = kept | (key_idx == t)
    active = jnp.broadcast_to((t < lengths)[:, None], (b, h))
    new_pos = jnp.full((b, h), t, jnp.int32)
    pos, score, _, _ = policies_lib.insert_token(
        policy, pos, score, p_slots, p_new, new_pos, active)
    return (pos, score), kept

  init = (jnp.full((b, h, t_slots), -1, jnp.int32),
          jnp.zeros((b, h, t_slots), jnp.float32))
  (pos, score), kept_rows = jax.lax.scan(
      step, init, (rows, jnp.arange(s, dtype=jnp.int32)))
  return jnp.moveaxis(kept_rows, 0, 2), pos, score


def sparse_mask(q: jax.Array, k: jax.Array, lengths: jax.Array,
                policy: policies_lib.Policy, scale: float | None = None) -> jax.Array:
  """Causal kept-set mask of `policy`: [B, S, H, D] q, k -> [B, H, S, S] bool.

  Depends only on the (frozen) base model's q, k: compute it once per batch
  and pass it as `mask=` to `less_attention_parallel` when training kernels.
  """
  b, s, h, _ = q.shape
  static = policy.static_mask(s)
  if static is not None:
    return jnp.broadcast_to(jnp.asarray(static), (b, h, s, s))
  mask, _, _ = policy_scan(attention_logits(q, k, scale), lengths, policy)
  return mask


def _sparse_part(logits, mask, v):
  """lse [B, H, S] and softmax_mask(s) V [B, H, S, D] (float32)."""
  lse = state_lib.masked_lse(logits, mask)
  p = jnp.exp(jnp.where(mask, logits, -jnp.inf) - lse[..., None])
  return lse, jnp.einsum("bhst,bthd->bhsd", p, v.astype(jnp.float32))


def _finish(out_bhsd, lengths, dtype):
  out = jnp.moveaxis(out_bhsd, 1, 2)  # [B, S, H, D]
  s = out.shape[1]
  real = jnp.arange(s)[None, :] < jnp.asarray(lengths)[:, None]
  return jnp.where(real[:, :, None, None], out, 0.0).astype(dtype)


def less_attention_parallel(q: jax.Array, k: jax.Array, v: jax.Array,
                            lengths: jax.Array, policy: policies_lib.Policy,
                            kernels: kernels_lib.KernelParams | None = None, *,
                            mask: jax.Array | None = None,
                            scale: float | None = None,
                            dropout_rng: jax.Array | None = None,
                            deterministic: bool = True,
                            dropout_rate: float = kernels_lib.DEFAULT_DROPOUT,
                            max_len: int | None = None) -> jax.Array:
  """Sparse (kernels None) or LESS attention over whole sequences.

  Args:
    q, k, v: [B, S, H, D] (q, k after rotary; for PLDR q is q G_LM).
    lengths: [B] int real lengths; outputs at positions >= lengths are 0.
    policy: sparse policy (static under jit).
    kernels: KernelParams or None (None: sparse attention only, R = 0).
    mask: optional precomputed [B, H, S, S] kept-set mask (`sparse_mask`).
    scale: score scale (default 1/sqrt(D)).
    dropout_rng, deterministic, dropout_rate: kernel dropout (training only).
    max_len: optional context length the policy budget must fit in.

  Returns:
    out [B, S, H, D] in v's dtype (computed in float32).
  """
  b, s, h, d = check_qkv(q, k, v, lengths)
  policy.check_context(max_len)
  kernels_lib.check_kernels(kernels, h, d)
  logits = attention_logits(q, k, scale)
  if mask is None:
    mask = sparse_mask(q, k, lengths, policy, scale)
  elif mask.shape != (b, h, s, s):
    raise InputError(f"mask must be [B, H, S, S] = {(b, h, s, s)}, got {mask.shape}")
  causal = jnp.tril(jnp.ones((s, s), bool))
  kept = mask & causal
  lse, sparse_out = _sparse_part(logits, kept, v)
  if kernels is None:
    return _finish(sparse_out, lengths, v.dtype)

  if dropout_rng is not None:
    rng_q, rng_k = jax.random.split(dropout_rng)
  else:
    rng_q = rng_k = None
  kw = dict(rate=dropout_rate, deterministic=deterministic)
  phi_q = jnp.moveaxis(kernels_lib.phi(kernels, q, dropout_rng=rng_q, **kw), 1, 2)  # [B,H,S,R]
  psi_k = jnp.moveaxis(kernels_lib.psi(kernels, k, dropout_rng=rng_k, **kw), 1, 2)  # [B,H,S,R]
  evicted = jnp.tril(jnp.ones((s, s), bool), -1) & ~kept  # j < t, j not in C_t
  a = jnp.where(evicted, jnp.einsum("bhsr,bhtr->bhst", phi_q, psi_k), 0.0)
  lr_den = jnp.sum(a, axis=-1)
  norm = state_lib.less_norm(lse, lr_den)
  w = jnp.exp(state_lib.safe_log(phi_q) - norm[..., None])  # [B,H,S,R]
  aw = jnp.where(evicted, jnp.einsum("bhsr,bhtr->bhst", w, psi_k), 0.0)
  low_rank = jnp.einsum("bhst,bthd->bhsd", aw, v.astype(jnp.float32))
  out = low_rank + sparse_out * jnp.exp(lse - norm)[..., None]
  return _finish(out, lengths, v.dtype)


def full_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          lengths: jax.Array, scale: float | None = None) -> jax.Array:
  """Dense causal softmax attention, [B, S, H, D] -> [B, S, H, D] (baseline)."""
  check_qkv(q, k, v, lengths)
  s = q.shape[1]
  logits = attention_logits(q, k, scale)
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), logits.shape)
  _, out = _sparse_part(logits, causal, v)
  return _finish(out, lengths, v.dtype)


def loss_positions(lengths: jax.Array, policy: policies_lib.Policy,
                   seq_len: int) -> jax.Array:
  """[B, S] bool: positions that count in the kernel-training loss.

  The spec ignores positions before heavy + recent (= policy.budget): there the
  kept set is the whole prefix and LESS equals full attention. Padding
  (positions >= lengths[b]) is excluded too.
  """
  t = jnp.arange(seq_len, dtype=jnp.int32)[None, :]
  return (t >= policy.budget) & (t < jnp.asarray(lengths).astype(jnp.int32)[:, None])

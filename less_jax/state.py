"""The LESS low-rank state (H, z) and the log-space combination.

Per layer, per sequence and per head:

    H [R, D] = sum over evicted (k, v) of psi(k)^T v      (float32)
    z [R]    = sum over evicted k of psi(k)                (float32)

Batched layout: h [B, H, R, D], z [B, H, R]. R = 0 (no kernels) is allowed:
the arrays are then empty and the attention is the plain sparse one.

Attention for query q, kept set C, s_j = q . k_j * scale (spec, log space):

    lse  = logsumexp(s over C)
    norm = logaddexp(log max(phi(q) . z, 1e-6), lse)
    out  = exp(log phi(q) - norm) H + softmax_C(s) V * exp(lse - norm)

log phi(q) is taken with `safe_log` (0 -> -inf, then exp gives exactly 0) so
neither values nor gradients become NaN when a feature of phi(q) is 0.
Note the spec's 1e-6 floor: with z = 0 (nothing evicted yet) the sparse part is
scaled by exp(lse - norm) = 1 / (1 + 1e-6 / sum_C exp(s)), not exactly 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "LR_FLOOR",
    "init_state",
    "fold_in",
    "safe_log",
    "masked_lse",
    "slot_softmax",
    "less_norm",
    "less_combine",
]

LR_FLOOR = 1e-6


def init_state(batch: int, num_heads: int, rank: int, head_dim: int):
  """Zero state: h [B, H, R, D] float32, z [B, H, R] float32."""
  return (jnp.zeros((batch, num_heads, rank, head_dim), jnp.float32),
          jnp.zeros((batch, num_heads, rank), jnp.float32))


def fold_in(h: jax.Array, z: jax.Array, psi_k: jax.Array, v: jax.Array,
            mask: jax.Array | None = None):
  """Folds evicted pairs into the state: H += psi(k)^T v, z += psi(k).

  Args:
    h: [..., R, D] float32.
    z: [..., R] float32.
    psi_k: [..., R] psi of the evicted key.
    v: [..., D] the evicted value.
    mask: [...] bool, fold only where True (None: everywhere).

  Returns:
    (h, z) updated.
  """
  psi_k = psi_k.astype(jnp.float32)
  dh = psi_k[..., :, None] * v.astype(jnp.float32)[..., None, :]
  dz = psi_k
  if mask is not None:
    dh = jnp.where(mask[..., None, None], dh, 0.0)
    dz = jnp.where(mask[..., None], dz, 0.0)
  return h + dh, z + dz


def safe_log(x: jax.Array) -> jax.Array:
  """log(x) for x >= 0 with log(0) = -inf and a zero (not NaN) gradient there."""
  positive = x > 0
  return jnp.where(positive, jnp.log(jnp.where(positive, x, 1.0)), -jnp.inf)


def masked_lse(logits: jax.Array, mask: jax.Array, axis: int = -1) -> jax.Array:
  """logsumexp of logits over `axis` where mask; each row needs one True."""
  masked = jnp.where(mask, logits, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.max(masked, axis=axis, keepdims=True))
  s = jnp.sum(jnp.exp(masked - m), axis=axis, keepdims=True)
  return jnp.squeeze(m + jnp.log(s), axis)


def slot_softmax(logit_slots: jax.Array, valid: jax.Array, logit_new: jax.Array):
  """Softmax over a cache's valid slots plus the new token itself (float32).

  Args:
    logit_slots: [..., T] float32 scores of the query against each slot.
    valid: [..., T] bool, slot holds a token.
    logit_new: [...] float32 score of the query against its own key.

  Returns:
    p_slots [..., T] (0 on empty slots), p_new [...], lse [...].
  """
  masked = jnp.where(valid, logit_slots, -jnp.inf)
  m = jax.lax.stop_gradient(jnp.maximum(jnp.max(masked, axis=-1), logit_new))
  e_slots = jnp.exp(masked - m[..., None])
  e_new = jnp.exp(logit_new - m)
  denom = jnp.sum(e_slots, axis=-1) + e_new
  lse = m + jnp.log(denom)
  return e_slots / denom[..., None], e_new / denom, lse


def less_norm(lse: jax.Array, lr_den: jax.Array) -> jax.Array:
  """norm = logaddexp(log max(phi(q) z, 1e-6), lse); both args [...]."""
  return jnp.logaddexp(jnp.log(jnp.maximum(lr_den, LR_FLOOR)), lse)


def less_combine(lse: jax.Array, sparse_out: jax.Array, phi_q: jax.Array,
                 h: jax.Array, z: jax.Array) -> jax.Array:
  """Combines the sparse attention with the low-rank state (log space).

  Args:
    lse: [...] logsumexp of the scores over the kept set C.
    sparse_out: [..., D] softmax_C(s) V.
    phi_q: [..., R] phi(q) (>= 0).
    h: [..., R, D] state H.
    z: [..., R] state z.

  Returns:
    out [..., D] float32.
  """
  phi_q = phi_q.astype(jnp.float32)
  lr_den = jnp.sum(phi_q * z, axis=-1)
  norm = less_norm(lse, lr_den)
  w = jnp.exp(safe_log(phi_q) - norm[..., None])
  low_rank = jnp.einsum("...r,...rd->...d", w, h)
  return low_rank + sparse_out.astype(jnp.float32) * jnp.exp(lse - norm)[..., None]

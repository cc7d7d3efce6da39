"""Rotary position embedding, no parameters.

Two pairings of the head dimension, both rotating pair i by pos * base^(-2i/dk):
interleaved (x[2i], x[2i+1]), GPT-J style, what the authors' PyTorch code and the
Hugging Face port with `reference_rope=true` compute; and half rotation
(x[i], x[i + dk/2]), the `rotate_half` of Llama-style code, the port's
`reference_rope=false`. They differ by a fixed permutation of the head axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, base: float) -> jax.Array:
  """positions: int [...]; returns angles [..., head_dim // 2] in fp32 (fp64 under x64)."""
  ftype = jnp.promote_types(jnp.float32, jnp.result_type(float))
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=ftype) / head_dim)
  return positions.astype(ftype)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, base: float, *,
                 interleaved: bool = True) -> jax.Array:
  """Rotate pairs of x's last axis by angle pos * base^(-2i/dk).

  x: [B, S, H, dk]; positions: int [B, S] -> [B, S, H, dk] in x.dtype.
  interleaved: pairs (x[2i], x[2i+1]) (the authors' layout); False: pairs
  (x[i], x[i + dk/2]) (rotate_half).
  """
  dk = x.shape[-1]
  ang = rotary_angles(positions, dk, base)[:, :, None, :]  # [B,S,1,dk/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  ftype = jnp.promote_types(x.dtype, cos.dtype)
  xf = x.astype(ftype)
  if interleaved:
    pairs = xf.reshape(*x.shape[:-1], dk // 2, 2)
    first, second = pairs[..., 0], pairs[..., 1]
  else:
    first, second = xf[..., :dk // 2], xf[..., dk // 2:]
  rot1, rot2 = first * cos - second * sin, second * cos + first * sin
  if interleaved:
    out = jnp.stack([rot1, rot2], axis=-1).reshape(x.shape)
  else:
    out = jnp.concatenate([rot1, rot2], axis=-1)
  return out.astype(x.dtype)

"""Rotary position embedding, GPT-J style (interleaved pairs), no parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, base: float) -> jax.Array:
  """positions: int [...]; returns angles [..., head_dim // 2] in fp32 (fp64 under x64)."""
  ftype = jnp.promote_types(jnp.float32, jnp.result_type(float))
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=ftype) / head_dim)
  return positions.astype(ftype)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, base: float) -> jax.Array:
  """Rotate interleaved pairs (x[2i], x[2i+1]) by angle pos * base^(-2i/dk).

  x: [B, S, H, dk]; positions: int [B, S] -> [B, S, H, dk] in x.dtype.
  """
  dk = x.shape[-1]
  ang = rotary_angles(positions, dk, base)[:, :, None, :]  # [B,S,1,dk/2]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  ftype = jnp.promote_types(x.dtype, cos.dtype)
  pairs = x.astype(ftype).reshape(*x.shape[:-1], dk // 2, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  out = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)

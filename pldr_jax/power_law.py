"""The power-law step of PLGA: A -> A_LM -> A_P -> G_LM (always >= fp32).

Per head h, with parameters W, b, P, a, b_a each [H, dk, dk]:
    A_LM = iSwiGLU(W[h] @ A + b[h]) + 1e-9,   iSwiGLU(x) = x * silu(x)
    A_P  = A_LM ** P[h]                        (elementwise)
    G_LM = a[h] @ A_P + b_a[h]
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pldr_jax import nn

A_LM_FLOOR = 1e-9


def iswiglu(x: jax.Array) -> jax.Array:
  """x * silu(x) = x^2 sigmoid(x) >= 0."""
  return x * jax.nn.silu(x)


def power_law_step(plga_p: dict, a: jax.Array) -> dict:
  """plga_p: {'W','b','P','a','b_a'} [H, dk, dk]; a: [..., H, dk, dk].

  Returns {'A_LM', 'A_P', 'G_LM'}, each [..., H, dk, dk] in >= fp32.
  """
  ft = nn.upcast(a.dtype)
  cast = lambda name: plga_p[name].astype(ft)
  a = a.astype(ft)
  a_lm = iswiglu(jnp.einsum("hij,...hjk->...hik", cast("W"), a) + cast("b")) + A_LM_FLOOR
  a_p = jnp.power(a_lm, cast("P"))
  g_lm = jnp.einsum("hij,...hjk->...hik", cast("a"), a_p) + cast("b_a")
  return {"A_LM": a_lm, "A_P": a_p, "G_LM": g_lm}

"""Small building blocks shared by the model: LayerNorm, dense, GLU.

Parameters are plain dicts; kernels are [in, out] (y = x @ kernel + bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def upcast(dtype) -> jnp.dtype:
  """The dtype used for numerically sensitive steps: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def layer_norm(p: dict, x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis, statistics in at least fp32.

  p: {'scale': [N], 'bias': [N]}; x: [..., N] -> [..., N] in x.dtype.
  """
  xf = x.astype(upcast(x.dtype))
  mean = jnp.mean(xf, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
  y = (xf - mean) * jax.lax.rsqrt(var + eps)
  y = y * p["scale"].astype(y.dtype) + p["bias"].astype(y.dtype)
  return y.astype(x.dtype)


def dense(p: dict, x: jax.Array) -> jax.Array:
  """p: {'kernel': [N, M], 'bias': [M]}; x: [..., N] -> [..., M] in x.dtype."""
  kernel = p["kernel"].astype(x.dtype)
  return jnp.einsum("...n,nm->...m", x, kernel) + p["bias"].astype(x.dtype)


def glu(p: dict, x: jax.Array) -> jax.Array:
  """SwiGLU-style GLU: w3(silu(w1 x + b1) * (w2 x + b2)) + b3.

  p: {'w1','w2': dense N->F, 'w3': dense F->N}; x: [..., N] -> [..., N].
  """
  return dense(p["w3"], jax.nn.silu(dense(p["w1"], x)) * dense(p["w2"], x))

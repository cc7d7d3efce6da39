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


def fuse_dense(*ps: dict) -> dict:
  """Dense layers on the same input as one: kernels and biases concatenated on
  the output axis ({'kernel': [N, M1 + M2 + ...], 'bias': [M1 + M2 + ...]})."""
  return {"kernel": jnp.concatenate([p["kernel"] for p in ps], axis=-1),
          "bias": jnp.concatenate([p["bias"] for p in ps], axis=-1)}


def glu(p: dict, x: jax.Array) -> jax.Array:
  """SwiGLU-style GLU: w3(silu(w1 x + b1) * (w2 x + b2)) + b3.

  p: {'w1','w2': dense N->F, 'w3': dense F->N}, or {'w12': fuse_dense(w1, w2),
  'w3'} (one matmul for both inputs); x: [..., N] -> [..., N].
  """
  if "w12" in p:
    a, b = jnp.split(dense(p["w12"], x), 2, axis=-1)
  else:
    a, b = dense(p["w1"], x), dense(p["w2"], x)
  return dense(p["w3"], jax.nn.silu(a) * b)

"""Small building blocks shared by the model: LayerNorm, dense, GLU.

Parameters are plain dicts; kernels are [in, out] (y = x @ kernel + bias).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def upcast(dtype) -> jnp.dtype:
  """The dtype used for numerically sensitive steps: at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def einsum_f32(spec: str, a: jax.Array, b: jax.Array, dtype=None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` with a result of at least float32, for attention scores
  and their weighted sums.

  Per platform (pldr_jax.backend choice 'attention_dot'): XLA:CPU has no
  bf16 x bf16 -> f32 dot, so the operands are upcast first; elsewhere they enter
  the dot as they are (the MXU's bf16 inputs) with preferred_element_type f32.
  Either way the products of bf16 values are exact in fp32 and summed in fp32.
  dtype: the result's dtype (default: the operands' promoted with float32).
  """
  from pldr_jax import backend
  ft = (jnp.promote_types(jnp.promote_types(a.dtype, b.dtype), jnp.float32)
        if dtype is None else jnp.dtype(dtype))
  if backend.choice("attention_dot") == "upcast":
    return jnp.einsum(spec, a.astype(ft), b.astype(ft))
  return jnp.einsum(spec, a, b, preferred_element_type=ft)


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
  """p: {'kernel': [N, M], 'bias': [M]}, or {'kernel_t': [M, N], 'bias'} (the same
  layer stored output-major, `output_major`); x: [..., N] -> [..., M] in x.dtype."""
  if "kernel_t" in p:
    y = jnp.einsum("...n,mn->...m", x, p["kernel_t"].astype(x.dtype))
  else:
    y = jnp.einsum("...n,nm->...m", x, p["kernel"].astype(x.dtype))
  return y + p["bias"].astype(x.dtype)


def output_major(p: dict, on: bool = True) -> dict:
  """A dense layer with its kernel stored output-major ({'kernel_t': [M, N]}) when
  `on`, else input-major ({'kernel': [N, M]}); the same layer for `dense`. Idempotent."""
  if on and "kernel" in p:
    return {"kernel_t": p["kernel"].T, "bias": p["bias"]}
  if not on and "kernel_t" in p:
    return {"kernel": p["kernel_t"].T, "bias": p["bias"]}
  return p


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

"""The decode caches as typed values: `KVCache` and `GCache`.

Both are `flax.struct.dataclass` pytrees with fixed fields and an `abstract()`
that gives each field's shape, dtype and logical axes, so a cache is placed on
a mesh by the same Flax logical-axis rules as the parameters
(pldr_jax.sharding). The KV buffers are one array per layer, not one stacked
[L, ...] array: a decode step writes one slot of each in place and reads it
whole, and on XLA:CPU a slice of a stacked buffer is a copy (measured: see
docs/architecture.md). Each buffer is time-minor, [B, H, dk, T]: the step's
products read a head's [dk, T] block as dk rows of T contiguous slots, which
XLA:CPU reads close to the memory bandwidth, and a [T, dk] block at ~70% of it
(110M decode at 8k tokens 13-16% faster: benchmarks/results/kv_layout_2026-11-27.md).
The small G tensors are stacked on a leading [L].

  KVCache   (donated each decode step)
    k, v      L x [B, H, dk, T] compute dtype   keys (after rotary) and values,
                                                head-major and time-minor,
                                                T = cache_len slots: one
                                                buffer per layer
    lengths   [B]               int32           tokens held per sequence
    gram      [L, B, H, dk, dk] >= float32      running sum of q q^T: only for
                                                the causal metric without the
                                                G-cache (else None)
  GCache    (constant, never donated; built once at prefill)
    g_lm      [L, B, H, dk, dk]  G_LM that decode reads (G-cache, or a fixed G)
    a         [L, B, H, dk, dk]  A, from which g_cache=False recomputes G_LM

A field a mode does not use is None (identity: an empty GCache). Only what a
decode step reads is kept: the authors' cache (and the HF port's
`past_G_values`) also holds A and A_LM beside G_LM, which their decode never
reads either; `model.forward(..., return_deductive=True)` gives every tensor.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from pldr_jax.sharding import ArrayInfo
from pldr_jax.config import PLDRConfig


KV_AXES = ("batch", "heads", "head_dim", "cache_seq")
G_AXES = ("layers", "batch", "heads", "head_dim", None)


def _uses_gram(config: PLDRConfig, g_cache: bool) -> bool:
  return config.learned_g and config.causal_metric and not g_cache


@struct.dataclass
class KVCache:
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  lengths: jax.Array
  gram: jax.Array | None = None

  @classmethod
  def abstract(cls, config: PLDRConfig, batch: int, cache_len: int,
               g_cache: bool = True) -> "KVCache":
    cd = jnp.dtype(config.compute_dtype)
    kv = (ArrayInfo((batch, config.num_heads, config.head_dim, cache_len), KV_AXES, cd),
          ) * config.num_layers
    gram = None
    if _uses_gram(config, g_cache):
      gram = ArrayInfo(_g_shape(config, batch), G_AXES, jnp.promote_types(cd, jnp.float32))
    return cls(k=kv, v=kv, lengths=ArrayInfo((batch,), ("batch",), jnp.int32), gram=gram)

  @property
  def cache_len(self) -> int:
    return int(self.k[0].shape[3])


def _g_shape(config: PLDRConfig, batch: int) -> tuple[int, ...]:
  return (config.num_layers, batch, config.num_heads, config.head_dim, config.head_dim)


@struct.dataclass
class GCache:
  g_lm: jax.Array | None = None
  a: jax.Array | None = None

  @classmethod
  def abstract(cls, config: PLDRConfig, batch: int, g_cache: bool = True) -> "GCache":
    info = ArrayInfo(_g_shape(config, batch), G_AXES, jnp.dtype(config.compute_dtype))
    if not config.learned_g:
      return cls() if config.g_mode == "identity" else cls(g_lm=info)
    if config.causal_metric and not g_cache:
      return cls()
    return cls(g_lm=info) if g_cache else cls(a=info)

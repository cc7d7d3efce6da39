"""Power Law Graph Attention scores and output: softmax(Q G_LM K^T / sqrt(dk)) V.

Scaled dot-product attention is the case G_LM = I (pass g=None).
"""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp

from pldr_jax import backend, nn


def apply_g(q: jax.Array, g: jax.Array | None) -> jax.Array:
  """The PLGA query q G_LM, in q.dtype.

  q: [B, S, H, dk]; g: None (identity), [B, H, dk, dk] (one G per sequence)
  or [B, S, H, dk, dk] (one per query position, causal metric).
  """
  if g is None:
    return q
  ft = jnp.promote_types(q.dtype, g.dtype)
  if g.ndim == 4:
    qg = jnp.einsum("bshi,bhij->bshj", q.astype(ft), g.astype(ft))
  elif g.ndim == 5:
    qg = jnp.einsum("bshi,bshij->bshj", q.astype(ft), g.astype(ft))
  else:
    raise ValueError(f"G_LM must be [B,H,dk,dk] or [B,S,H,dk,dk], got shape {g.shape}")
  return qg.astype(q.dtype)


def attention_logits(qg: jax.Array, k: jax.Array) -> jax.Array:
  """Pre-mask scores (q G) k^T / sqrt(dk). qg: [B,S,H,dk], k: [B,T,H,dk] -> [B,H,S,T] (>= fp32)."""
  # fp32 scores from bf16 operands: per platform (nn.einsum_f32).
  logits = nn.einsum_f32("bshd,bthd->bhst", qg, k)
  return logits / math.sqrt(qg.shape[-1])


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """logits: [B,H,S,T] (>= fp32); mask: bool broadcastable to it (True = visible)."""
  logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  return jax.nn.softmax(logits, axis=-1)


def plga_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                   mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """PLGA over heads.

  q: [B,S,H,dk]; k, v: [B,T,H,dk]; g: see `apply_g`; mask: bool [B,S,T].
  Returns (out [B,S,H,dk] in v.dtype, pre-mask logits [B,H,S,T]).
  """
  chex.assert_rank([q, k, v, mask], [4, 4, 4, 3])
  chex.assert_equal_shape([k, v])
  logits = attention_logits(apply_g(q, g), k)
  probs = masked_softmax(logits, mask[:, None, :, :])
  out = jnp.einsum("bhst,bthd->bshd", probs.astype(v.dtype), v)
  return out, logits


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                    lengths: jax.Array, implementation: str) -> jax.Array:
  """`plga_attention` of a whole causal sequence through `jax.nn.dot_product_attention`.

  q: [B,S,H,dk]; k, v: [B,S,H,dk]; g: see `apply_g`; lengths: int [B] (key s
  visible to query t iff s <= t and s < lengths_b, `causal_mask` of equal
  positions); implementation: "xla" or "cudnn" (cuDNN's fused kernel: GPU,
  bf16/fp16, the [S, S] scores never stored). PLGA is SDPA on the query q G_LM,
  so the fused kernels apply as they are. Returns out [B,S,H,dk] in v.dtype.
  """
  chex.assert_rank([q, k, v, lengths], [4, 4, 4, 1])
  chex.assert_equal_shape([q, k, v])
  if implementation == "flash":
    return flash_attention(q, k, v, g, lengths)
  qg = apply_g(q, g).astype(v.dtype)
  return jax.nn.dot_product_attention(qg, k.astype(v.dtype), v, is_causal=True,
                                      key_value_seq_lengths=lengths.astype(jnp.int32),
                                      implementation=implementation)


FLASH_BLOCK = 128  # the Pallas TPU kernel's block: sequences are padded to a multiple


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                    lengths: jax.Array, kernel=None) -> jax.Array:
  """`plga_attention` of a whole causal sequence with the Pallas TPU flash kernel.

  q, k, v: [B,S,H,dk]; g: see `apply_g`; lengths: int [B]. PLGA is SDPA on the
  query q G_LM, so the kernel takes (q G_LM, k, v) and never writes the
  [B, H, S, S] scores. The sequence is padded to a multiple of FLASH_BLOCK, and
  segment ids (1 for the first lengths_b positions, 0 after) with the causal
  mask give every real query exactly the keys `causal_mask` gives it; a padding
  query sees padding keys only, where `plga_attention` shows it the real ones:
  its output differs and is read by nothing (padded queries are left out of A,
  the loss and the caches' visible slots).
  Inside an abstract mesh (`jax.sharding.use_abstract_mesh`, set by the train
  and eval steps) the kernel runs per batch shard (`jax.shard_map`): XLA cannot
  split a custom kernel by itself.
  kernel: the function called as kernel(q, k, v, None, segment_ids, causal=True,
  sm_scale=...) on [B, H, S', dk] (default: the Pallas TPU kernel;
  tests pass its reference, `mha_reference_no_custom_vjp`, to run on a CPU).
  Returns out [B,S,H,dk] in v.dtype.
  """
  from jax.experimental.pallas.ops.tpu import flash_attention as fa
  from pldr_jax import sharding as sharding_lib
  chex.assert_rank([q, k, v, lengths], [4, 4, 4, 1])
  chex.assert_equal_shape([q, k, v])
  kernel = fa.flash_attention if kernel is None else kernel
  b, s, h, d = q.shape
  pad = (-s) % FLASH_BLOCK
  qg = apply_g(q, g).astype(v.dtype)
  to_bhsd = lambda x: jnp.pad(jnp.transpose(x.astype(v.dtype), (0, 2, 1, 3)),
                              ((0, 0), (0, 0), (0, pad), (0, 0)))
  seg = (jnp.arange(s + pad)[None, :] < lengths[:, None]).astype(jnp.int32)  # [B, S']
  scale = 1.0 / math.sqrt(d)

  def run(qb, kb, vb, segb):
    ids = fa.SegmentIds(q=segb, kv=segb)
    return kernel(qb, kb, vb, None, ids, causal=True, sm_scale=scale)

  args = (to_bhsd(qg), to_bhsd(k), to_bhsd(v), seg)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and not mesh.empty:
    rows = sharding_lib.batch_partition(mesh)
    spec4, spec2 = jax.sharding.PartitionSpec(rows), jax.sharding.PartitionSpec(rows)
    run = jax.shard_map(run, mesh=mesh, in_specs=(spec4, spec4, spec4, spec2),
                        out_specs=spec4, check_vma=False)
  out = run(*args)
  return jnp.transpose(out[:, :, :s], (0, 2, 1, 3)).astype(v.dtype)


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None,
                     visible: jax.Array) -> jax.Array:
  """PLGA of one new query per sequence over the decode KV-cache.

  q: [B, H, dk]; k, v: [B, H, dk, T] (time-minor, the new pair already
  written); g: see `apply_g` (None: identity); visible: bool [B, T].
  Returns [B, H, dk] in v.dtype.

  Both products contract or keep dk against rows of T contiguous slots
  ([dk] @ [dk, T] and [dk, T] @ [T] per head): XLA:CPU reads a cache in this
  layout at close to the memory bandwidth, a [T, dk] one at about 70% of it
  (benchmarks/results/kv_layout_2026-11-27.md).
  """
  chex.assert_rank([q, k, v, visible], [3, 4, 4, 2])
  chex.assert_equal_shape([k, v])
  qg = apply_g(q[:, None], g)[:, 0]
  if backend.choice("attention_dot") == "upcast":
    qg = qg.astype(nn.upcast(qg.dtype))  # the query first: XLA:CPU's program as tuned
  logits = nn.einsum_f32("bhdt,bhd->bht", k, qg) / math.sqrt(q.shape[-1])
  probs = masked_softmax(logits, visible[:, None, :])
  return jnp.einsum("bht,bhdt->bhd", probs.astype(v.dtype), v)


def causal_mask(q_pos: jax.Array, k_pos: jax.Array, k_len: jax.Array) -> jax.Array:
  """Key s visible to query t iff pos_s <= pos_t and pos_s < length.

  q_pos: int [B, S]; k_pos: int [B, T]; k_len: int [B] -> bool [B, S, T].
  """
  return (k_pos[:, None, :] <= q_pos[:, :, None]) & (k_pos[:, None, :] < k_len[:, None, None])

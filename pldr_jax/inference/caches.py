"""The decode-cache protocol, and `FullCache`, the default cache that follows it.

`generate` / `stream` run any cache object with these four methods; it is a
`flax.struct` dataclass, so it passes through `jax.jit`: its static fields
select the program, its array fields (e.g. trained kernels) are traced.

  abstract(*, config, batch, cache_len)
      -> (decode state, GCache) of `ArrayInfo` (shape, dtype, logical axes)
  prefill(params, tokens, lengths, g_lm, *, config, cache_len)
      -> (each prompt's last logits [B, V], decode state, GCache)
  step_params(params, *, config, batch)
      -> what `step` reads, built once per generation (`decode.decode_params`)
  step(step_params, gcache, state, tokens, *, config)
      -> (logits [B, V], new decode state)     tokens: int32 [B]

`FullCache` is the KV-cache with (default) or without the G-cache. Plugins add
others without pldr_jax knowing them: `less_jax.SparseCache` (H2O, Λ-masking,
sliding window, LESS) is one.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from flax import struct

from pldr_jax.errors import InputError
from pldr_jax.inference import decode
from pldr_jax.inference.kv_cache import GCache, KVCache


@runtime_checkable
class DecodeCache(Protocol):
  """What `generate` / `stream` need of a cache (see the module docstring)."""

  def abstract(self, *, config, batch, cache_len): ...

  def prefill(self, params, tokens, lengths, g_lm, *, config, cache_len): ...

  def step_params(self, params, *, config, batch=None): ...

  def step(self, params, gcache, state, tokens, *, config): ...


def check_cache(cache) -> DecodeCache:
  """None -> FullCache(); a DecodeCache as is; anything else an InputError."""
  if cache is None:
    return FullCache()
  if not isinstance(cache, DecodeCache):
    raise InputError(f"cache must follow the decode-cache protocol (abstract, prefill, "
                     f"step_params, step), e.g. FullCache() or less_jax.SparseCache(...); "
                     f"got {cache!r}")
  return cache


@struct.dataclass
class FullCache:
  """A KV-cache sized to the request, plus the G-cache (g_cache=False
  recomputes G_LM from the cached A at every step: same tokens, slower)."""
  g_cache: bool = struct.field(pytree_node=False, default=True)

  def prefill(self, params, tokens, lengths, g_lm, *, config, cache_len):
    return decode.prefill(params, tokens, lengths, config=config, cache_len=cache_len,
                          g_cache=self.g_cache, g_lm=g_lm, all_logits=False)

  def step_params(self, params, *, config, batch=None):
    return decode.decode_params(params, config, self.g_cache, batch)

  def abstract(self, *, config, batch, cache_len):
    return (KVCache.abstract(config, batch, cache_len, self.g_cache),
            GCache.abstract(config, batch, self.g_cache))

  def step(self, params, gcache, state, tokens, *, config):
    return decode.decode_step(params, gcache, state, tokens, config=config,
                              g_cache=self.g_cache)

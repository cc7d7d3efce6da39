"""`SparseCache`: LESS and the sparse policies as a pldr_jax decode cache.

It follows pldr_jax's decode-cache protocol (`pldr_jax.inference.caches`), so
`pldr_jax.inference.generate.generate` / `stream` run it like the default
`FullCache`, the way a kvpress user passes a press:

    generate.generate(params, prompts, config=cfg, max_new_tokens=32,
                      cache=less_jax.SparseCache(less_jax.h2o(heavy=16, recent=16), kernels))
"""

from __future__ import annotations

from flax import struct

from less_jax import cache as cache_lib
from less_jax import kernels as kernels_lib
from less_jax import model as less_model
from pldr_jax.inference import decode
from pldr_jax.inference.kv_cache import GCache

__all__ = ["SparseCache"]


@struct.dataclass
class SparseCache:
  """A fixed-size sparse cache: `policy` (H2O, Λ-masking, sliding window) and
  optional LESS `kernels` (one KernelParams or None per layer), prefilled
  'one_shot' (default) or 'greedy' (less_jax.model.less_prefill). Its memory does
  not grow with the sequence. A pytree: the kernels are traced, policy and
  prefill mode static (changing them compiles another program)."""
  policy: object = struct.field(pytree_node=False)
  kernels: object = None
  prefill_mode: str = struct.field(pytree_node=False, default="one_shot")

  def prefill(self, params, tokens, lengths, g_lm, *, config, cache_len):
    """-> (each prompt's last logits [B, V], SparseState, GCache)."""
    del cache_len  # the policy's budget fixes the size
    return less_model.less_prefill(params, tokens, lengths, config=config, policy=self.policy,
                                   kernels=self.kernels, g_lm=g_lm, mode=self.prefill_mode,
                                   all_logits=False)

  def step_params(self, params, *, config, batch=None):
    """What `step` reads: per-layer weights without the G network (G-cache)."""
    return decode.decode_params(params, config, batch=batch)

  def abstract(self, *, config, batch, cache_len):
    """(SparseState, GCache) of ArrayInfo: shapes, dtypes, logical axes."""
    del cache_len
    ranks = tuple(kernels_lib.kernel_rank(k)
                  for k in less_model.check_kernels_list(self.kernels, config))
    return (cache_lib.SparseState.abstract(batch, config.num_heads, config.head_dim,
                                           self.policy.budget, ranks, config.compute_dtype),
            GCache.abstract(config, batch))

  def step(self, params, gcache, state, tokens, *, config):
    """params: `step_params(...)` -> (logits [B, V], SparseState)."""
    return less_model.less_decode_step(params, gcache, state, tokens, config=config,
                                       policy=self.policy, kernels=self.kernels)

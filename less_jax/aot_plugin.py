"""less_jax's decode program for `python -m pldr_jax.aot` (entry point group
"pldr_jax.aot_decode", declared in pyproject.toml): one decode step on a LESS
cache, H2O keeping budget/2 heavy + budget/2 recent slots, with rank-`rank`
kernels in every layer."""

from __future__ import annotations

import jax

from less_jax import kernels as kernels_lib
from less_jax import policies
from less_jax.sparse_cache import SparseCache


def less_decode(config, *, budget: int, rank: int):
  """-> (SparseCache with abstract kernels, the slots a step attends over)."""
  policy = policies.make_policy("h2o", heavy=budget // 2, recent=budget - budget // 2)
  kernels = jax.eval_shape(lambda k: [kernels_lib.init_kernels(
      jax.random.fold_in(k, i), config.head_dim, config.num_heads, rank=rank)
      for i in range(config.num_layers)], jax.random.key(0))
  return SparseCache(policy, kernels), policy.budget


DECODE_PROGRAMS = {"decode_less": less_decode}

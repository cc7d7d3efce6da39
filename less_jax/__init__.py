"""LESS (Dong et al., ICML 2024) and sparse KV-cache policies in JAX.

Model-independent core, generic over q, k, v arrays (contract:
docs/less.md):

  policies  H2O, Λ-masking (StreamingLLM), sliding window, Baseline+.
  kernels   phi / psi feature maps (params, init, apply).
  state     the low-rank state H, z, fold-in and the log-space combination.
  cache     fixed-size per-layer sparse KV cache + LESS state: decode step and
            prefill.
  parallel  whole-sequence form (kernel training, perplexity scoring).

Inside a pldr_jax model (a plugin: pldr_jax knows nothing of less_jax):

  model         sparse / LESS attention with `q G_LM` as the query: prefill,
                decode step, whole-sequence forward, layer inputs for training.
  sparse_cache  `SparseCache`, a decode cache `generate` / `stream` run.
  train_kernels training phi / psi on a frozen model; config / errors.
"""

from less_jax.cache import (SparseKVCache, SparseState, cache_bytes, check_cache, init_cache,
                            sparse_decode_step, sparse_prefill)
from less_jax.config import DEFAULT_DROPOUT, DEFAULT_HIDDEN, DEFAULT_RANK
from less_jax.kernels import KernelParams, init_kernels, kernel_rank, phi, psi
from less_jax.parallel import (attention_logits, full_causal_attention,
                               less_attention_parallel, loss_positions,
                               policy_scan, sparse_mask)
from less_jax.policies import (H2O, POLICY_NAMES, LambdaMask, Policy,
                               SlidingWindow, baseline_plus, h2o,
                               insert_token, lambda_mask, make_policy,
                               sliding_window)
from less_jax.sparse_cache import SparseCache
from less_jax.state import (LR_FLOOR, fold_in, init_state, less_combine,
                            less_norm, safe_log)

__all__ = [
    "SparseKVCache", "SparseState", "cache_bytes", "check_cache", "init_cache",
    "sparse_decode_step", "sparse_prefill",
    "DEFAULT_DROPOUT", "DEFAULT_HIDDEN", "DEFAULT_RANK", "KernelParams",
    "init_kernels", "kernel_rank", "phi", "psi",
    "attention_logits", "full_causal_attention", "less_attention_parallel",
    "loss_positions", "policy_scan", "sparse_mask",
    "H2O", "POLICY_NAMES", "LambdaMask", "Policy",
    "SlidingWindow", "baseline_plus", "h2o", "insert_token", "lambda_mask",
    "make_policy",
    "sliding_window",
    "SparseCache",
    "LR_FLOOR", "fold_in", "init_state", "less_combine", "less_norm", "safe_log",
]

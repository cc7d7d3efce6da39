"""LESS (Dong et al., ICML 2024) and sparse KV-cache policies in JAX.

Model-independent core, generic over q, k, v arrays (contract:
docs/less.md):

  policies  H2O, Λ-masking (StreamingLLM), sliding window, Baseline+.
  kernels   phi / psi feature maps (params, init, apply).
  state     the low-rank state H, z, fold-in and the log-space combination.
  cache     fixed-size per-layer sparse KV cache + LESS state: decode step and
            prefill.
  parallel  whole-sequence form (kernel training, perplexity scoring).
"""

from less_jax.cache import (SparseKVCache, SparseState, cache_bytes, check_cache, init_cache,
                            sparse_decode_step, sparse_prefill)
from less_jax.kernels import (DEFAULT_DROPOUT, DEFAULT_HIDDEN, DEFAULT_RANK,
                              KernelParams, init_kernels, kernel_rank, phi, psi)
from less_jax.parallel import (attention_logits, full_causal_attention,
                               less_attention_parallel, loss_positions,
                               policy_scan, sparse_mask)
from less_jax.policies import (H2O, POLICY_NAMES, LambdaMask, Policy,
                               PolicyError, SlidingWindow, baseline_plus, h2o,
                               insert_token, lambda_mask, make_policy,
                               sliding_window)
from less_jax.state import (LR_FLOOR, fold_in, init_state, less_combine,
                            less_norm, safe_log)

__all__ = [
    "SparseKVCache", "SparseState", "cache_bytes", "check_cache", "init_cache",
    "sparse_decode_step", "sparse_prefill",
    "DEFAULT_DROPOUT", "DEFAULT_HIDDEN", "DEFAULT_RANK", "KernelParams",
    "init_kernels", "kernel_rank", "phi", "psi",
    "attention_logits", "full_causal_attention", "less_attention_parallel",
    "loss_positions", "policy_scan", "sparse_mask",
    "H2O", "POLICY_NAMES", "LambdaMask", "Policy", "PolicyError",
    "SlidingWindow", "baseline_plus", "h2o", "insert_token", "lambda_mask",
    "make_policy",
    "sliding_window",
    "LR_FLOOR", "fold_in", "init_state", "less_combine", "less_norm", "safe_log",
]

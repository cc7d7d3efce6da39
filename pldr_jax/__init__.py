"""pldr-jax: PLDR-LLM (Power Law Graph Attention, G-cache) in JAX.

`pldr_jax.load(path)` loads a trained run or a published checkpoint
(`pldr_jax.runs`); the model, decoding and training live in the submodules
(see docs/architecture.md).
"""

from pldr_jax.runs import LoadedModel, load

__all__ = ["load", "LoadedModel"]

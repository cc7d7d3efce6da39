"""Inference: the decode caches (`kv_cache`), prefill and the decode step on them
(`decode`), and sampling (`generate`: `generate`, `stream`, the cache specs).

Import the modules themselves (`from pldr_jax.inference import generate`); this
package re-exports nothing, so every name has one home."""

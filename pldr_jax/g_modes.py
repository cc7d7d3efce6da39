"""Constant G_LM tensors for the fixed-G ablations: identity, random, transferred.

In these modes the model has no metric learner or power-law parameters and G_LM
is a constant [L, H, dk, dk] passed as `g_lm` to forward/prefill (never
trained, never donated). Identity needs no array (g_lm=None means G = I).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax.config import PLDRConfig
from pldr_jax.errors import GShapeError


def g_shape(config: PLDRConfig) -> tuple[int, int, int, int]:
  return (config.num_layers, config.num_heads, config.head_dim, config.head_dim)


def identity_g(config: PLDRConfig, dtype=jnp.float32) -> jax.Array:
  """[L, H, dk, dk] identity (the explicit form of SDPA)."""
  eye = jnp.eye(config.head_dim, dtype=dtype)
  return jnp.broadcast_to(eye, g_shape(config))


def random_g(config: PLDRConfig, key: jax.Array, dtype=jnp.float32) -> jax.Array:
  """[L, H, dk, dk] with i.i.d. N(0, 1/dk) entries: keeps |q G| close to |q|."""
  return jax.random.normal(key, g_shape(config), dtype) / np.sqrt(config.head_dim)


def check_g(config: PLDRConfig, g, name: str = "G_LM") -> jax.Array:
  """Validate a G_LM of shape [L, H, dk, dk], [L, B, H, dk, dk] (one per sequence)
  or [L, B, S, H, dk, dk] (one per query position, as a causal metric builds)."""
  g = jnp.asarray(g)
  want = g_shape(config)
  ok = (g.ndim == 4 and g.shape == want) or (
      g.ndim in (5, 6) and g.shape[0] == want[0] and g.shape[-3:] == want[1:])
  if not ok:
    raise GShapeError(
        f"{name} has shape {tuple(g.shape)} but this model needs [layers, heads, dk, dk] = "
        f"{list(want)} (or [layers, batch, heads, dk, dk], [layers, batch, seq, heads, dk, dk])")
  if not jnp.issubdtype(g.dtype, jnp.floating):
    raise GShapeError(f"{name} must be floating point, got {g.dtype}")
  return g


def load_transferred_g(config: PLDRConfig, source) -> jax.Array:
  """A transferred G_LM from an array or a .npy path, checked against the config."""
  if isinstance(source, (str, os.PathLike)):
    if not os.path.exists(source):
      raise FileNotFoundError(f"transferred G_LM file not found: {source}")
    source = np.load(source)
  return check_g(config, source, "transferred G_LM")


def make_fixed_g(config: PLDRConfig, key: jax.Array | None = None, source=None):
  """The constant G for config.g_mode: None (learned, identity), random, or transferred."""
  if config.g_mode in ("learned", "identity"):
    return None
  if config.g_mode == "random":
    if key is None:
      raise ValueError("g_mode='random' needs a PRNG key to draw G_LM")
    return random_g(config, key)
  if source is None:
    raise ValueError("g_mode='transferred' needs a G_LM array or .npy path (source=...)")
  return load_transferred_g(config, source)

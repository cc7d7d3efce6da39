"""Static model configuration for PLDR-LLM.

`PLDRConfig` is a frozen (hashable) dataclass so it can be passed to `jax.jit`
as a static argument. Gin binds it only at the entry points in `experiments/`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from pldr_jax import errors

GMode = Literal["learned", "identity", "random", "transferred"]
G_MODES = ("learned", "identity", "random", "transferred")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


ConfigError = errors.ConfigError  # the one error hierarchy: pldr_jax.errors


@dataclasses.dataclass(frozen=True)
class PLDRConfig:
  """Every hyperparameter of a PLDR-LLM decoder (see docs/pldr.md).

  Attributes:
    vocab_size: V, size of the embedding and LM head.
    d_model: d = num_heads * head_dim.
    num_heads: H.
    num_layers: number of decoder layers.
    d_ff: hidden width of the SwiGLU feed-forward network.
    a_dff: hidden width of the metric learner's GLUs (dk -> a_dff -> dk).
    num_res_units: residual units of the metric learner (2 GLUs each).
    max_len: context length (longest sequence the model accepts).
    param_dtype: dtype parameters are stored in.
    compute_dtype: dtype of matmuls; the power-law step, softmax and loss run
      in at least float32 whatever this is.
    g_mode: "learned" (full PLGA), "identity" (= SDPA), "random" or
      "transferred" (a constant G_LM given from outside; no metric learner or
      power-law parameters exist in these modes).
    causal_metric: build A at position t from queries <= t only (the reference
      sums over the whole sequence).
    ln_eps: LayerNorm epsilon.
    rope_base: rotary embedding base.
    rope_interleaved: rotary pairs (x[2i], x[2i+1]) as the authors' code (True,
      the Hugging Face port's `reference_rope=true`) or (x[i], x[i + dk/2]),
      rotate_half (False, `reference_rope=false`). Same weights, other outputs.
  """

  vocab_size: int = 32000
  d_model: int = 896
  num_heads: int = 14
  num_layers: int = 5
  d_ff: int = 2389
  a_dff: int = 170
  num_res_units: int = 8
  max_len: int = 1024
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  g_mode: GMode = "learned"
  causal_metric: bool = False
  ln_eps: float = 1e-6
  rope_base: float = 10000.0
  rope_interleaved: bool = True

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "num_heads", "num_layers", "d_ff",
                 "a_dff", "max_len"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(f"PLDRConfig.{name} must be a positive integer, got {value!r}")
    if not isinstance(self.num_res_units, (int, np.integer)) or self.num_res_units < 0:
      raise ConfigError(
          f"PLDRConfig.num_res_units must be a non-negative integer, got {self.num_res_units!r}")
    if self.d_model % self.num_heads:
      raise ConfigError(
          f"PLDRConfig.d_model={self.d_model} is not divisible by "
          f"num_heads={self.num_heads}")
    if self.head_dim % 2:
      raise ConfigError(
          f"head_dim = d_model/num_heads = {self.head_dim} must be even for the "
          "rotary embedding")
    if not isinstance(self.rope_interleaved, (bool, np.bool_)):
      raise ConfigError(
          f"PLDRConfig.rope_interleaved must be True or False, got {self.rope_interleaved!r}")
    if self.g_mode not in G_MODES:
      raise ConfigError(f"PLDRConfig.g_mode={self.g_mode!r} is not one of {G_MODES}")
    for name in ("param_dtype", "compute_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ConfigError(
            f"PLDRConfig.{name}={getattr(self, name)!r} is not one of {_DTYPES}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def learned_g(self) -> bool:
    """True when G_LM is computed by the metric learner and power-law step."""
    return self.g_mode == "learned"

  def replace(self, **kwargs) -> "PLDRConfig":
    unknown = set(kwargs) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise ConfigError(f"unknown PLDRConfig field(s): {sorted(unknown)}")
    return dataclasses.replace(self, **kwargs)


def pldrv51_110m(**overrides) -> PLDRConfig:
  """The published PLDRv51-110M configuration (109,689,362 parameters)."""
  return PLDRConfig().replace(**overrides)


def tiny(**overrides) -> PLDRConfig:
  """A few-thousand-parameter config for tests (2 layers, 2 heads, dk 8)."""
  base = PLDRConfig(vocab_size=64, d_model=16, num_heads=2, num_layers=2,
                    d_ff=24, a_dff=12, num_res_units=2, max_len=32)
  return base.replace(**overrides)


PRESETS = {"pldrv51_110m": pldrv51_110m, "tiny": tiny}


def preset(name: str, **overrides) -> PLDRConfig:
  if name not in PRESETS:
    raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name](**overrides)

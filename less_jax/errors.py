"""The errors less_jax raises on purpose: subclasses of `pldr_jax.errors.PldrError`.

    except pldr_jax.errors.PldrError      # anything pldr_jax or less_jax refused

Arrays of the wrong shape or dtype (q, k, v, lengths, tokens, masks) raise
pldr_jax's `InputError`, and a model config that is not a `PLDRConfig` its
`ConfigError`; what is LESS's own has a class here. Each also derives from
ValueError, so `except ValueError` code keeps working.
"""

from __future__ import annotations

from pldr_jax.errors import PldrError

__all__ = ["PolicyError", "KernelError", "KernelLoadError", "SparseStateError"]


class PolicyError(PldrError, ValueError):
  """A sparse KV-cache policy that cannot work (unknown name, budgets, context)."""


class KernelError(PldrError, ValueError):
  """phi / psi kernels that do not fit the attention (type, shapes, head width, rank)."""


class KernelLoadError(KernelError):
  """Saved LESS kernels that cannot be loaded or do not fit the model / policy."""


class SparseStateError(PldrError, ValueError):
  """A sparse cache, LESS state or G-cache that is not the one this model / batch needs."""

"""Read and write .safetensors files with the `safetensors` package, bfloat16 included.

Its NumPy API has no bfloat16 before 0.5, so BF16 tensors go through its Flax
API (read: a JAX bfloat16 array -> NumPy ml_dtypes.bfloat16; write: JAX
arrays), everything else through NumPy.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from pldr_jax.compat.unwrap import format_keys, to_numpy
from pldr_jax.errors import CheckpointError

__all__ = ["read_safetensors", "write_safetensors"]


def _safetensors_error_types() -> tuple[type[BaseException], ...]:
  import safetensors
  return (safetensors.SafetensorError, ValueError, OverflowError)


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """A .safetensors file -> {name: NumPy array}, each in the file's dtype (BF16 as
  ml_dtypes.bfloat16). Raises CheckpointError 'not a safetensors file: PATH (...)'."""
  from safetensors import safe_open
  path = os.fspath(path)
  try:
    with safe_open(path, framework="np") as f:
      keys = list(f.keys())
      bf16 = {k for k in keys if f.get_slice(k).get_dtype() == "BF16"}
      out = {k: np.array(f.get_tensor(k)) for k in keys if k not in bf16}
    if bf16:
      cpu = jax.devices("cpu")[0]
      with jax.default_device(cpu), safe_open(path, framework="flax") as f:
        for k in bf16:
          out[k] = np.array(f.get_tensor(k))
  except _safetensors_error_types() as e:
    raise CheckpointError(f"not a safetensors file: {path} ({e})") from e
  return {k: out[k] for k in keys}


def write_safetensors(tensors: Mapping[str, Any], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
  """{name: NumPy / JAX / torch array} -> a .safetensors file (dtypes kept)."""
  path = os.fspath(path)
  arrays = {k: np.ascontiguousarray(to_numpy(v)) for k, v in tensors.items()}
  md = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
  if not any(a.dtype == ml_dtypes.bfloat16 for a in arrays.values()):
    import safetensors.numpy
    safetensors.numpy.save_file(arrays, path, metadata=md)
    return
  wide = sorted(k for k, a in arrays.items() if a.dtype.itemsize == 8)
  if wide and not jax.config.jax_enable_x64:
    raise CheckpointError(
        f"{path}: bfloat16 tensors are written through safetensors' Flax API, and the "
        f"64-bit tensors next to them ({format_keys(wide, 3)}) need "
        "jax.config.update('jax_enable_x64', True); or cast them (dtype=...)")
  import safetensors.flax
  cpu = jax.devices("cpu")[0]
  safetensors.flax.save_file({k: jax.device_put(a, cpu) for k, a in arrays.items()}, path,
                             metadata=md)

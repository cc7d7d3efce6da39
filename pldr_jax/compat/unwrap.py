"""A loaded object -> a flat state dict {name: tensor}, and the tensors as NumPy.

Torch code saves a model's weights inside wrappers: the authors' training dict
{'model_state_dict': sd, 'optimizer_state_dict': ..., 'loss', 'accuracy'}, their
DCP AppState {'app': {'model': sd, 'optim': ...}}, {'model': sd} / {'state_dict':
sd}, a DDP 'module.' or torch.compile '_orig_mod.' prefix, FSDP wrapper segments.
`unwrap_state_dict` undoes them all, and says what an object is when it holds no
PLDR-LLM weights (an optimizer state, hyperparameters, another model).
`to_numpy`, `np_dtype` and `dtype_name` handle NumPy, JAX and torch tensors alike
(bfloat16 as ml_dtypes.bfloat16).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import ml_dtypes
import numpy as np

from pldr_jax.errors import CheckpointError

__all__ = ["unwrap_state_dict", "to_numpy", "np_dtype", "dtype_name", "format_keys",
           "PARAM_DTYPES", "WHAT_TO_LOAD"]


def to_numpy(x) -> np.ndarray:
  """A NumPy view/copy of a NumPy, JAX or torch array (bfloat16 kept as ml_dtypes.bfloat16)."""
  if isinstance(x, np.ndarray):
    return x
  if type(x).__module__.startswith("torch"):
    import torch  # only reachable when a torch tensor was passed
    t = x.detach().cpu()
    if t.dtype == torch.bfloat16:
      return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()
  return np.asarray(x)


# 'model_state_dict': the authors' torch.save wrapper ({'model_state_dict',
# 'optimizer_state_dict', 'loss', 'accuracy'}); 'app' -> 'model': their DCP
# AppState ({'app': {'model': ..., 'optim': ...}}).
_WRAPPER_KEYS = ("model_state_dict", "model", "state_dict", "app")
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPED_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

WHAT_TO_LOAD = (
    "pass a PLDR-LLM model checkpoint: the authors' .pth (torch.save of "
    "{'model_state_dict': ...} or a bare state dict), their *_dcp folder, a .safetensors "
    "file, or a Hugging Face folder (config.json + model.safetensors)")


def _describe(obj: Any) -> str:
  """What a non-model object looks like, for error messages."""
  if isinstance(obj, Mapping):
    keys = [str(k) for k in obj]
    if {"state", "param_groups"} <= set(keys):
      return "an optimizer state (torch.optim state_dict: 'state', 'param_groups'), not weights"
    if "optimizer_state_dict" in keys or "optim" in keys:
      return (f"a training checkpoint without model weights (keys: {format_keys(keys, 8)}; "
              "'model_state_dict' is missing or empty)")
    n_tensors = sum(hasattr(v, "shape") and hasattr(v, "dtype") for v in obj.values())
    if not n_tensors:
      return f"a dict without tensors (keys: {format_keys(keys, 8)}): hyperparameters or metrics?"
    return (f"{n_tensors} tensors with no PLDR-LLM names (such as {format_keys(keys, 4)}): "
            "another model?")
  return f"a {type(obj).__name__}, not a state dict"


def _is_model_dict(sd: Mapping) -> bool:
  return any(str(k).startswith(("decoder.", "final_layer.")) for k in sd)


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwrap {'model_state_dict': sd} / {'model': sd} / {'state_dict': sd} / DCP's
  {'app': {'model': sd}}, strip a DDP 'module.' / torch.compile '_orig_mod.' prefix
  and FSDP wrapper segments. Raises CheckpointError saying what the object is
  when it holds no PLDR-LLM weights (an optimizer state, hyperparameters, ...)."""
  sd = state_dict
  for _ in range(4):
    if not isinstance(sd, Mapping):
      raise CheckpointError(f"the checkpoint holds {_describe(sd)}; {WHAT_TO_LOAD}")
    wrapped = [k for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping) and sd[k]]
    if wrapped and not _is_model_dict(sd):
      sd = sd[wrapped[0]]
    else:
      break
  sd = dict(sd)
  for prefix in _PREFIXES:
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  if any(seg in k for k in sd for seg in _WRAPPED_SEGMENTS):
    for seg in _WRAPPED_SEGMENTS:
      sd = {k.replace(seg, ""): v for k, v in sd.items()}
  if sd and not _is_model_dict(sd):
    raise CheckpointError(f"the checkpoint holds {_describe(sd)}; {WHAT_TO_LOAD}")
  return sd


def format_keys(keys: Iterable[str], limit: int = 12) -> str:
  """Sorted names, the first `limit` shown, for error messages."""
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def np_dtype(dtype) -> np.dtype:
  """A dtype or its name -> the NumPy dtype ("bfloat16" -> ml_dtypes.bfloat16)."""
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


PARAM_DTYPES = ("float64", "float32", "bfloat16", "float16")  # widest first


def dtype_name(x) -> str | None:
  """'float32' / 'bfloat16' / ... of a NumPy, JAX, torch array or ShapeDtypeStruct."""
  dt = getattr(x, "dtype", None)
  if dt is None:
    return None
  name = str(dt).removeprefix("torch.")
  if name not in PARAM_DTYPES:
    try:
      name = np.dtype(dt).name
    except TypeError:
      return None
  return name if name in PARAM_DTYPES else None

"""Checkpoint files and folders -> {name: NumPy array}, and our parameters -> a file.

    load_state_dict(path)               .safetensors / .pth / .pt / .bin / a DCP folder
                                        / a Hugging Face folder's weights
    save_state_dict(params, config, path)  .safetensors / .pth (optionally in the
                                        authors' {'model_state_dict': ...} wrapper)

`.pth` files and DCP folders need `torch` (the `torch` extra); torch.load runs
with weights_only=True, and a file that holds no model says what it holds.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from pldr_jax.compat.keys import params_to_state_dict
from pldr_jax.compat.safetensors_io import read_safetensors, write_safetensors
from pldr_jax.compat.unwrap import WHAT_TO_LOAD, to_numpy, unwrap_state_dict
from pldr_jax.config import PLDRConfig
from pldr_jax.errors import CheckpointError

__all__ = ["load_state_dict", "save_state_dict", "load_folder", "torch_tensors"]


_TORCH_SUFFIXES = (".pth", ".pt", ".bin")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("install torch to read .pth / .pt / .bin checkpoints and DCP folders "
                      "(pip install -e '.[torch]'), or convert them to .safetensors") from e
  return torch


def _torch_load(path: str):
  torch = _import_torch()
  with open(path, "rb") as f:
    magic = f.read(4)
  if not (magic.startswith(b"PK") or magic[:1] == b"\x80"):  # a zip (torch.save) or a pickle
    raise CheckpointError(f"{path}: not a torch.save file (it starts with {magic!r}); "
                          f"{WHAT_TO_LOAD}")
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - torch raises many types; all mean "not loadable"
    msg = str(e)
    if "weights_only" in msg or "Weights only" in msg or "Unsupported global" in msg:
      what = ("a pickle of Python objects that safe (weights_only) loading refuses: a "
              "tokenizer, a hyperparameter dict (such as the authors' *_hparams.pkl) or a "
              "whole pickled model? If it is a model you trust, load it in PyTorch and "
              "torch.save(model.state_dict(), ...)")
    else:
      what = f"not a torch.save file ({type(e).__name__}: {msg.splitlines()[0] if msg else ''})"
    raise CheckpointError(f"{path}: {what}; {WHAT_TO_LOAD}") from e


def _state_dict_of(obj: Any, path: str) -> dict[str, np.ndarray]:
  """A loaded torch object -> {name: NumPy} of its model weights (wrappers undone)."""
  try:
    sd = unwrap_state_dict(obj)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  out = {}
  for k, v in sd.items():
    if not hasattr(v, "shape"):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = np.array(to_numpy(v))
  return out


def _load_dcp(path: str) -> dict[str, np.ndarray]:
  """A torch.distributed.checkpoint folder, read on one CPU process (no process group):
  DCP's own converter to a torch.save file, then a safe torch.load."""
  _import_torch()
  from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "state.pt")
    try:
      dcp_to_torch_save(path, out)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(f"{path}: not a readable DCP folder ({type(e).__name__}: {e})") from e
    return _state_dict_of(_torch_load(out), path)


def load_folder(path: str) -> dict[str, np.ndarray]:
  """A DCP folder (`.metadata`) or a Hugging Face folder's weights (model.safetensors,
  sharded or not, or pytorch_model.bin) -> {name: NumPy array}."""
  if os.path.exists(os.path.join(path, ".metadata")):
    return _load_dcp(path)
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return read_safetensors(os.path.join(path, "model.safetensors"))
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    sd = {}
    for shard in shards:
      sd.update(read_safetensors(os.path.join(path, shard)))
    return sd
  if os.path.exists(os.path.join(path, "pytorch_model.bin")):
    return _state_dict_of(_torch_load(os.path.join(path, "pytorch_model.bin")), path)
  raise CheckpointError(f"{path}: a folder with neither a DCP '.metadata' nor "
                        f"{' / '.join(_HF_WEIGHTS)}; {WHAT_TO_LOAD}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a checkpoint into {name: NumPy array}, each tensor in the file's dtype.

  .safetensors: the `safetensors` package. .pth/.pt/.bin: torch.load
  (weights_only=True) on the CPU; the authors' {'model_state_dict': ...,
  'optimizer_state_dict': ..., 'loss', 'accuracy'} wrapper and {'model': ...} /
  {'state_dict': ...} are unwrapped. A folder: the authors' distributed
  checkpoint (torch.distributed.checkpoint, `.metadata` + `*.distcp`, read on
  one process without a process group), or a Hugging Face folder
  (model.safetensors, sharded or not, or pytorch_model.bin); the port's
  `decoder.past_G_values` buffers come along (g_lm_from_state_dict).
  A file that holds no model (an optimizer state, a tokenizer, a pickle)
  raises CheckpointError saying so and what to pass instead.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if os.path.isdir(path):
    return load_folder(path)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return read_safetensors(path)
  if lower.endswith(_TORCH_SUFFIXES):
    return _state_dict_of(_torch_load(path), path)
  hint = (" (a SentencePiece tokenizer: load it with pldr_jax.data.tokenizer)"
          if lower.endswith((".model", ".vocab")) else "")
  raise CheckpointError(f"{path}: unknown checkpoint format{hint}; {WHAT_TO_LOAD}")


def torch_tensors(sd: Mapping[str, np.ndarray]):
  """{name: NumPy array} -> {name: torch tensor} (bfloat16 kept), as torch.save writes it."""
  torch = _import_torch()
  out = {}
  for k, v in sd.items():
    if v.dtype == ml_dtypes.bfloat16:
      out[k] = torch.from_numpy(np.array(v).view(np.int16)).view(torch.bfloat16)
    else:
      out[k] = torch.from_numpy(np.array(v))
  return out


def save_state_dict(params: Mapping, config: PLDRConfig, path: str | os.PathLike, *,
                    dtype=None, wrap: bool = False) -> dict[str, np.ndarray]:
  """Write our parameters in the published layout to .safetensors or .pth/.pt/.bin.

  dtype: cast every tensor (default: keep the parameters' dtype). wrap=True
  (.pth only) writes the authors' training-script dict {'model_state_dict': sd,
  'optimizer_state_dict': None, 'loss': None, 'accuracy': None}, which their
  `load_model` reads; the default is the bare state dict (what `load_state_dict`
  of PyTorch takes). Returns the state dict written.
  """
  path = os.fspath(path)
  sd = params_to_state_dict(params, config, dtype=dtype)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    write_safetensors(sd, path, metadata={"format": "pt"})
  elif lower.endswith(_TORCH_SUFFIXES):
    torch = _import_torch()
    obj = torch_tensors(sd)
    if wrap:
      obj = {"model_state_dict": obj, "optimizer_state_dict": None, "loss": None,
             "accuracy": None}
    torch.save(obj, path)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                          ".pth, .pt or .bin)")
  return sd

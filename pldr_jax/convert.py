"""Import the authors' PyTorch checkpoints into our parameter pytree, and export back.

The published layout is docs/checkpoints.md: PyTorch module names,
`Linear.weight` stored [out, in] (y = x W^T + b), LayerNorm `weight`/`bias`.
Our pytree (pldr_jax.params) stores dense kernels [in, out] (y = x @ kernel +
bias) and LayerNorm `scale`/`bias`, so every Linear weight is transposed on the
way in and out and nothing else changes.

    state_dict_to_params(sd, config)    PyTorch names -> our pytree
    params_to_state_dict(params, config) our pytree -> PyTorch names (NumPy)
    config_from_state_dict(sd)          infer a PLDRConfig from names and shapes
    load_state_dict(path)               .safetensors / .pth / .pt / .bin -> dict of NumPy
    save_state_dict(params, config, path)  the reverse
    read_safetensors / write_safetensors   a dependency-free safetensors codec

Fixed-G models (g_mode identity / random / transferred) have no metric learner
or power-law tensors: their checkpoints lack every `mha1.layernorm1`,
`mha1.plgatt_layer` and `mha1.reslayerAs` key.

`safetensors` and `torch` are optional: without `safetensors` the own
reader/writer is used; `.pth` files need `torch`.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from typing import Any, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

from pldr_jax.config import PLDRConfig

__all__ = [
    "state_dict_to_params", "params_to_state_dict", "config_from_state_dict",
    "load_state_dict", "save_state_dict", "read_safetensors", "write_safetensors",
    "key_map", "state_dict_shapes", "is_learned_g_key", "CheckpointError",
]


class CheckpointError(ValueError):
  """A state dict or file that does not fit the model; the message names the key(s)."""


# ------------------------------------------------------------------ key layout

# One entry per tensor: (PyTorch key, path into our pytree, transpose).
KeyEntry = tuple[str, tuple, bool]

_LEARNED_G_RE = re.compile(r"\.mha1\.(layernorm1|plgatt_layer|reslayerAs)\.")


def is_learned_g_key(key: str) -> bool:
  """True for the metric-learner / power-law keys that only learned-G models have."""
  return _LEARNED_G_RE.search(key) is not None


def _linear(prefix: str, path: tuple) -> list[KeyEntry]:
  return [(f"{prefix}.weight", path + ("kernel",), True),
          (f"{prefix}.bias", path + ("bias",), False)]


def _layernorm(prefix: str, path: tuple) -> list[KeyEntry]:
  return [(f"{prefix}.weight", path + ("scale",), False),
          (f"{prefix}.bias", path + ("bias",), False)]


def _glu(prefix: str, path: tuple) -> list[KeyEntry]:
  out = []
  for k in (1, 2, 3):
    out += _linear(f"{prefix}.gluw{k}", path + (f"w{k}",))
  return out


_PLGA_NAMES = (("Wlst", "W"), ("blst", "b"), ("pwlst", "P"), ("alst", "a"), ("balst", "b_a"))


def key_map(config: PLDRConfig) -> list[KeyEntry]:
  """The published state-dict keys, in the spec's order, with where each lives in our pytree.

  Returns [(torch_key, pytree_path, transpose)], pytree_path a tuple of dict keys
  and list indices; transpose is True for Linear weights ([out, in] vs [in, out]).
  """
  entries: list[KeyEntry] = [("decoder.embedding.weight", ("embed",), False)]
  entries += _layernorm("decoder.layernorm1", ("ln_embed",))
  for i in range(config.num_layers):
    pre, path = f"decoder.dec_layers.{i}", ("layers", i)
    for name, ours in (("wq", "wq"), ("wk", "wk"), ("wv", "wv"), ("dense", "wo")):
      entries += _linear(f"{pre}.mha1.{name}", path + (ours,))
    if config.learned_g:
      entries += _layernorm(f"{pre}.mha1.layernorm1", path + ("ln_a",))
      for theirs, ours in _PLGA_NAMES:
        entries.append((f"{pre}.mha1.plgatt_layer.{theirs}", path + ("plga", ours), False))
      for j in range(config.num_res_units):
        unit_pre, unit_path = f"{pre}.mha1.reslayerAs.{j}", path + ("res_units", j)
        for g in (0, 1):
          entries += _glu(f"{unit_pre}.denseAs.{g}", unit_path + (f"glu{g + 1}",))
        entries += _layernorm(f"{unit_pre}.layernormA", unit_path + ("ln",))
    entries += _glu(f"{pre}.ffn", path + ("ffn",))
    entries += _layernorm(f"{pre}.layernorm1", path + ("ln1",))
    entries += _layernorm(f"{pre}.layernorm2", path + ("ln2",))
  entries += _linear("final_layer", ("head",))
  return entries


def _get(tree, path: tuple):
  for p in path:
    tree = tree[p]
  return tree


def _our_shapes(config: PLDRConfig) -> dict[tuple, tuple[int, ...]]:
  """Pytree path -> shape, from the ParamSpecs (allocates nothing)."""
  from pldr_jax.params import param_specs, ParamSpec
  specs = param_specs(config)
  flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ParamSpec))
  return {tuple(_path_key(k) for k in path): s.shape for path, s in flat}


def _path_key(k):
  if isinstance(k, jax.tree_util.DictKey):
    return k.key
  if isinstance(k, jax.tree_util.SequenceKey):
    return k.idx
  raise TypeError(f"unexpected pytree key {k!r}")


def state_dict_shapes(config: PLDRConfig) -> dict[str, tuple[int, ...]]:
  """The published key -> PyTorch shape for `config`, in the spec's order."""
  ours = _our_shapes(config)
  return {key: (tuple(reversed(ours[path])) if t else ours[path])
          for key, path, t in key_map(config)}


# ---------------------------------------------------------------- conversions

def _to_numpy(x) -> np.ndarray:
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


_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_PREFIXES = ("module.", "_orig_mod.")


def _normalise(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Unwrap {'model': sd} / {'state_dict': sd} and strip a DDP 'module.' / torch.compile prefix."""
  sd = state_dict
  for _ in range(3):
    if not isinstance(sd, Mapping):
      raise CheckpointError(f"a state dict must be a mapping of names to tensors, got {type(sd)}")
    wrapped = [k for k in _WRAPPER_KEYS if k in sd and isinstance(sd[k], Mapping)]
    if wrapped and not any(str(k).startswith("decoder.") for k in sd):
      sd = sd[wrapped[0]]
    else:
      break
  sd = dict(sd)
  for prefix in _PREFIXES:
    if sd and all(isinstance(k, str) and k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _np_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def check_state_dict(state_dict: Mapping[str, Any], config: PLDRConfig, *,
                     drop_learned_g: bool = False) -> dict[str, Any]:
  """Check names and shapes against `config`; returns the normalised dict (extra learned-G
  keys removed when drop_learned_g). Raises CheckpointError naming every bad key."""
  sd = _normalise(state_dict)
  expected = state_dict_shapes(config)
  unexpected = [k for k in sd if k not in expected]
  missing = [k for k in expected if k not in sd]
  if unexpected and not config.learned_g and all(is_learned_g_key(k) for k in unexpected):
    if not drop_learned_g:
      raise CheckpointError(
          f"the checkpoint has {len(unexpected)} metric-learner / power-law tensors "
          f"({_format_keys(unexpected, 4)}) but config.g_mode={config.g_mode!r} has none: "
          "load it with g_mode='learned', or pass drop_learned_g=True to discard them")
    sd = {k: v for k, v in sd.items() if k in expected}
    unexpected = []
  problems = []
  if missing and config.learned_g and all(is_learned_g_key(k) for k in missing) and not any(
      is_learned_g_key(k) for k in sd):
    problems.append(
        f"the checkpoint has no metric-learner / power-law tensors ({len(missing)} keys such as "
        f"{_format_keys(missing, 3)}): it looks like a fixed-G model; use "
        "config.replace(g_mode='identity'|'random'|'transferred') (config_from_state_dict "
        "does this)")
  elif missing:
    problems.append(f"missing key(s): {_format_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected key(s): {_format_keys(unexpected)}")
  bad_shapes = []
  for key, want in expected.items():
    if key in sd:
      got = tuple(np.shape(sd[key]))
      if got != want:
        bad_shapes.append(f"{key}: expected shape {want}, got {got}")
  if bad_shapes:
    problems.append("shape mismatch: " + "; ".join(bad_shapes[:12]) + (
        f"; ... ({len(bad_shapes) - 12} more)" if len(bad_shapes) > 12 else ""))
  if problems:
    raise CheckpointError("state dict does not fit the config: " + " | ".join(problems))
  return sd


def state_dict_to_params(state_dict: Mapping[str, Any], config: PLDRConfig, *,
                         drop_learned_g: bool = False, dtype=None,
                         to_jax: bool = True) -> dict:
  """A PyTorch state dict (published names) -> our parameter pytree.

  state_dict: name -> NumPy / JAX / torch array ({'model': ...} or
  {'state_dict': ...} wrappers and a 'module.' prefix are accepted).
  Arrays are cast to `dtype` (default config.param_dtype); to_jax=False keeps
  NumPy arrays. A checkpoint with learned-G tensors loaded into a fixed-G
  config raises unless drop_learned_g=True. Raises CheckpointError (a
  ValueError) naming missing, unexpected or wrongly shaped keys.
  """
  sd = check_state_dict(state_dict, config, drop_learned_g=drop_learned_g)
  dt = _np_dtype(dtype or config.param_dtype)
  if to_jax and dt == np.float64 and not jax.config.jax_enable_x64:
    raise CheckpointError("float64 parameters need jax_enable_x64 (or pass to_jax=False)")
  from pldr_jax.params import param_specs, ParamSpec
  params = jax.tree.map(lambda s: None, param_specs(config),
                        is_leaf=lambda x: isinstance(x, ParamSpec))
  for key, path, transpose in key_map(config):
    arr = _to_numpy(sd[key])
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
      raise CheckpointError(f"{key}: expected a floating-point tensor, got dtype {arr.dtype}")
    if transpose:
      arr = arr.T
    arr = np.ascontiguousarray(arr.astype(dt, copy=False))
    parent = _get(params, path[:-1])
    parent[path[-1]] = jax.numpy.asarray(arr) if to_jax else arr
  return params


def params_to_state_dict(params: Mapping, config: PLDRConfig, *,
                         dtype=None) -> dict[str, np.ndarray]:
  """Our parameter pytree -> {published name: NumPy array in the PyTorch layout}.

  dtype: cast every tensor to it (default: keep each array's dtype; bfloat16
  comes out as ml_dtypes.bfloat16). Raises CheckpointError for a missing or
  wrongly shaped parameter.
  """
  ours = _our_shapes(config)
  dt = None if dtype is None else _np_dtype(dtype)
  out, problems = {}, []
  for key, path, transpose in key_map(config):
    try:
      leaf = _get(params, path)
    except (KeyError, IndexError, TypeError):
      problems.append(f"missing parameter {'/'.join(map(str, path))} (for {key})")
      continue
    arr = _to_numpy(leaf)
    if tuple(arr.shape) != ours[path]:
      problems.append(f"{'/'.join(map(str, path))} (for {key}): expected shape {ours[path]}, "
                      f"got {tuple(arr.shape)}")
      continue
    if transpose:
      arr = arr.T
    if dt is not None:
      arr = arr.astype(dt, copy=False)
    out[key] = np.ascontiguousarray(arr)
  n_leaves = len(jax.tree.leaves(params))
  if not problems and n_leaves != len(out):
    problems.append(f"the parameter tree has {n_leaves} arrays but config "
                    f"g_mode={config.g_mode!r} maps {len(out)}: extra parameters")
  if problems:
    raise CheckpointError("parameters do not fit the config: " + "; ".join(problems))
  return out


_LAYER_RE = re.compile(r"^decoder\.dec_layers\.(\d+)\.")
_UNIT_RE = re.compile(r"^decoder\.dec_layers\.0\.mha1\.reslayerAs\.(\d+)\.")


def config_from_state_dict(state_dict: Mapping[str, Any], **overrides) -> PLDRConfig:
  """Infer a PLDRConfig from the names and shapes of a published state dict.

  Inferred: vocab_size, d_model (embedding), num_layers, d_ff, and for
  learned-G checkpoints num_heads (Wlst's first dim), a_dff, num_res_units,
  g_mode='learned'. Without learned-G keys the model is fixed-G: g_mode
  defaults to 'identity' and num_heads cannot be read from any shape, so it
  must be given (num_heads=...). Other fields (max_len, dtypes, g_mode for the
  fixed modes, ...) come from `overrides` or the PLDRConfig defaults; an
  override contradicting an inferred value raises CheckpointError.
  """
  sd = _normalise(state_dict)

  def shape(key):
    if key not in sd:
      raise CheckpointError(f"cannot infer the config: missing key {key}")
    return tuple(np.shape(sd[key]))
  vocab, d = shape("decoder.embedding.weight")
  layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER_RE.match(k))})
  if not layers:
    raise CheckpointError("cannot infer the config: no decoder.dec_layers.{i}.* keys")
  inferred: dict[str, Any] = {
      "vocab_size": vocab, "d_model": d, "num_layers": layers[-1] + 1,
      "d_ff": shape("decoder.dec_layers.0.ffn.gluw1.weight")[0]}
  learned = any(is_learned_g_key(k) for k in sd)
  if learned:
    inferred["num_heads"] = shape("decoder.dec_layers.0.mha1.plgatt_layer.Wlst")[0]
    units = sorted({int(m.group(1)) for k in sd if (m := _UNIT_RE.match(k))})
    inferred["num_res_units"] = units[-1] + 1 if units else 0
    if units:
      inferred["a_dff"] = shape(
          "decoder.dec_layers.0.mha1.reslayerAs.0.denseAs.0.gluw1.weight")[0]
  fields = dict(overrides)
  for name, value in inferred.items():
    if name in fields and fields[name] != value:
      raise CheckpointError(f"override {name}={fields[name]!r} contradicts the checkpoint, "
                            f"which has {name}={value!r}")
    fields[name] = int(value)
  if learned:
    fields.setdefault("g_mode", "learned")
  else:
    if fields.get("g_mode", "identity") == "learned":
      raise CheckpointError("g_mode='learned' but the checkpoint has no metric-learner / "
                            "power-law tensors (a fixed-G model)")
    fields.setdefault("g_mode", "identity")
    if "num_heads" not in fields:
      raise CheckpointError(
          "a fixed-G checkpoint (no plgatt_layer keys) does not record the number of heads: "
          "pass num_heads=... (the published models use head_dim 64, i.e. "
          f"num_heads={d // 64 if d % 64 == 0 else '?'})")
  return PLDRConfig(**fields)


# ------------------------------------------------------------------ safetensors

_ST_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
# dtypes the safetensors package's NumPy API handles (it has no bfloat16).
_PACKAGE_DTYPES = {"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"}
_MAX_HEADER = 100 * 1024 * 1024


def _st_name(dtype: np.dtype) -> str:
  if dtype == ml_dtypes.bfloat16:
    return "BF16"
  for name, dt in _ST_DTYPES.items():
    if name != "BF16" and dt.kind == dtype.kind and dt.itemsize == dtype.itemsize:
      return name
  raise CheckpointError(f"dtype {dtype} cannot be written to safetensors")


def _read_st_header(f, path) -> tuple[dict, int]:
  raw = f.read(8)
  if len(raw) != 8:
    raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
  (n,) = struct.unpack("<Q", raw)
  if n > _MAX_HEADER:
    raise CheckpointError(f"{path}: not a safetensors file (header length {n})")
  try:
    header = json.loads(f.read(n).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: not a safetensors file (bad JSON header: {e})") from e
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: safetensors header is not a JSON object")
  return header, 8 + n


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a .safetensors file without the safetensors package (F64/F32/F16/BF16 and ints)."""
  size = os.path.getsize(path)
  out = {}
  with open(path, "rb") as f:
    header, base = _read_st_header(f, path)
    for name, info in header.items():
      if name == "__metadata__":
        continue
      try:
        dtype_name, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
      except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed header entry for {name}: {info!r}") from e
      if dtype_name not in _ST_DTYPES:
        raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {dtype_name}")
      dt = _ST_DTYPES[dtype_name]
      count = int(np.prod(shape, dtype=np.int64))
      if end - start != count * dt.itemsize or start < 0 or base + end > size:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets {[start, end]} that do "
                              f"not fit shape {shape} of {dtype_name} (file size {size})")
      f.seek(base + start)
      arr = np.frombuffer(f.read(end - start), dtype=dt, count=count)
      out[name] = arr.astype(dt.newbyteorder("=")).reshape(shape)  # native order, own copy
  return out


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
  """Write a .safetensors file without the safetensors package."""
  header: dict[str, Any] = {}
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  arrays, offset = [], 0
  for name, value in tensors.items():
    arr = np.ascontiguousarray(_to_numpy(value))
    if arr.dtype != ml_dtypes.bfloat16 and arr.dtype.itemsize > 1:
      arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    elif arr.dtype == ml_dtypes.bfloat16 and sys.byteorder == "big":
      arr = arr.byteswap()
    header[name] = {"dtype": _st_name(arr.dtype), "shape": list(arr.shape),
                    "data_offsets": [offset, offset + arr.nbytes]}
    arrays.append(arr)
    offset += arr.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
  blob += b" " * (-len(blob) % 8)  # pad so the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for arr in arrays:
      f.write(arr.tobytes())


def _safetensors_numpy():
  try:
    import safetensors.numpy as stn
  except ImportError:
    return None
  return stn


# ------------------------------------------------------------------ files

_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def _import_torch():
  try:
    import torch
  except ImportError as e:
    raise ImportError("install torch to read .pth / .pt / .bin checkpoints "
                      "(or convert them to .safetensors)") from e
  return torch


def load_state_dict(path: str | os.PathLike, *, use_package: bool = True) -> dict[str, np.ndarray]:
  """Read a checkpoint file into {name: NumPy array}.

  .safetensors: the `safetensors` package's NumPy API when installed and every
  tensor is F64/F32/F16/int (use_package=False forces the own reader, which also
  reads BF16 as ml_dtypes.bfloat16). .pth/.pt/.bin: torch.load(weights_only=True)
  on the CPU; a dict wrapped under 'model' / 'state_dict' is unwrapped.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  lower = path.lower()
  if lower.endswith(".safetensors"):
    stn = _safetensors_numpy() if use_package else None
    if stn is not None:
      with open(path, "rb") as f:
        header, _ = _read_st_header(f, path)
      if all(v.get("dtype") in _PACKAGE_DTYPES for k, v in header.items() if k != "__metadata__"):
        return {k: np.array(v) for k, v in stn.load_file(path).items()}
    return read_safetensors(path)
  if lower.endswith(_TORCH_SUFFIXES):
    torch = _import_torch()
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = _normalise(obj)
    out = {}
    for k, v in sd.items():
      if not isinstance(v, torch.Tensor):
        raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
      out[k] = np.array(_to_numpy(v))
    return out
  raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                        ".pth, .pt or .bin)")


def save_state_dict(params: Mapping, config: PLDRConfig, path: str | os.PathLike, *,
                    dtype=None, use_package: bool = True) -> dict[str, np.ndarray]:
  """Write our parameters in the published layout to .safetensors or .pth/.pt/.bin.

  .safetensors uses the `safetensors` package where installed and the dtype is
  not bfloat16, else the own writer; .pth needs torch. Returns the state dict written.
  """
  path = os.fspath(path)
  sd = params_to_state_dict(params, config, dtype=dtype)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    stn = _safetensors_numpy() if use_package else None
    if stn is not None and all(_st_name(v.dtype) in _PACKAGE_DTYPES for v in sd.values()):
      stn.save_file(sd, path, metadata={"format": "pt"})
    else:
      write_safetensors(sd, path, metadata={"format": "pt"})
  elif lower.endswith(_TORCH_SUFFIXES):
    torch = _import_torch()
    tensors = {}
    for k, v in sd.items():
      if v.dtype == ml_dtypes.bfloat16:
        tensors[k] = torch.from_numpy(np.array(v).view(np.int16)).view(torch.bfloat16)
      else:
        tensors[k] = torch.from_numpy(np.array(v))
    torch.save(tensors, path)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                          ".pth, .pt or .bin)")
  return sd

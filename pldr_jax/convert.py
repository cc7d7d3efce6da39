"""Import the published checkpoints into our parameter pytree, and export back.

Every format users have of the authors' PLDR-LLM (docs/checkpoints.md):

    load_checkpoint(path)               any of them -> (config, params, g_lm or None)
    load_hf(folder) / save_hf(folder, params, config, g_lm=None)
                                        a Hugging Face folder (PldrllmForCausalLM:
                                        config.json + model.safetensors)
    load_state_dict(path)               .safetensors / .pth / .pt / .bin / a DCP folder
                                        / a Hub folder -> {name: NumPy array}
    save_state_dict(params, config, path)  .safetensors / .pth (optionally in the
                                        authors' {'model_state_dict': ...} wrapper)
    state_dict_to_params(sd, config)    PyTorch names -> our pytree
    params_to_state_dict(params, config) our pytree -> PyTorch names (NumPy)
    config_from_state_dict(sd)          infer a PLDRConfig (param_dtype included)
                                        from names, shapes and dtypes
    read_safetensors / write_safetensors   the `safetensors` package, bfloat16 included

The published layout: PyTorch module names, `Linear.weight` stored [out, in]
(y = x W^T + b), LayerNorm `weight`/`bias`. Our pytree (pldr_jax.params) stores
dense kernels [in, out] (y = x @ kernel + bias) and LayerNorm `scale`/`bias`, so
every Linear weight is transposed on the way in and out and nothing else
changes. The Hugging Face port uses exactly these names and shapes.

Fixed-G models (g_mode identity / random / transferred) have no metric learner
or power-law tensors: their checkpoints lack every `mha1.layernorm1`,
`mha1.plgatt_layer` and `mha1.reslayerAs` key; the port stores their constant G
as the buffer `decoder.past_G_values` [L, 3, 1, H, dk, dk] ([:, 2] is G_LM).

The dtype of the file is kept unless asked otherwise (an override
`param_dtype=...`, or an explicit config). `.pth` files and DCP folders need
`torch` (the `torch` extra).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Iterable, Mapping

import jax
import ml_dtypes
import numpy as np

from pldr_jax import errors
from pldr_jax.config import PLDRConfig

__all__ = [
    "state_dict_to_params", "params_to_state_dict", "config_from_state_dict",
    "load_state_dict", "save_state_dict", "read_safetensors", "write_safetensors",
    "load_checkpoint", "load_hf", "save_hf", "hf_config", "config_from_hf",
    "g_lm_from_state_dict", "key_map", "state_dict_shapes", "is_learned_g_key",
    "CheckpointError",
]


CheckpointError = errors.CheckpointError  # the one error hierarchy: pldr_jax.errors


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
  specs = param_specs(config, stacked=False)
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


# 'model_state_dict': the authors' torch.save wrapper ({'model_state_dict',
# 'optimizer_state_dict', 'loss', 'accuracy'}); 'app' -> 'model': their DCP
# AppState ({'app': {'model': ..., 'optim': ...}}).
_WRAPPER_KEYS = ("model_state_dict", "model", "state_dict", "app")
_PREFIXES = ("module.", "_orig_mod.")
_WRAPPED_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
# Buffers the Hugging Face port saves for fixed-G models (not parameters).
G_VALUES_KEY = "decoder.past_G_values"
G_STATUS_KEY = "decoder.past_G_values_status"
_G_BUFFER_KEYS = (G_VALUES_KEY, G_STATUS_KEY)

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
      return (f"a training checkpoint without model weights (keys: {_format_keys(keys, 8)}; "
              "'model_state_dict' is missing or empty)")
    n_tensors = sum(hasattr(v, "shape") and hasattr(v, "dtype") for v in obj.values())
    if not n_tensors:
      return f"a dict without tensors (keys: {_format_keys(keys, 8)}): hyperparameters or metrics?"
    return (f"{n_tensors} tensors with no PLDR-LLM names (such as {_format_keys(keys, 4)}): "
            "another model?")
  return f"a {type(obj).__name__}, not a state dict"


def _is_model_dict(sd: Mapping) -> bool:
  return any(str(k).startswith(("decoder.", "final_layer.")) for k in sd)


def _normalise(state_dict: Mapping[str, Any]) -> dict[str, Any]:
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


def _format_keys(keys: Iterable[str], limit: int = 12) -> str:
  keys = sorted(keys)
  shown = ", ".join(keys[:limit])
  return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _np_dtype(dtype) -> np.dtype:
  return np.dtype(ml_dtypes.bfloat16) if str(dtype) == "bfloat16" else np.dtype(dtype)


_PARAM_DTYPES = ("float64", "float32", "bfloat16", "float16")  # widest first


def _dtype_name(x) -> str | None:
  """'float32' / 'bfloat16' / ... of a NumPy, JAX, torch array or ShapeDtypeStruct."""
  dt = getattr(x, "dtype", None)
  if dt is None:
    return None
  name = str(dt).removeprefix("torch.")
  if name not in _PARAM_DTYPES:
    try:
      name = np.dtype(dt).name
    except TypeError:
      return None
  return name if name in _PARAM_DTYPES else None


def infer_param_dtype(state_dict: Mapping[str, Any]) -> str | None:
  """The floating dtype of the checkpoint's parameters ('float32', 'bfloat16', 'float16',
  'float64'); the widest one if they are mixed; None if none is floating."""
  names = {_dtype_name(v) for k, v in _normalise(state_dict).items() if k not in _G_BUFFER_KEYS}
  names.discard(None)
  return next((n for n in _PARAM_DTYPES if n in names), None)


def check_state_dict(state_dict: Mapping[str, Any], config: PLDRConfig, *,
                     drop_learned_g: bool = False) -> dict[str, Any]:
  """Check names and shapes against `config`; returns the normalised dict (extra learned-G
  keys removed when drop_learned_g). Raises CheckpointError naming every bad key."""
  sd = {k: v for k, v in _normalise(state_dict).items() if k not in _G_BUFFER_KEYS}
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
    raise CheckpointError(
        "float64 parameters need jax.config.update('jax_enable_x64', True) before loading; "
        "or load them as float32: param_dtype='float32' (config_from_state_dict / load_hf / "
        "load_checkpoint override), dtype='float32' here, or to_jax=False for NumPy arrays")
  from pldr_jax.params import param_specs, ParamSpec, stack_layers
  params = jax.tree.map(lambda s: None, param_specs(config, stacked=False),
                        is_leaf=lambda x: isinstance(x, ParamSpec))
  for key, path, transpose in key_map(config):
    arr = _to_numpy(sd[key])
    if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype == ml_dtypes.bfloat16):
      raise CheckpointError(f"{key}: expected a floating-point tensor, got dtype {arr.dtype}")
    if transpose:
      arr = arr.T
    arr = np.ascontiguousarray(arr.astype(dt, copy=False))
    parent = _get(params, path[:-1])
    parent[path[-1]] = arr
  params = stack_layers(params, np)  # the published per-layer names -> stacked [L, ...]
  return jax.tree.map(jax.numpy.asarray, params) if to_jax else params


def params_to_state_dict(params: Mapping, config: PLDRConfig, *,
                         dtype=None) -> dict[str, np.ndarray]:
  """Our parameter pytree -> {published name: NumPy array in the PyTorch layout}.

  dtype: cast every tensor to it (default: keep each array's dtype; bfloat16
  comes out as ml_dtypes.bfloat16). Raises CheckpointError for a missing or
  wrongly shaped parameter.
  """
  from pldr_jax.params import unstack_layers
  if isinstance(params, Mapping) and isinstance(params.get("layers"), Mapping):
    params = unstack_layers(params)
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

  Inferred: vocab_size, d_model (embedding), num_layers, d_ff, param_dtype
  (the tensors' dtype: the file's dtype is kept), and for learned-G checkpoints
  num_heads (Wlst's first dim), a_dff, num_res_units, g_mode='learned'. Without
  learned-G keys the model is fixed-G: g_mode defaults to 'identity' and
  num_heads is read from the port's `decoder.past_G_values` buffer when there
  is one, else it must be given (num_heads=...). A float64 checkpoint computes
  in float64 too (compute_dtype). Other fields (max_len, g_mode for the fixed
  modes, ...) come from `overrides` or the PLDRConfig defaults. param_dtype /
  compute_dtype overrides win (asking for another dtype); any other override
  contradicting an inferred value raises CheckpointError.
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
  if not learned and G_VALUES_KEY in sd:
    g_shape = shape(G_VALUES_KEY)
    if len(g_shape) != 6:
      raise CheckpointError(f"{G_VALUES_KEY} has shape {g_shape}; expected "
                            "(num_layers, 3, 1, num_heads, head_dim, head_dim)")
    inferred["num_heads"] = g_shape[3]
  if learned:
    inferred["num_heads"] = shape("decoder.dec_layers.0.mha1.plgatt_layer.Wlst")[0]
    units = sorted({int(m.group(1)) for k in sd if (m := _UNIT_RE.match(k))})
    inferred["num_res_units"] = units[-1] + 1 if units else 0
    if units:
      inferred["a_dff"] = shape(
          "decoder.dec_layers.0.mha1.reslayerAs.0.denseAs.0.gluw1.weight")[0]
  fields = dict(overrides)
  dtype = infer_param_dtype(sd)
  if dtype is not None and "param_dtype" not in fields:
    fields["param_dtype"] = dtype
    if dtype == "float64":
      fields.setdefault("compute_dtype", "float64")
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
#
# The `safetensors` package. Its NumPy API has no bfloat16 before 0.5, so
# BF16 tensors go through its Flax API (read: a JAX bfloat16 array -> NumPy
# ml_dtypes.bfloat16; write: JAX arrays), everything else through NumPy.


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
  arrays = {k: np.ascontiguousarray(_to_numpy(v)) for k, v in tensors.items()}
  md = None if metadata is None else {str(k): str(v) for k, v in metadata.items()}
  if not any(a.dtype == ml_dtypes.bfloat16 for a in arrays.values()):
    import safetensors.numpy
    safetensors.numpy.save_file(arrays, path, metadata=md)
    return
  wide = sorted(k for k, a in arrays.items() if a.dtype.itemsize == 8)
  if wide and not jax.config.jax_enable_x64:
    raise CheckpointError(
        f"{path}: bfloat16 tensors are written through safetensors' Flax API, and the "
        f"64-bit tensors next to them ({_format_keys(wide, 3)}) need "
        "jax.config.update('jax_enable_x64', True); or cast them (dtype=...)")
  import safetensors.flax
  cpu = jax.devices("cpu")[0]
  safetensors.flax.save_file({k: jax.device_put(a, cpu) for k, a in arrays.items()}, path,
                             metadata=md)


# ------------------------------------------------------------------ files

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
    sd = _normalise(obj)
  except CheckpointError as e:
    raise CheckpointError(f"{path}: {e}") from None
  out = {}
  for k, v in sd.items():
    if not hasattr(v, "shape"):
      raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    out[k] = np.array(_to_numpy(v))
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


def _load_folder(path: str) -> dict[str, np.ndarray]:
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
    return _load_folder(path)
  lower = path.lower()
  if lower.endswith(".safetensors"):
    return read_safetensors(path)
  if lower.endswith(_TORCH_SUFFIXES):
    return _state_dict_of(_torch_load(path), path)
  hint = (" (a SentencePiece tokenizer: load it with pldr_jax.data.tokenizer)"
          if lower.endswith((".model", ".vocab")) else "")
  raise CheckpointError(f"{path}: unknown checkpoint format{hint}; {WHAT_TO_LOAD}")


def _torch_tensors(sd: Mapping[str, np.ndarray]):
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
    obj = _torch_tensors(sd)
    if wrap:
      obj = {"model_state_dict": obj, "optimizer_state_dict": None, "loss": None,
             "accuracy": None}
    torch.save(obj, path)
  else:
    raise CheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, "
                          ".pth, .pt or .bin)")
  return sd


# ------------------------------------------------------------ Hugging Face port
#
# PldrllmForCausalLM (transformers, model_type "pldrllm"): config.json +
# model.safetensors with the authors' tensor names. Fixed-G models
# (custom_G_type 'identity' / 'random' / 'external') also store the buffers
# decoder.past_G_values [L, 3, 1, H, dk, dk] ([:, 2] = G_LM; [:, 0], [:, 1]
# unused zeros) and decoder.past_G_values_status [L] (all True).

HF_ARCHITECTURE = "PldrllmForCausalLM"
HF_MODEL_TYPE = "pldrllm"
_CUSTOM_G = {"identity": "identity", "random": "random", "transferred": "external"}
# Fields of the port's config our model has no switch for: the only value it supports.
_HF_FIXED = {"hidden_act": "silu", "attention_bias": True, "glu_bias": True, "final_bias": True,
             "tie_word_embeddings": False, "rope_scaling": None, "num_denseA": 2}


def hf_config(config: PLDRConfig, *, dtype: str | None = None) -> dict[str, Any]:
  """The port's config.json for `config` (dtype: the weights' dtype, default param_dtype)."""
  if config.causal_metric:
    raise CheckpointError(
        "causal_metric=True has no counterpart in the Hugging Face port (it sums A over the "
        "whole sequence); export config.replace(causal_metric=False) if that is what you want")
  dtype = dtype or config.param_dtype
  return {
      "architectures": [HF_ARCHITECTURE], "model_type": HF_MODEL_TYPE,
      "vocab_size": config.vocab_size, "hidden_size": config.d_model,
      "intermediate_size": config.d_ff, "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads, "head_dim": config.head_dim,
      "A_dff": config.a_dff, "num_reslayerA": config.num_res_units,
      "max_position_embeddings": config.max_len, "layer_norm_eps": config.ln_eps,
      "rope_theta": config.rope_base, "reference_rope": config.rope_interleaved,
      "custom_G_type": None if config.learned_g else _CUSTOM_G[config.g_mode],
      **_HF_FIXED,
      "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
      "cache_first_G": False, "output_pldr_attentions": False,
      "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 0,
      "dtype": dtype, "torch_dtype": dtype,
  }


def config_from_hf(hf: Mapping[str, Any], **overrides) -> PLDRConfig:
  """A PLDRConfig from the port's config.json (a dict); `overrides` win. param_dtype is
  the json's dtype (torch_dtype in older files) unless overridden."""
  if hf.get("model_type") != HF_MODEL_TYPE:
    raise CheckpointError(f"config.json has model_type={hf.get('model_type')!r}, not "
                          f"{HF_MODEL_TYPE!r}: not a PLDR-LLM (PldrllmForCausalLM) folder")
  for name, want in _HF_FIXED.items():
    if name in hf and hf[name] != want:
      raise CheckpointError(f"config.json has {name}={hf[name]!r}; pldr-jax supports only "
                            f"{name}={want!r} (the published models)")
  heads, dk = hf.get("num_attention_heads", 14), hf.get("head_dim", 64)
  d = hf.get("hidden_size") or heads * dk
  if d != heads * dk:
    raise CheckpointError(f"config.json: hidden_size={d} != num_attention_heads*head_dim = "
                          f"{heads}*{dk}; pldr-jax needs d_model = heads * head_dim")
  custom = hf.get("custom_G_type")
  modes = {None: "learned", **{v: k for k, v in _CUSTOM_G.items()}}
  if custom not in modes:
    raise CheckpointError(f"config.json: custom_G_type={custom!r} is not one of "
                          "null, 'identity', 'random', 'external'")
  fields: dict[str, Any] = {
      "vocab_size": hf.get("vocab_size", 32000), "d_model": d, "num_heads": heads,
      "num_layers": hf.get("num_hidden_layers", 5),
      "d_ff": hf.get("intermediate_size") or int(np.floor(d * 4 * 2 / 3)),
      "a_dff": hf.get("A_dff", 170), "num_res_units": hf.get("num_reslayerA", 8),
      "max_len": hf.get("max_position_embeddings", 1024),
      "ln_eps": float(hf.get("layer_norm_eps", 1e-6)),
      "rope_base": float(hf.get("rope_theta", 10000.0)),
      "rope_interleaved": bool(hf.get("reference_rope", True)),
      "g_mode": modes[custom],
  }
  dtype = hf.get("dtype") or hf.get("torch_dtype")
  if isinstance(dtype, str) and dtype.removeprefix("torch.") in _PARAM_DTYPES:
    fields["param_dtype"] = dtype.removeprefix("torch.")
    if fields["param_dtype"] == "float64":
      fields["compute_dtype"] = "float64"
  fields.update(overrides)
  return PLDRConfig(**fields)


def g_lm_from_state_dict(state_dict: Mapping[str, Any]) -> np.ndarray | None:
  """The port's fixed G_LM, decoder.past_G_values[:, 2, 0] -> [L, H, dk, dk]; None without it."""
  sd = _normalise(state_dict)
  if G_VALUES_KEY not in sd:
    return None
  g = _to_numpy(sd[G_VALUES_KEY])
  if g.ndim != 6 or g.shape[1] != 3:
    raise CheckpointError(f"{G_VALUES_KEY} has shape {tuple(g.shape)}; expected "
                          "(num_layers, 3, 1, num_heads, head_dim, head_dim)")
  return np.array(g[:, 2, 0])


def _fixed_g(config: PLDRConfig, sd: Mapping, where: str, required: bool = True):
  """(g_mode, g_lm) of a fixed-G checkpoint from its stored G: identity with G = I -> None.
  required=False (g_mode chosen by the caller): no stored G is fine, the caller brings one."""
  g = g_lm_from_state_dict(sd)
  want = (config.num_layers, config.num_heads, config.head_dim, config.head_dim)
  if g is None:
    if config.g_mode == "identity" or not required:
      return config.g_mode, None
    raise CheckpointError(f"{where}: g_mode={config.g_mode!r} but there is no "
                          f"{G_VALUES_KEY} tensor holding its G_LM")
  if g.shape != want:
    raise CheckpointError(f"{where}: {G_VALUES_KEY}[:, 2, 0] has shape {g.shape}, the config "
                          f"needs {want}")
  if config.g_mode == "identity":
    if np.array_equal(g, np.broadcast_to(np.eye(config.head_dim, dtype=g.dtype), want)):
      return "identity", None
    return "transferred", g  # the port computes with the stored G, whatever its type says
  return config.g_mode, g


def load_hf(folder: str | os.PathLike, **overrides):
  """A Hugging Face PLDR-LLM folder (config.json + model.safetensors) -> (config, params, g_lm).

  The tensors keep the file's dtype unless `param_dtype=...` is passed; other
  `overrides` replace config.json fields (PLDRConfig names). g_lm: None for a
  learned-G model and for G = I, else the stored G_LM [L, H, dk, dk] (NumPy) to
  pass as `g_lm=` to forward / generate (custom_G_type 'random' -> g_mode
  'random', 'external' -> 'transferred'). Raises CheckpointError naming what
  does not fit.
  """
  folder = os.fspath(folder)
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.exists(cfg_path):
    raise CheckpointError(f"{folder}: no config.json (not a Hugging Face folder); {WHAT_TO_LOAD}")
  with open(cfg_path) as f:
    hf = json.load(f)
  sd = _load_folder(folder)
  tensor_dtype = infer_param_dtype(sd)
  if tensor_dtype and "param_dtype" not in overrides:  # the file's dtype, whatever the json says
    overrides = {"param_dtype": tensor_dtype, **overrides}
    if tensor_dtype == "float64":
      overrides.setdefault("compute_dtype", "float64")
  try:
    config = config_from_hf(hf, **overrides)
    g_mode, g_lm = ("learned", None) if config.learned_g else _fixed_g(
        config, sd, folder, required="g_mode" not in overrides)
    if g_mode != config.g_mode and "g_mode" not in overrides:
      config = config.replace(g_mode=g_mode)
    params = state_dict_to_params(sd, config, drop_learned_g="g_mode" in overrides)
  except CheckpointError as e:
    raise CheckpointError(f"{folder}: {e}") from None
  return config, params, g_lm


def save_hf(folder: str | os.PathLike, params: Mapping, config: PLDRConfig, g_lm=None, *,
            dtype=None, tokenizer=None) -> dict[str, np.ndarray]:
  """Write a Hugging Face PLDR-LLM folder: config.json + model.safetensors (+ tokenizer.model).

  The names and shapes are the authors' (`PldrllmForCausalLM.from_pretrained`
  reads it). dtype: cast the weights (default: keep theirs). Fixed-G models store
  their G as decoder.past_G_values: g_mode identity writes I (or `g_lm`, then as
  custom_G_type 'external'), random / transferred need `g_lm` [L, H, dk, dk].
  A learned-G model computes its G and takes no g_lm. tokenizer: the SentencePiece
  model to publish with the weights (a path or a loaded `Tokenizer`), copied to
  `tokenizer.model`, where `pldr_jax.load(folder)` finds it. Returns the tensors written.
  """
  folder = os.fspath(folder)
  tok_src = None
  if tokenizer is not None:
    tok_src = os.fspath(getattr(tokenizer, "path", tokenizer))
    if not os.path.isfile(tok_src):
      raise CheckpointError(f"tokenizer file not found: {tok_src} (a SentencePiece .model)")
  sd = params_to_state_dict(params, config, dtype=dtype)
  weights_dtype = _dtype_name(sd["decoder.embedding.weight"])
  hf = hf_config(config, dtype=weights_dtype)
  if config.learned_g:
    if g_lm is not None:
      raise CheckpointError("a learned-G model computes its G_LM from the prompt; the Hugging "
                            "Face layout has no place for a fixed one (pass g_lm=None)")
  else:
    want = (config.num_layers, config.num_heads, config.head_dim, config.head_dim)
    if g_lm is None:
      if config.g_mode != "identity":
        raise CheckpointError(f"g_mode={config.g_mode!r}: pass its G_LM (g_lm=..., shape {want})")
      g = np.broadcast_to(np.eye(config.head_dim), want)
    else:
      g = _to_numpy(g_lm)
      if g.shape != want:
        raise CheckpointError(f"g_lm has shape {tuple(g.shape)}; this model needs {want}")
      if config.g_mode == "identity":
        hf["custom_G_type"] = "external"
    buf = np.zeros((config.num_layers, 3, 1) + want[1:], _np_dtype(weights_dtype))
    buf[:, 2, 0] = g.astype(buf.dtype)
    sd[G_VALUES_KEY] = buf
    sd[G_STATUS_KEY] = np.ones((config.num_layers,), bool)
  os.makedirs(folder, exist_ok=True)
  write_safetensors(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
    f.write("\n")
  if tok_src is not None:
    dst = os.path.join(folder, "tokenizer.model")
    if os.path.abspath(tok_src) != os.path.abspath(dst):
      shutil.copyfile(tok_src, dst)
  return sd


def load_checkpoint(path: str | os.PathLike, **overrides):
  """Any published checkpoint -> (config, params, g_lm): a Hugging Face folder (load_hf), a
  DCP folder, .pth / .pt / .bin or .safetensors. The config comes from the file
  (config.json, or names, shapes and dtypes: config_from_state_dict) with
  `overrides` on top; passing g_mode drops learned-G tensors the chosen mode lacks.
  """
  path = os.fspath(path)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")):
    return load_hf(path, **overrides)
  sd = load_state_dict(path)
  config = config_from_state_dict(sd, **overrides)
  g_lm = None
  if not config.learned_g and G_VALUES_KEY in sd:
    g_mode, g_lm = _fixed_g(config, sd, path)
    if "g_mode" not in overrides:
      config = config.replace(g_mode=g_mode)
  params = state_dict_to_params(sd, config, drop_learned_g="g_mode" in overrides)
  return config, params, g_lm

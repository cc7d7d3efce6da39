"""The published state-dict layout and the conversion to and from our parameter pytree.

    key_map(config)                     [(PyTorch key, pytree path, transpose)], the spec's order
    state_dict_shapes(config)           PyTorch key -> shape
    check_state_dict(sd, config)        names and shapes checked, every bad key named
    state_dict_to_params(sd, config)    PyTorch names -> our pytree
    params_to_state_dict(params, config)  our pytree -> PyTorch names (NumPy)

The published layout: PyTorch module names, `Linear.weight` stored [out, in]
(y = x W^T + b), LayerNorm `weight`/`bias`. Our pytree (pldr_jax.params) stores
dense kernels [in, out] (y = x @ kernel + bias) and LayerNorm `scale`/`bias`, so
every Linear weight is transposed on the way in and out and nothing else
changes. The Hugging Face port uses exactly these names and shapes.

Fixed-G models (g_mode identity / random / transferred) have no metric learner
or power-law tensors: their checkpoints lack every `mha1.layernorm1`,
`mha1.plgatt_layer` and `mha1.reslayerAs` key; the port stores their constant G
as the buffer `decoder.past_G_values` [L, 3, 1, H, dk, dk] ([:, 2] is G_LM).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import ml_dtypes
import numpy as np

from pldr_jax.compat.unwrap import format_keys, np_dtype, to_numpy, unwrap_state_dict
from pldr_jax.config import PLDRConfig
from pldr_jax.errors import CheckpointError
from pldr_jax.params import param_specs, stack_layers, unstack_layers
from pldr_jax.sharding import ArrayInfo

__all__ = ["key_map", "state_dict_shapes", "is_learned_g_key", "check_state_dict",
           "state_dict_to_params", "params_to_state_dict", "G_VALUES_KEY", "G_STATUS_KEY",
           "G_BUFFER_KEYS"]


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
  """Pytree path -> shape, from the ArrayInfos (allocates nothing)."""
  specs = param_specs(config, stacked=False)
  flat, _ = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, ArrayInfo))
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


# Buffers the Hugging Face port saves for fixed-G models (not parameters).
G_VALUES_KEY = "decoder.past_G_values"
G_STATUS_KEY = "decoder.past_G_values_status"
G_BUFFER_KEYS = (G_VALUES_KEY, G_STATUS_KEY)


def check_state_dict(state_dict: Mapping[str, Any], config: PLDRConfig, *,
                     drop_learned_g: bool = False) -> dict[str, Any]:
  """Check names and shapes against `config`; returns the unwrapped dict (extra learned-G
  keys removed when drop_learned_g). Raises CheckpointError naming every bad key."""
  sd = {k: v for k, v in unwrap_state_dict(state_dict).items() if k not in G_BUFFER_KEYS}
  expected = state_dict_shapes(config)
  unexpected = [k for k in sd if k not in expected]
  missing = [k for k in expected if k not in sd]
  if unexpected and not config.learned_g and all(is_learned_g_key(k) for k in unexpected):
    if not drop_learned_g:
      raise CheckpointError(
          f"the checkpoint has {len(unexpected)} metric-learner / power-law tensors "
          f"({format_keys(unexpected, 4)}) but config.g_mode={config.g_mode!r} has none: "
          "load it with g_mode='learned', or pass drop_learned_g=True to discard them")
    sd = {k: v for k, v in sd.items() if k in expected}
    unexpected = []
  problems = []
  if missing and config.learned_g and all(is_learned_g_key(k) for k in missing) and not any(
      is_learned_g_key(k) for k in sd):
    problems.append(
        f"the checkpoint has no metric-learner / power-law tensors ({len(missing)} keys such as "
        f"{format_keys(missing, 3)}): it looks like a fixed-G model; use "
        "config.replace(g_mode='identity'|'random'|'transferred') (config_from_state_dict "
        "does this)")
  elif missing:
    problems.append(f"missing key(s): {format_keys(missing)}")
  if unexpected:
    problems.append(f"unexpected key(s): {format_keys(unexpected)}")
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
  dt = np_dtype(dtype or config.param_dtype)
  if to_jax and dt == np.float64 and not jax.config.jax_enable_x64:
    raise CheckpointError(
        "float64 parameters need jax.config.update('jax_enable_x64', True) before loading; "
        "or load them as float32: param_dtype='float32' (config_from_state_dict / load_hf / "
        "load_checkpoint override), dtype='float32' here, or to_jax=False for NumPy arrays")
  params = jax.tree.map(lambda s: None, param_specs(config, stacked=False),
                        is_leaf=lambda x: isinstance(x, ArrayInfo))
  for key, path, transpose in key_map(config):
    arr = to_numpy(sd[key])
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
  if isinstance(params, Mapping) and isinstance(params.get("layers"), Mapping):
    params = unstack_layers(params)
  ours = _our_shapes(config)
  dt = None if dtype is None else np_dtype(dtype)
  out, problems = {}, []
  for key, path, transpose in key_map(config):
    try:
      leaf = _get(params, path)
    except (KeyError, IndexError, TypeError):
      problems.append(f"missing parameter {'/'.join(map(str, path))} (for {key})")
      continue
    arr = to_numpy(leaf)
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

"""Dtype and config inference: a PLDRConfig from a state dict's names, shapes and dtypes.

    infer_param_dtype(sd)               the parameters' floating dtype (the widest if mixed)
    config_from_state_dict(sd)          a PLDRConfig (param_dtype included); overrides win

The dtype of the file is kept unless asked otherwise (an override
`param_dtype=...`, or an explicit config).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from pldr_jax.compat.keys import G_BUFFER_KEYS, G_VALUES_KEY, is_learned_g_key
from pldr_jax.compat.unwrap import PARAM_DTYPES, dtype_name, unwrap_state_dict
from pldr_jax.config import PLDRConfig
from pldr_jax.errors import CheckpointError

__all__ = ["infer_param_dtype", "config_from_state_dict"]


def infer_param_dtype(state_dict: Mapping[str, Any]) -> str | None:
  """The floating dtype of the checkpoint's parameters ('float32', 'bfloat16', 'float16',
  'float64'); the widest one if they are mixed; None if none is floating."""
  sd = unwrap_state_dict(state_dict)
  names = {dtype_name(v) for k, v in sd.items() if k not in G_BUFFER_KEYS}
  names.discard(None)
  return next((n for n in PARAM_DTYPES if n in names), None)


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
  sd = unwrap_state_dict(state_dict)

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

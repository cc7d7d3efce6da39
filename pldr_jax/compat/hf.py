"""The Hugging Face port's folder, and one call for every published format.

    load_checkpoint(path)               any format -> (config, params, g_lm or None)
    load_hf(folder) / save_hf(folder, params, config, g_lm=None)
                                        a Hugging Face folder (PldrllmForCausalLM:
                                        config.json + model.safetensors)
    hf_config(config) / config_from_hf(hf)   config.json <-> PLDRConfig
    g_lm_from_state_dict(sd)            a fixed-G model's stored G_LM

PldrllmForCausalLM (transformers, model_type "pldrllm"): config.json +
model.safetensors with the authors' tensor names. Fixed-G models
(custom_G_type 'identity' / 'random' / 'external') also store the buffers
decoder.past_G_values [L, 3, 1, H, dk, dk] ([:, 2] = G_LM; [:, 0], [:, 1]
unused zeros) and decoder.past_G_values_status [L] (all True).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import numpy as np

from pldr_jax.compat.infer import config_from_state_dict, infer_param_dtype
from pldr_jax.compat.keys import (G_STATUS_KEY, G_VALUES_KEY, params_to_state_dict,
                                  state_dict_to_params)
from pldr_jax.compat.safetensors_io import write_safetensors
from pldr_jax.compat.torch_files import load_folder, load_state_dict
from pldr_jax.compat.unwrap import (PARAM_DTYPES, WHAT_TO_LOAD, dtype_name, np_dtype, to_numpy,
                                    unwrap_state_dict)
from pldr_jax.config import PLDRConfig
from pldr_jax.errors import CheckpointError

__all__ = ["load_checkpoint", "load_hf", "save_hf", "hf_config", "config_from_hf",
           "g_lm_from_state_dict", "HF_ARCHITECTURE", "HF_MODEL_TYPE"]


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
  if isinstance(dtype, str) and dtype.removeprefix("torch.") in PARAM_DTYPES:
    fields["param_dtype"] = dtype.removeprefix("torch.")
    if fields["param_dtype"] == "float64":
      fields["compute_dtype"] = "float64"
  fields.update(overrides)
  return PLDRConfig(**fields)


def g_lm_from_state_dict(state_dict: Mapping[str, Any]) -> np.ndarray | None:
  """The port's fixed G_LM, decoder.past_G_values[:, 2, 0] -> [L, H, dk, dk]; None without it."""
  sd = unwrap_state_dict(state_dict)
  if G_VALUES_KEY not in sd:
    return None
  g = to_numpy(sd[G_VALUES_KEY])
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
  sd = load_folder(folder)
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
  weights_dtype = dtype_name(sd["decoder.embedding.weight"])
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
      g = to_numpy(g_lm)
      if g.shape != want:
        raise CheckpointError(f"g_lm has shape {tuple(g.shape)}; this model needs {want}")
      if config.g_mode == "identity":
        hf["custom_G_type"] = "external"
    buf = np.zeros((config.num_layers, 3, 1) + want[1:], np_dtype(weights_dtype))
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

"""PyTorch state dict <-> our parameter pytree (pldr_jax.compat).

The state dicts here are built from the published layout table
(docs/checkpoints.md) written out by hand, and the placement of
every tensor is checked by a plain NumPy float64 forward pass that reads the raw
state dict in the PyTorch convention (y = x W^T + b), independent of both
pldr_jax.compat and pldr_jax.model.

The containers: .safetensors through the `safetensors` package (bfloat16
included, checked against safetensors.torch), the authors' .pth training dict
and DCP folder (built with torch as their training script builds them), files
that are not a model, and Hugging Face folders (config.json fields and
model.safetensors names/shapes checked against the published layout table;
save_hf -> load_hf gives the same config and bit-identical parameters).
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pldr_jax import config as config_lib
from pldr_jax.compat.hf import load_checkpoint, load_hf, save_hf
from pldr_jax.compat.infer import config_from_state_dict
from pldr_jax.compat.keys import (is_learned_g_key, key_map, params_to_state_dict,
                                  state_dict_shapes, state_dict_to_params)
from pldr_jax.compat.safetensors_io import read_safetensors, write_safetensors
from pldr_jax.compat.torch_files import load_state_dict, save_state_dict, torch_tensors
from pldr_jax.errors import CheckpointError
from pldr_jax.model import forward
from pldr_jax.params import count_params, init_params, unstack_layers

HAS_TORCH = importlib.util.find_spec("torch") is not None

F64 = dict(param_dtype="float64", compute_dtype="float64")

# float64 state dicts against the plain NumPy float64 forward pass (tests/conftest.py)
pytestmark = pytest.mark.x64


# ------------------------------------------------------------ published layout

def published_layout(layers, heads, dk, dff, a_dff, res_units, vocab, learned=True):
  """Key -> shape, transcribed from the spec's table (PyTorch Linear weights [out, in])."""
  d = heads * dk
  out = {"decoder.embedding.weight": (vocab, d),
         "decoder.layernorm1.weight": (d,), "decoder.layernorm1.bias": (d,)}
  for i in range(layers):
    p = f"decoder.dec_layers.{i}."
    for name in ("wq", "wk", "wv", "dense"):
      out[p + f"mha1.{name}.weight"] = (d, d)
      out[p + f"mha1.{name}.bias"] = (d,)
    if learned:
      out[p + "mha1.layernorm1.weight"] = (dk,)
      out[p + "mha1.layernorm1.bias"] = (dk,)
      for name in ("Wlst", "blst", "pwlst", "alst", "balst"):
        out[p + f"mha1.plgatt_layer.{name}"] = (heads, dk, dk)
      for j in range(res_units):
        for g in range(2):
          u = p + f"mha1.reslayerAs.{j}.denseAs.{g}."
          out[u + "gluw1.weight"], out[u + "gluw1.bias"] = (a_dff, dk), (a_dff,)
          out[u + "gluw2.weight"], out[u + "gluw2.bias"] = (a_dff, dk), (a_dff,)
          out[u + "gluw3.weight"], out[u + "gluw3.bias"] = (dk, a_dff), (dk,)
        out[p + f"mha1.reslayerAs.{j}.layernormA.weight"] = (dk,)
        out[p + f"mha1.reslayerAs.{j}.layernormA.bias"] = (dk,)
    out[p + "ffn.gluw1.weight"], out[p + "ffn.gluw1.bias"] = (dff, d), (dff,)
    out[p + "ffn.gluw2.weight"], out[p + "ffn.gluw2.bias"] = (dff, d), (dff,)
    out[p + "ffn.gluw3.weight"], out[p + "ffn.gluw3.bias"] = (d, dff), (d,)
    for ln in ("layernorm1", "layernorm2"):
      out[p + f"{ln}.weight"], out[p + f"{ln}.bias"] = (d,), (d,)
  out["final_layer.weight"], out["final_layer.bias"] = (vocab, d), (vocab,)
  return out


def tiny_layout(learned=True):
  return published_layout(layers=2, heads=2, dk=8, dff=24, a_dff=12, res_units=2, vocab=64,
                          learned=learned)


def random_state_dict(layout, seed=0, dtype=np.float64):
  """Random tensors: weights ~ Xavier-ish, LN weights near 1, every bias nonzero."""
  rng = np.random.default_rng(seed)
  sd = {}
  for key, shape in layout.items():
    if key.endswith("embedding.weight"):
      x = rng.normal(size=shape)
    elif len(shape) == 1 and "layernorm" in key.lower() and key.endswith(".weight"):
      x = 1.0 + 0.2 * rng.normal(size=shape)
    elif len(shape) == 1:
      x = 0.1 * rng.normal(size=shape)
    elif key.endswith(("blst", "balst")):
      x = 0.1 * rng.normal(size=shape)
    else:
      x = math.sqrt(2.0 / (shape[-1] + shape[-2])) * rng.normal(size=shape)
    sd[key] = x.astype(dtype)
  return sd


# ------------------------------------------------- NumPy reference (torch layout)

def _sigmoid(x):
  return np.exp(-np.logaddexp(0.0, -x))


def _silu(x):
  return x * _sigmoid(x)


def _lin(sd, name, x):
  return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _ln(sd, name, x, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * sd[name + ".weight"] + sd[name + ".bias"]


def _glu(sd, name, x):
  hidden = _silu(_lin(sd, name + ".gluw1", x)) * _lin(sd, name + ".gluw2", x)
  return _lin(sd, name + ".gluw3", hidden)


def _rotary(x, base=10000.0):
  """x: [S, H, dk]; GPT-J interleaved pairs (x[2i], x[2i+1]) rotated by pos * base^(-2i/dk)."""
  s, _, dk = x.shape
  ang = np.arange(s)[:, None] * base ** (-np.arange(0, dk, 2) / dk)  # [S, dk/2]
  cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
  even, odd = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = even * cos - odd * sin
  out[..., 1::2] = odd * cos + even * sin
  return out


def reference_logits(sd, tokens, layers, heads, res_units, learned=True):
  """One sequence's logits [S, V] from the raw PyTorch state dict, float64."""
  sd = {k: np.asarray(v, np.float64) for k, v in sd.items()}
  s = len(tokens)
  d = sd["decoder.embedding.weight"].shape[1]
  dk = d // heads
  x = _ln(sd, "decoder.layernorm1", sd["decoder.embedding.weight"][tokens] * math.sqrt(d))
  causal = np.tril(np.ones((s, s), bool))
  for i in range(layers):
    p = f"decoder.dec_layers.{i}."
    q = _rotary(_lin(sd, p + "mha1.wq", x).reshape(s, heads, dk))
    k = _rotary(_lin(sd, p + "mha1.wk", x).reshape(s, heads, dk))
    v = _lin(sd, p + "mha1.wv", x).reshape(s, heads, dk)
    out = np.empty((s, heads, dk))
    for h in range(heads):
      if learned:
        a = sum(np.outer(q[t, h], q[t, h]) for t in range(s))  # over the whole sequence
        a = _ln(sd, p + "mha1.layernorm1", a)
        for j in range(res_units):
          u = p + f"mha1.reslayerAs.{j}."
          a = _ln(sd, u + "layernormA", a + _glu(sd, u + "denseAs.1", _glu(sd, u + "denseAs.0", a)))
        pl = lambda n: sd[p + "mha1.plgatt_layer." + n][h]
        z = pl("Wlst") @ a + pl("blst")
        a_lm = z * _silu(z) + 1e-9
        a_p = a_lm ** pl("pwlst")
        g = pl("alst") @ a_p + pl("balst")
      else:
        g = np.eye(dk)
      scores = q[:, h] @ g @ k[:, h].T / math.sqrt(dk) + np.where(causal, 0.0, -1e9)
      e = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, h] = (e / e.sum(-1, keepdims=True)) @ v[:, h]
    attn = _lin(sd, p + "mha1.dense", out.reshape(s, d))
    h1 = _ln(sd, p + "layernorm1", x + attn)
    x = _ln(sd, p + "layernorm2", h1 + _glu(sd, p + "ffn", h1))
  return _lin(sd, "final_layer", x)


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


# --------------------------------------------------------------------- import

@pytest.fixture(scope="module")
def tiny64():
  return config_lib.tiny(**F64)


@pytest.mark.slow
@pytest.mark.parametrize("learned", [True, False], ids=["learned_g", "identity_g"])
def test_import_matches_reference_forward(learned):
  sd = random_state_dict(tiny_layout(learned), seed=1 if learned else 2)
  cfg = config_from_state_dict(sd, max_len=32, num_heads=2, **F64)
  if not learned:  # a_dff / num_res_units mean nothing without a metric learner
    cfg = cfg.replace(a_dff=12, num_res_units=2)
  assert cfg == config_lib.tiny(g_mode="learned" if learned else "identity", **F64)
  params = state_dict_to_params(sd, cfg)
  assert all(x.dtype == jnp.float64 for x in jax.tree.leaves(params))
  tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, size=(2, 12))
  logits, _ = forward(params, jnp.asarray(tokens), config=cfg)
  logits = np.asarray(logits)
  assert logits.dtype == np.float64
  for b in range(tokens.shape[0]):
    ref = reference_logits(sd, tokens[b], cfg.num_layers, 2, cfg.num_res_units, learned)
    assert _rel_err(logits[b], ref) < 1e-10, b


def test_config_inferred_from_tiny_state_dict():
  sd = random_state_dict(tiny_layout(), seed=0, dtype=np.float32)
  cfg = config_from_state_dict(sd, max_len=32)
  assert cfg == config_lib.tiny()
  assert cfg.num_heads == 2 and cfg.head_dim == 8 and cfg.num_res_units == 2 and cfg.a_dff == 12


@pytest.mark.parametrize("dtype,param_dtype", [
    (np.float64, "float64"), (np.float32, "float32"), (ml_dtypes.bfloat16, "bfloat16")])
@pytest.mark.parametrize("learned", [True, False], ids=["learned_g", "identity_g"])
def test_round_trip_is_exact(dtype, param_dtype, learned):
  layout = tiny_layout(learned)
  sd = random_state_dict(layout, seed=4, dtype=dtype)
  cfg = config_lib.tiny(param_dtype=param_dtype,
                        g_mode="learned" if learned else "identity")
  params = state_dict_to_params(sd, cfg)
  back = params_to_state_dict(params, cfg)
  assert list(back) == list(layout)  # the spec's key order, nothing more, nothing less
  for key, want in sd.items():
    assert back[key].dtype == want.dtype, key
    assert back[key].shape == want.shape, key
    np.testing.assert_array_equal(back[key].view(np.uint8), want.view(np.uint8), err_msg=key)
  # NumPy params too, and an explicit dtype override.
  params_np = state_dict_to_params(sd, cfg, to_jax=False)
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params_np))
  back32 = params_to_state_dict(params_np, cfg, dtype="float32")
  assert all(v.dtype == np.float32 for v in back32.values())


def test_kernels_are_transposed_weights(tiny64):
  sd = random_state_dict(tiny_layout(), seed=5)
  p = state_dict_to_params(sd, tiny64, to_jax=False)
  np.testing.assert_array_equal(p["layers"]["wo"]["kernel"][1],
                                sd["decoder.dec_layers.1.mha1.dense.weight"].T)
  np.testing.assert_array_equal(p["head"]["kernel"], sd["final_layer.weight"].T)
  np.testing.assert_array_equal(p["embed"], sd["decoder.embedding.weight"])
  unit_key = "decoder.dec_layers.0.mha1.reslayerAs.1.denseAs.1.gluw3.weight"
  np.testing.assert_array_equal(p["layers"]["res_units"][1]["glu2"]["w3"]["kernel"][0],
                                sd[unit_key].T)
  np.testing.assert_array_equal(p["layers"]["plga"]["P"][0],
                                sd["decoder.dec_layers.0.mha1.plgatt_layer.pwlst"])
  np.testing.assert_array_equal(p["layers"]["ln_a"]["scale"][1],
                                sd["decoder.dec_layers.1.mha1.layernorm1.weight"])


def test_wrapped_and_prefixed_state_dicts(tiny64):
  sd = random_state_dict(tiny_layout(), seed=6)
  ref = state_dict_to_params(sd, tiny64, to_jax=False)
  for wrapped in ({"model": sd}, {"state_dict": {"module." + k: v for k, v in sd.items()},
                                  "epoch": 3}):
    got = state_dict_to_params(wrapped, tiny64, to_jax=False)
    jax.tree.map(np.testing.assert_array_equal, got, ref)
  assert config_from_state_dict({"model": sd}, max_len=32, **F64) == tiny64


@pytest.mark.slow
def test_export_of_initialised_params(tiny64):
  params = jax.jit(init_params, static_argnums=0)(tiny64, jax.random.key(0))
  sd = params_to_state_dict(params, tiny64)
  assert {k: v.shape for k, v in sd.items()} == tiny_layout()
  again = state_dict_to_params(sd, tiny64)
  jax.tree.map(np.testing.assert_array_equal, again, params)


# ------------------------------------------------------------ published config

def test_pldrv51_110m_layout_matches_spec():
  cfg = config_lib.pldrv51_110m()
  want = published_layout(layers=5, heads=14, dk=64, dff=2389, a_dff=170, res_units=8,
                          vocab=32000)
  # key_map's paths are the published per-layer ones: (layers, i, ...) of the list layout.
  abstract = jax.eval_shape(lambda: unstack_layers(init_params(cfg, jax.random.key(0))))
  got = {}
  for key, path, transpose in key_map(cfg):
    leaf = abstract
    for part in path:
      leaf = leaf[part]
    got[key] = tuple(reversed(leaf.shape)) if transpose else tuple(leaf.shape)
  assert list(got) == list(want)
  assert got == want
  assert state_dict_shapes(cfg) == want
  assert len(key_map(cfg)) == len(jax.tree.leaves(abstract))  # a bijection
  assert len({tuple(p) for _, p, _ in key_map(cfg)}) == len(want)
  total = sum(math.prod(s) for s in want.values())
  assert total == 109_689_362 == count_params(cfg)
  # The config comes back from names and shapes alone (no arrays).
  abstract_sd = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in want.items()}
  assert config_from_state_dict(abstract_sd) == cfg
  fixed = {k: v for k, v in abstract_sd.items() if not is_learned_g_key(k)}
  fixed_cfg = config_from_state_dict(fixed, num_heads=14, g_mode="random")
  assert fixed_cfg == config_lib.pldrv51_110m(g_mode="random")
  assert sum(math.prod(v.shape) for v in fixed.values()) == count_params(fixed_cfg) == 105_606_482


# ------------------------------------------------------------------- errors

def test_missing_key_error(tiny64):
  sd = random_state_dict(tiny_layout(), seed=7)
  del sd["decoder.dec_layers.1.ffn.gluw2.bias"]
  with pytest.raises(ValueError, match=r"missing key.*decoder\.dec_layers\.1\.ffn\.gluw2\.bias"):
    state_dict_to_params(sd, tiny64)


def test_unexpected_key_error(tiny64):
  sd = random_state_dict(tiny_layout(), seed=7)
  sd["decoder.dec_layers.2.ffn.gluw1.weight"] = np.zeros((24, 16))
  with pytest.raises(ValueError,
                     match=r"unexpected key.*decoder\.dec_layers\.2\.ffn\.gluw1\.weight"):
    state_dict_to_params(sd, tiny64)


def test_shape_mismatch_error(tiny64):
  sd = random_state_dict(tiny_layout(), seed=7)
  sd["decoder.dec_layers.0.mha1.wq.weight"] = np.zeros((16, 12))
  sd["decoder.dec_layers.1.mha1.plgatt_layer.alst"] = np.zeros((3, 8, 8))
  with pytest.raises(ValueError) as e:
    state_dict_to_params(sd, tiny64)
  msg = str(e.value)
  assert "decoder.dec_layers.0.mha1.wq.weight: expected shape (16, 16), got (16, 12)" in msg
  assert ("decoder.dec_layers.1.mha1.plgatt_layer.alst: expected shape (2, 8, 8), "
          "got (3, 8, 8)") in msg


def test_export_shape_error(tiny64):
  params = state_dict_to_params(random_state_dict(tiny_layout(), seed=7), tiny64,
                                to_jax=False)
  params["layers"]["ffn"]["w1"]["kernel"] = np.zeros((tiny64.num_layers, 16, 25))  # stacked
  with pytest.raises(ValueError, match=r"layers/0/ffn/w1/kernel.*expected shape \(16, 24\), "
                                       r"got \(16, 25\)"):
    params_to_state_dict(params, tiny64)
  with pytest.raises(ValueError, match="extra parameters"):  # learned params, fixed config
    params_to_state_dict(
        state_dict_to_params(random_state_dict(tiny_layout()), tiny64),
        tiny64.replace(g_mode="identity"))


def test_learned_checkpoint_into_fixed_g_config():
  sd = random_state_dict(tiny_layout(), seed=8)
  cfg = config_lib.tiny(g_mode="identity", **F64)
  with pytest.raises(ValueError, match="drop_learned_g=True"):
    state_dict_to_params(sd, cfg)
  params = state_dict_to_params(sd, cfg, drop_learned_g=True, to_jax=False)
  fixed = {k: v for k, v in sd.items() if not is_learned_g_key(k)}
  assert len(fixed) == len(tiny_layout(learned=False))
  jax.tree.map(np.testing.assert_array_equal, params,
               state_dict_to_params(fixed, cfg, to_jax=False))
  # Inference-only ablation: the learned model's weights, G given from outside.
  assert config_from_state_dict(sd, max_len=32, g_mode="transferred", **F64) == \
      config_lib.tiny(g_mode="transferred", **F64)


def test_fixed_g_checkpoint_into_learned_config(tiny64):
  fixed = random_state_dict(tiny_layout(learned=False), seed=9)
  with pytest.raises(ValueError, match="fixed-G"):
    state_dict_to_params(fixed, tiny64)


def test_config_inference_errors():
  fixed = random_state_dict(tiny_layout(learned=False), seed=9)
  with pytest.raises(ValueError, match="num_heads"):
    config_from_state_dict(fixed)
  with pytest.raises(ValueError, match="no metric-learner"):
    config_from_state_dict(fixed, num_heads=2, g_mode="learned")
  learned = random_state_dict(tiny_layout(), seed=9)
  with pytest.raises(ValueError, match=r"num_heads=4 contradicts.*num_heads=2"):
    config_from_state_dict(learned, num_heads=4)
  with pytest.raises(ValueError, match="decoder.embedding.weight"):
    config_from_state_dict({"final_layer.bias": np.zeros(3)})


# -------------------------------------------------------------------- files

def _header(path):
  """The safetensors header read by hand: 8-byte little-endian length, then JSON."""
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n)), 8 + n


@pytest.mark.parametrize("dtype,name", [(np.float32, "F32"), (np.float64, "F64"),
                                        (np.float16, "F16"), (ml_dtypes.bfloat16, "BF16")])
def test_safetensors_round_trip(tmp_path, dtype, name):
  sd = random_state_dict(tiny_layout(), seed=10, dtype=dtype)
  sd["decoder.embedding.weight"] = sd["decoder.embedding.weight"][:, ::-1]  # not contiguous
  path = tmp_path / "m.safetensors"
  write_safetensors(sd, path, metadata={"format": "pt"})
  header, _ = _header(path)
  assert header["__metadata__"] == {"format": "pt"}
  entry = header["final_layer.weight"]
  assert entry["dtype"] == name and entry["shape"] == [64, 16]
  back = read_safetensors(path)
  assert back.keys() == sd.keys()
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
  assert load_state_dict(path).keys() == sd.keys()


def test_safetensors_mixed_bf16_and_float64(tmp_path):
  sd = {"a": np.ones((2, 3), ml_dtypes.bfloat16), "b": np.arange(3.0), "c": np.zeros(2, np.float32)}
  with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
    write_safetensors(sd, tmp_path / "x.safetensors")
  write_safetensors(sd, tmp_path / "x.safetensors")
  back = read_safetensors(tmp_path / "x.safetensors")
  for k in sd:
    assert back[k].dtype == sd[k].dtype
    np.testing.assert_array_equal(back[k], sd[k])


def test_safetensors_bad_files(tmp_path):
  bad = tmp_path / "bad.safetensors"
  bad.write_bytes(b"\x05\x00")
  with pytest.raises(CheckpointError, match=f"not a safetensors file: {bad}"):
    read_safetensors(bad)
  header = json.dumps({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
  bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 12)
  with pytest.raises(CheckpointError, match="not a safetensors file"):
    load_state_dict(bad)
  with pytest.raises(ValueError, match="unknown checkpoint format"):
    (tmp_path / "m.npz").write_bytes(b"")
    load_state_dict(tmp_path / "m.npz")
  with pytest.raises(ValueError, match="tokenizer"):
    (tmp_path / "sp.model").write_bytes(b"\n\x05hello")
    load_state_dict(tmp_path / "sp.model")
  with pytest.raises(FileNotFoundError):
    load_state_dict(tmp_path / "absent.safetensors")


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_save_load_safetensors(tmp_path, param_dtype):
  cfg = config_lib.tiny(param_dtype=param_dtype)
  sd = random_state_dict(tiny_layout(), seed=11, dtype=np.dtype(ml_dtypes.bfloat16)
                         if param_dtype == "bfloat16" else np.float32)
  params = state_dict_to_params(sd, cfg)
  path = tmp_path / "model.safetensors"
  save_state_dict(params, cfg, path)
  loaded = load_state_dict(path)
  assert sorted(loaded) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
    assert loaded[k].dtype == sd[k].dtype
  jax.tree.map(np.testing.assert_array_equal,
               state_dict_to_params(loaded, cfg), params)
  # One call: the file's dtype comes back in the config.
  got_cfg, got, g = load_checkpoint(path, max_len=32)
  assert got_cfg == cfg and g is None
  jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.mark.skipif(not HAS_TORCH, reason="needs torch")
def test_bf16_safetensors_interoperate_with_torch(tmp_path):
  import safetensors.torch as stt
  import torch
  sd = random_state_dict(tiny_layout(), seed=13, dtype=ml_dtypes.bfloat16)
  path = tmp_path / "bf16.safetensors"
  write_safetensors(sd, path)
  for k, t in stt.load_file(str(path)).items():
    assert t.dtype == torch.bfloat16
    np.testing.assert_array_equal(t.float().numpy(), sd[k].astype(np.float32), err_msg=k)
  theirs = tmp_path / "theirs.safetensors"
  stt.save_file({k: torch.from_numpy(v.astype(np.float32)).bfloat16() for k, v in sd.items()},
                str(theirs))
  back = load_state_dict(theirs)
  for k in sd:
    assert back[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


# ------------------------------------------------------- (d) the file's dtype

@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ml_dtypes.bfloat16])
def test_param_dtype_inferred_from_tensors(dtype):
  sd = random_state_dict(tiny_layout(), seed=15, dtype=dtype)
  name = np.dtype(dtype).name
  cfg = config_from_state_dict(sd, max_len=32)
  assert cfg.param_dtype == name
  assert cfg.compute_dtype == ("float64" if name == "float64" else "float32")
  params = state_dict_to_params(sd, cfg)
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(dtype)}
  # Asking for another dtype: an override, or an explicit config.
  asked = config_from_state_dict(sd, max_len=32, param_dtype="float32")
  assert asked.param_dtype == "float32"
  params32 = state_dict_to_params(sd, config_lib.tiny())
  assert {x.dtype for x in jax.tree.leaves(params32)} == {np.dtype(np.float32)}


def test_float64_without_x64_says_what_to_do(tmp_path):
  sd = random_state_dict(tiny_layout(), seed=16, dtype=np.float64)
  path = tmp_path / "f64.safetensors"
  write_safetensors(sd, path)
  with jax.enable_x64(False):  # the production setting
    with pytest.raises(CheckpointError, match=r"jax_enable_x64.*param_dtype='float32'"):
      load_checkpoint(path, max_len=32)
    cfg, params, _ = load_checkpoint(path, max_len=32, param_dtype="float32")
  assert cfg.param_dtype == "float32"
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


# ------------------------------------------------------------ (b) Hugging Face

def _hf_params(cfg, seed):
  layout = tiny_layout(cfg.learned_g)
  dt = np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == "bfloat16" else np.dtype(cfg.param_dtype)
  return state_dict_to_params(random_state_dict(layout, seed=seed, dtype=dt), cfg)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("g_mode", ["learned", "identity"])
def test_hf_folder_round_trip(tmp_path, g_mode, param_dtype):
  cfg = config_lib.tiny(g_mode=g_mode, param_dtype=param_dtype)
  params = _hf_params(cfg, 17)
  folder = tmp_path / "hub"
  save_hf(folder, params, cfg)
  assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
  hf = json.loads((folder / "config.json").read_text())
  assert hf["architectures"] == ["PldrllmForCausalLM"] and hf["model_type"] == "pldrllm"
  assert (hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"], hf["head_dim"],
          hf["intermediate_size"], hf["A_dff"], hf["num_reslayerA"], hf["num_denseA"],
          hf["vocab_size"], hf["max_position_embeddings"]) == (2, 16, 2, 8, 24, 12, 2, 2, 64, 32)
  assert hf["layer_norm_eps"] == 1e-6 and hf["rope_theta"] == 10000.0
  assert hf["reference_rope"] is True and hf["dtype"] == param_dtype
  assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (2, 3, 0)
  assert hf["custom_G_type"] == (None if g_mode == "learned" else "identity")
  # model.safetensors: exactly the authors' .pth names and shapes (+ the port's G buffers).
  header, _ = _header(folder / "model.safetensors")
  shapes = {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}
  want = tiny_layout(learned=g_mode == "learned")
  if g_mode != "learned":
    want = {**want, "decoder.past_G_values": (2, 3, 1, 2, 8, 8),
            "decoder.past_G_values_status": (2,)}
    g_buf = read_safetensors(folder / "model.safetensors")["decoder.past_G_values"]
    np.testing.assert_array_equal(g_buf[:, 2, 0], np.broadcast_to(np.eye(8), (2, 2, 8, 8)))
    assert not g_buf[:, :2].any()
  assert shapes == want
  assert {v["dtype"] for k, v in header.items()
          if k not in ("__metadata__", "decoder.past_G_values_status")} == {
              "BF16" if param_dtype == "bfloat16" else "F32"}
  got_cfg, got, g = load_hf(folder)
  assert got_cfg == cfg and g is None
  jax.tree.map(np.testing.assert_array_equal, got, params)
  assert {x.dtype for x in jax.tree.leaves(got)} == {x.dtype for x in jax.tree.leaves(params)}
  assert load_checkpoint(folder)[0] == cfg  # the same one call for every format


def test_hf_fixed_g_and_half_rotation_round_trip(tmp_path):
  cfg = config_lib.tiny(g_mode="transferred", rope_interleaved=False, **F64)
  params = _hf_params(cfg, 18)
  g = np.random.default_rng(19).normal(size=(2, 2, 8, 8))
  with pytest.raises(ValueError, match="g_lm"):
    save_hf(tmp_path / "no_g", params, cfg)
  save_hf(tmp_path / "hub", params, cfg, g_lm=g)
  hf = json.loads((tmp_path / "hub" / "config.json").read_text())
  assert hf["custom_G_type"] == "external" and hf["reference_rope"] is False
  got_cfg, got, got_g = load_hf(tmp_path / "hub")
  assert got_cfg == cfg
  np.testing.assert_array_equal(got_g, g)
  jax.tree.map(np.testing.assert_array_equal, got, params)
  # A bare model.safetensors of a fixed-G model: heads and G come from the G buffer.
  cfg2, _, g2 = load_checkpoint(tmp_path / "hub" / "model.safetensors", max_len=32,
                                a_dff=12, num_res_units=2)
  assert cfg2 == cfg.replace(rope_interleaved=True) and np.array_equal(g2, g)


def test_hf_config_errors(tmp_path):
  cfg = config_lib.tiny()
  params = _hf_params(cfg, 20)
  folder = tmp_path / "hub"
  save_hf(folder, params, cfg)
  with pytest.raises(ValueError, match="learned-G model"):
    save_hf(tmp_path / "x", params, cfg, g_lm=np.zeros((2, 2, 8, 8)))
  with pytest.raises(ValueError, match="causal_metric"):
    save_hf(tmp_path / "x", params, cfg.replace(causal_metric=True))
  # Inference-only ablation: the learned model's other weights, a G brought by the caller.
  abl_cfg, abl, g = load_hf(folder, g_mode="transferred")
  assert abl_cfg == cfg.replace(g_mode="transferred") and g is None
  assert len(jax.tree.leaves(unstack_layers(abl))) == len(tiny_layout(learned=False))
  hf = json.loads((folder / "config.json").read_text())
  for field, value, match in [("model_type", "llama", "not a PLDR-LLM"),
                              ("num_denseA", 3, "num_denseA"),
                              ("num_attention_heads", 4, "hidden_size=16"),
                              ("num_hidden_layers", 3, "missing key")]:
    (folder / "config.json").write_text(json.dumps({**hf, field: value}))
    with pytest.raises(ValueError, match=match):
      load_hf(folder)
  with pytest.raises(ValueError, match="no config.json"):
    load_hf(tmp_path)


# ------------------------------------------------------ (a) the authors' files

@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_pth_round_trip(tmp_path, param_dtype):
  import torch
  cfg = config_lib.tiny(param_dtype=param_dtype)
  np_dtype = np.dtype(ml_dtypes.bfloat16) if param_dtype == "bfloat16" else np.dtype(np.float32)
  sd = random_state_dict(tiny_layout(), seed=14, dtype=np_dtype)
  params = state_dict_to_params(sd, cfg)
  path = tmp_path / "model.pth"
  save_state_dict(params, cfg, path)
  raw = torch.load(path, map_location="cpu", weights_only=True)
  assert list(raw) == list(sd)
  assert raw["final_layer.weight"].shape == (64, 16)
  loaded = load_state_dict(path)
  for k in sd:
    assert loaded[k].dtype == np_dtype
    np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
  # A checkpoint saved by a training script: {'model': state_dict, ...}; torch tensors in.
  wrapped = tmp_path / "ckpt.pt"
  torch.save({"model": {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()},
              "step": 7}, wrapped)
  loaded = load_state_dict(wrapped)
  assert loaded.keys() == sd.keys()
  direct = state_dict_to_params(
      {k: torch.from_numpy(v.astype(np.float32)) for k, v in sd.items()}, cfg)
  jax.tree.map(np.testing.assert_array_equal, direct, params)


def test_pth_without_torch_says_install_torch(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read")
  with pytest.raises(ImportError, match="install torch to read .pth"):
    load_state_dict(path)
  cfg = config_lib.tiny()
  params = state_dict_to_params(random_state_dict(tiny_layout()), cfg)
  with pytest.raises(ImportError, match="install torch"):
    save_state_dict(params, cfg, tmp_path / "out.pth")


def _authors_checkpoint(sd):
  """What the authors' save_model / fsdp_save_model write: torch tensors in their wrapper,
  with a real AdamW state next to the weights."""
  import torch
  tensors = {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}
  w = torch.nn.Parameter(torch.ones(3))
  opt = torch.optim.AdamW([w], lr=1e-3, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
  w.sum().backward()
  opt.step()
  return tensors, opt.state_dict()


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
def test_authors_pth_wrapper_and_non_model_files(tmp_path):
  import torch
  sd = random_state_dict(tiny_layout(), seed=21, dtype=np.float32)
  tensors, opt_state = _authors_checkpoint(sd)
  path = tmp_path / "pldr_ep1_bn10_bs1.pth"
  torch.save({"model_state_dict": tensors, "optimizer_state_dict": opt_state, "loss": 2.5,
              "accuracy": 0.4}, path)
  loaded = load_state_dict(path)
  assert loaded.keys() == sd.keys()
  for k in sd:
    np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
  cfg, params, g = load_checkpoint(path, max_len=32)
  assert cfg == config_lib.tiny() and g is None
  # Exported back in the same wrapper, which their load_model reads.
  out = tmp_path / "export.pth"
  save_state_dict(params, cfg, out, wrap=True)
  raw = torch.load(out, weights_only=True)
  assert set(raw) == {"model_state_dict", "optimizer_state_dict", "loss", "accuracy"}
  assert list(raw["model_state_dict"]) == list(tiny_layout())
  # Files that are not a model: the message says what they are and what to pass.
  cases = {
      "optim.pth": (opt_state, "optimizer state"),
      "no_model.pth": ({"model_state_dict": None, "optimizer_state_dict": opt_state,
                        "loss": 1.0, "accuracy": 0.5}, "without model weights"),
      "metrics.pth": ({"loss": [1.0, 2.0], "step": 3}, "without tensors"),
      "other.pth": ({"conv.weight": torch.zeros(2, 2)}, "no PLDR-LLM names"),
      "tensor.pth": (torch.zeros(3), "not a state dict"),
  }
  for name, (obj, what) in cases.items():
    torch.save(obj, tmp_path / name)
    with pytest.raises(CheckpointError, match=what) as e:
      load_state_dict(tmp_path / name)
    assert name in str(e.value) and "_dcp folder" in str(e.value), name
  import pickle
  with open(tmp_path / "hparams.pth", "wb") as f:  # e.g. the authors' *_hparams.pkl: a function
    pickle.dump({"num_layers": 5, "activation": np.sum}, f, protocol=2)
  with pytest.raises(CheckpointError, match="weights_only.*tokenizer"):
    load_state_dict(tmp_path / "hparams.pth")
  (tmp_path / "noise.pth").write_bytes(b"\x00\x01random bytes, not a checkpoint")
  with pytest.raises(CheckpointError, match="not a torch.save file"):
    load_state_dict(tmp_path / "noise.pth")


@pytest.mark.skipif(not HAS_TORCH, reason="torch not installed")
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_authors_dcp_folder(tmp_path):
  """The authors' save_dcp_model: dcp.save({'app': AppState(model)}), AppState.state_dict()
  = {'model': model_state_dict, 'optim': None}; read back on one CPU process."""
  import torch.distributed.checkpoint as dcp
  sd = random_state_dict(tiny_layout(), seed=22, dtype=ml_dtypes.bfloat16)
  tensors = {k: v for k, v in torch_tensors(sd).items()}
  folder = tmp_path / "pldr_ep1_bn10_bs1_dcp"
  dcp.save({"app": {"model": tensors, "optim": None}}, checkpoint_id=str(folder))
  loaded = load_state_dict(folder)
  assert loaded.keys() == sd.keys()
  for k in sd:
    assert loaded[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded[k], sd[k], err_msg=k)
  cfg, params, _ = load_checkpoint(folder, max_len=32)
  assert cfg == config_lib.tiny(param_dtype="bfloat16")
  optim_only = tmp_path / "optim_dcp"
  dcp.save({"app": {"model": {}, "optim": {"state": {"x": tensors["final_layer.bias"]}}}},
           checkpoint_id=str(optim_only))
  with pytest.raises(CheckpointError, match="without model weights"):
    load_state_dict(optim_only)
  with pytest.raises(CheckpointError, match="neither a DCP"):
    load_state_dict(tmp_path)

"""pldr_jax.load: a run directory, a Hugging Face folder or a checkpoint file."""

import dataclasses
import shutil

import jax
import numpy as np
import pytest

import pldr_jax
from pldr_jax.training import checkpoint as ckpt_lib
from pldr_jax import config as config_lib
from pldr_jax import g_modes, params as params_lib
from pldr_jax.compat import hf, torch_files
from pldr_jax.config import DataConfig

from conftest import PUBLISHED_DATA

TOKENIZER = PUBLISHED_DATA / "pldr-refinedweb-32k.model"


def _assert_same(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _run_dir(root, config, params_by_step, g_lm=None):
  """A run directory as the trainer writes it: checkpoints/<step> with the configs in meta."""
  data = DataConfig(tokenizer_path=str(TOKENIZER), vocab_size=config.vocab_size)
  with ckpt_lib.Checkpointer(root / "checkpoints", async_save=False) as ck:
    for step, params in params_by_step.items():
      ck.save(step, params=params, opt_state={}, data_state={},
              g_lm=None if g_lm is None else {"G_LM": np.asarray(g_lm)},
              meta={"model": dataclasses.asdict(config), "data": dataclasses.asdict(data)})
  return root


def test_load_a_run_directory(tmp_path):
  c = config_lib.tiny(vocab_size=32000)
  p3 = params_lib.init_params(c, jax.random.key(3))
  p5 = params_lib.init_params(c, jax.random.key(5))
  run = _run_dir(tmp_path / "run", c, {3: p3, 5: p5})
  config, params, g_lm, tok = pldr_jax.load(run)  # unpacks as four
  assert config == c and g_lm is None
  _assert_same(params, p5)
  assert tok.encode("hello world") and tok.vocab_size == 32000
  m = pldr_jax.load(run / "checkpoints", step=3)
  assert m.step == 3 and m.data.tokenizer_path == str(TOKENIZER)
  _assert_same(m.params, p3)


def test_load_a_fixed_g_run_keeps_its_g(tmp_path):
  c = config_lib.tiny(g_mode="random")
  g = g_modes.make_fixed_g(c, jax.random.key(1))
  p = params_lib.init_params(c, jax.random.key(2))
  m = pldr_jax.load(_run_dir(tmp_path / "run", c, {7: p}, g_lm=g))
  np.testing.assert_array_equal(np.asarray(m.g_lm), np.asarray(g))


def test_load_published_layouts(tmp_path):
  c = config_lib.tiny()
  p = params_lib.init_params(c, jax.random.key(4))
  hf.save_hf(tmp_path / "hub", p, c)
  shutil.copy(TOKENIZER, tmp_path / "hub" / "tokenizer.model")
  m = pldr_jax.load(tmp_path / "hub", max_len=c.max_len)
  assert m.config.num_layers == c.num_layers and m.step is None and m.tokenizer is not None
  _assert_same(m.params, p)
  torch_files.save_state_dict(p, c, tmp_path / "m.safetensors")
  config, params, g_lm, tok = pldr_jax.load(tmp_path / "m.safetensors", max_len=c.max_len)
  assert config.d_model == c.d_model and g_lm is None and tok is None
  _assert_same(params, p)
  with pytest.raises(FileNotFoundError, match="nothing to load"):
    pldr_jax.load(tmp_path / "absent")


def test_one_error_hierarchy():
  """Every error the library raises on purpose is a PldrError (and the builtin it was)."""
  from less_jax import errors as less_errors
  from pldr_jax import errors
  for cls in (errors.ConfigError, errors.InputError, errors.DataError, errors.GShapeError,
              errors.CheckpointError, errors.TrainingError,
              less_errors.PolicyError, less_errors.KernelError, less_errors.KernelLoadError,
              less_errors.SparseStateError):
    assert issubclass(cls, errors.PldrError), cls
  with pytest.raises(errors.PldrError, match="d_model"):
    config_lib.tiny(d_model=15)
  e = errors.CheckpointError("/x/ck", "item 'params' missing")
  assert (e.path, e.reason) == ("/x/ck", "item 'params' missing") and isinstance(e, RuntimeError)

"""The two rotary pairings: interleaved (the authors' code) and half rotation
(rotate_half, the Hugging Face port's `reference_rope=false`).

Half rotation pairs (x[i], x[i + dk/2]) where interleaved pairs (x[2i], x[2i+1]),
each pair turned by the same angle pos * base^(-2i/dk). So a model run with half
rotation equals the interleaved model whose head axis is permuted by
perm = [0, 2, 4, ..., 1, 3, 5, ...] in everything q and k touch: the wq / wk
kernel columns and biases of each head, and (learned G) every dk x dk tensor on
both trailing axes, the A LayerNorms, and the metric learner's GLU inputs and
outputs. The tests build that permuted model by hand and compare logits in
float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import errors
from pldr_jax import config as config_lib
from pldr_jax import rotary
from pldr_jax.model import forward
from pldr_jax.params import init_params, stack_layers, unstack_layers

F64 = dict(param_dtype="float64", compute_dtype="float64")


def _perm(dk):
  return np.concatenate([np.arange(0, dk, 2), np.arange(1, dk, 2)])


def _rotate_half_reference(x, pos, base):
  """x: [S, dk] NumPy; Llama-style q*cos + rotate_half(q)*sin with cos = cat(f, f)."""
  dk = x.shape[-1]
  freqs = pos[:, None] * base ** (-np.arange(0, dk, 2) / dk)
  cos, sin = np.cos(np.concatenate([freqs, freqs], -1)), np.sin(np.concatenate([freqs, freqs], -1))
  rot = np.concatenate([-x[:, dk // 2:], x[:, :dk // 2]], -1)
  return x * cos + rot * sin


@pytest.mark.x64
def test_half_rotation_matches_rotate_half_and_permuted_interleaved():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 7, 3, 8))
  pos = np.array([[0, 1, 2, 5, 9, 30, 31]])
  half = rotary.apply_rotary(jnp.asarray(x), jnp.asarray(pos), 10000.0, interleaved=False)
  for h in range(3):
    np.testing.assert_allclose(np.asarray(half)[0, :, h],
                               _rotate_half_reference(x[0, :, h], pos[0], 10000.0),
                               rtol=1e-12, atol=1e-12)
  inter = rotary.apply_rotary(jnp.asarray(x), jnp.asarray(pos), 10000.0)
  p = _perm(8)
  again = rotary.apply_rotary(jnp.asarray(x[..., p]), jnp.asarray(pos), 10000.0, interleaved=False)
  np.testing.assert_allclose(np.asarray(again), np.asarray(inter)[..., p], rtol=1e-12, atol=1e-12)
  assert not np.allclose(np.asarray(half), np.asarray(inter))


def permute_for_half_rotation(params, config):
  """The interleaved model's parameters rearranged so that half rotation computes the same.

  Permuted layer by layer (the list layout), returned with the layers stacked again."""
  h, dk = config.num_heads, config.head_dim
  p = _perm(dk)
  both = lambda t: t[..., p, :][..., p]
  out = unstack_layers(jax.tree.map(np.asarray, params))
  for layer in out["layers"]:
    for name in ("wq", "wk"):
      k = layer[name]["kernel"]
      layer[name]["kernel"] = k.reshape(k.shape[0], h, dk)[..., p].reshape(k.shape)
      layer[name]["bias"] = layer[name]["bias"].reshape(h, dk)[..., p].reshape(-1)
    if config.learned_g:
      layer["ln_a"] = {k: v[p] for k, v in layer["ln_a"].items()}
      for unit in layer["res_units"]:
        for glu in ("glu1", "glu2"):
          g = unit[glu]
          g["w1"]["kernel"] = g["w1"]["kernel"][p]
          g["w2"]["kernel"] = g["w2"]["kernel"][p]
          g["w3"]["kernel"] = g["w3"]["kernel"][:, p]
          g["w3"]["bias"] = g["w3"]["bias"][p]
        unit["ln"] = {k: v[p] for k, v in unit["ln"].items()}
      layer["plga"] = {k: both(v) for k, v in layer["plga"].items()}
  return stack_layers(out, np)


def _perturbed_params(config, seed):
  params = init_params(config, jax.random.key(seed))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [np.asarray(x) + 0.05 * rng.normal(size=x.shape) for x in leaves]  # no zero biases
  return jax.tree.unflatten(tree, leaves)


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("g_mode", ["learned", "transferred"])
def test_half_rotation_model_equals_permuted_interleaved_model(g_mode):
  cfg = config_lib.tiny(g_mode=g_mode, **F64)
  half_cfg = cfg.replace(rope_interleaved=False)
  params = _perturbed_params(cfg, 1)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, size=(2, 10)))
  g = None
  if g_mode == "transferred":  # a fixed G is dk x dk per head: permuted on both axes too
    g = np.random.default_rng(3).normal(size=(cfg.num_layers, cfg.num_heads, 8, 8)) / 3
  want, _ = forward(params, tokens, config=cfg, g_lm=g)
  p = _perm(cfg.head_dim)
  g_half = None if g is None else g[..., p, :][..., p]
  got, _ = forward(jax.tree.map(jnp.asarray, permute_for_half_rotation(params, cfg)), tokens,
                   config=half_cfg, g_lm=g_half)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10,
                             atol=1e-10 * float(np.max(np.abs(want))))
  # The switch changes the computation: the same weights give other logits.
  other, _ = forward(params, tokens, config=half_cfg, g_lm=g)
  assert np.max(np.abs(np.asarray(other) - np.asarray(want))) > 1e-3 * np.max(np.abs(want))
  # Permuting wq / wk alone is not enough when G is learned (or not the identity).
  wrong = jax.tree.map(np.asarray, params)
  good = permute_for_half_rotation(params, cfg)
  wrong["layers"]["wq"], wrong["layers"]["wk"] = good["layers"]["wq"], good["layers"]["wk"]
  bad, _ = forward(jax.tree.map(jnp.asarray, wrong), tokens, config=half_cfg, g_lm=g)
  assert np.max(np.abs(np.asarray(bad) - np.asarray(want))) > 1e-3 * np.max(np.abs(want))


def test_rope_interleaved_is_validated():
  with pytest.raises(errors.ConfigError, match="rope_interleaved"):
    config_lib.tiny(rope_interleaved="yes")

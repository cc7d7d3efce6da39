"""PLDRConfig.attention (fused `jax.nn.dot_product_attention` paths) and
PLDRConfig.remat (`jax.checkpoint` per layer): the same numbers as the plain,
fully-saved forward and backward, and what each is for (remat keeps less)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import errors
from pldr_jax import config as config_lib
from pldr_jax import model, plga

try:
  from tests.helpers import perturbed_params, random_tokens
except ImportError:  # pragma: no cover
  from helpers import perturbed_params, random_tokens


def _np_attention(q, k, v, g, lengths):
  """softmax((q G) k^T / sqrt(dk), key s visible to t iff s <= t and s < len) v, written
  plainly in float64. q, k, v: [B, S, H, dk]; g: [B, H, dk, dk] or [B, S, H, dk, dk]."""
  q, k, v, g = (np.asarray(x, np.float64) for x in (q, k, v, g))
  b, s, h, dk = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for t in range(s):
      for hi in range(h):
        gm = g[bi, hi] if g.ndim == 4 else g[bi, t, hi]
        qg = q[bi, t, hi] @ gm
        keys = [j for j in range(s) if j <= t and j < lengths[bi]]
        sc = np.array([qg @ k[bi, j, hi] for j in keys]) / np.sqrt(dk)
        p = np.exp(sc - sc.max())
        p /= p.sum()
        out[bi, t, hi] = sum(pj * v[bi, j, hi] for pj, j in zip(p, keys))
  return out


@pytest.mark.parametrize("causal_g", [False, True])
def test_fused_attention_matches_the_formula_written_plainly(causal_g):
  rng = np.random.default_rng(0)
  b, s, h, dk = 2, 9, 2, 4
  q, k, v = (rng.standard_normal((b, s, h, dk)).astype(np.float32) for _ in range(3))
  gshape = (b, s, h, dk, dk) if causal_g else (b, h, dk, dk)
  g = (0.4 * rng.standard_normal(gshape)).astype(np.float32)
  lengths = np.array([9, 5])
  want = _np_attention(q, k, v, g, lengths)
  got = plga.fused_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(g),
                             jnp.asarray(lengths), "xla")
  assert got.shape == (b, s, h, dk) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
  pos = jnp.broadcast_to(jnp.arange(s), (b, s))
  plain, _ = plga.plga_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                 jnp.asarray(g), plga.causal_mask(pos, pos, jnp.asarray(lengths)))
  np.testing.assert_allclose(np.asarray(plain), want, rtol=1e-5, atol=1e-5)


def _loss_and_grads(c, p, toks, lens):
  s = toks.shape[1]

  def loss(p):
    logits, _ = model.forward(p, toks, lens, config=c)
    real = (jnp.arange(s)[None, :] < lens[:, None])[..., None]
    return jnp.sum(jnp.where(real, jnp.tanh(logits), 0.0))

  return jax.jit(jax.value_and_grad(loss))(p)


def _max_rel(a, b):
  return max(float(jnp.max(jnp.abs(x - y)) / (jnp.max(jnp.abs(y)) + 1e-30))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
@pytest.mark.parametrize("g_kw", [dict(), dict(causal_metric=True)])
def test_xla_attention_gives_the_plain_forward_and_gradients(g_kw):
  """fp32 (jax's fused paths compute in fp32 at best): loss and gradients as close to
  the float64 plain pass as the fp32 plain pass is. The power-law step's backward
  amplifies fp32 rounding (to ~1e-4 with the causal metric), so the fused path is
  held to the plain path's own error, not to a fixed tolerance."""
  c = config_lib.tiny(**g_kw)
  p = perturbed_params(c)
  toks, lens = random_tokens(c, (3, 20)), jnp.array([20, 13, 4], jnp.int32)
  v0, g0 = _loss_and_grads(c, p, toks, lens)
  v1, g1 = _loss_and_grads(c.replace(attention="xla"), p, toks, lens)
  with jax.enable_x64(True):
    c64 = c.replace(param_dtype="float64", compute_dtype="float64")
    p64 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), p)
    v64, g64 = _loss_and_grads(c64, p64, toks, lens)
    err_plain, err_xla = _max_rel(g0, g64), _max_rel(g1, g64)
    # the loss sums ~4,000 fp32 terms; a wrong mask or a lost G_LM moves it by > 1e-2
    assert abs(float(v1) - float(v64)) <= max(3 * abs(float(v0) - float(v64)),
                                              5e-5 * abs(float(v64)))
  assert err_xla <= max(3 * err_plain, 1e-5), (err_xla, err_plain)
  # the deductive outputs (the scores among them) still come from the plain path
  _, ded = model.forward(p, toks, lens, config=c.replace(attention="xla"), return_deductive=True)
  assert ded[0]["logits"].shape == (3, c.num_heads, 20, 20)


@pytest.mark.slow
@pytest.mark.parametrize("base_kw, variants", [
    (dict(), [dict(remat="minimal"), dict(remat="full"), dict(remat="full", scan_layers=False)]),
    (dict(attention="xla", causal_metric=True), [dict(remat="minimal")]),
])
def test_remat_gives_the_same_loss_and_gradients(base_kw, variants):
  """float64: recomputing a layer in the backward pass changes no number (scanned and
  unrolled layers, with the fused attention and the causal metric too)."""
  with jax.enable_x64(True):
    base = config_lib.tiny(param_dtype="float64", compute_dtype="float64", **base_kw)
    p = perturbed_params(base)
    toks, lens = random_tokens(base, (3, 16)), jnp.array([16, 11, 3], jnp.int32)
    v0, g0 = _loss_and_grads(base, p, toks, lens)
    for kw in variants:
      v1, g1 = _loss_and_grads(base.replace(**kw), p, toks, lens)
      assert abs(float(v1 - v0)) <= 1e-12 * abs(float(v0)), kw
      assert _max_rel(g1, g0) < 1e-10, kw


@pytest.mark.slow
def test_remat_keeps_less_for_the_backward_pass():
  """The compiled value-and-grad of a 4-layer model: `full` and `minimal` need less
  temporary memory than `none` (what remat is for), `full` the least."""
  c = config_lib.tiny(d_model=64, num_heads=4, num_layers=4, d_ff=128, a_dff=32,
                      max_len=128)
  p = perturbed_params(c)
  toks = random_tokens(c, (8, 128))
  lens = jnp.full((8,), 128, jnp.int32)
  temp = {}
  for remat in ("none", "minimal", "full"):
    cc = c.replace(remat=remat)

    def loss(p):
      return jnp.sum(model.forward(p, toks, lens, config=cc)[0] ** 2)

    m = jax.jit(jax.grad(loss)).lower(p).compile().memory_analysis()
    temp[remat] = m.temp_size_in_bytes
  assert temp["full"] < temp["minimal"] < temp["none"], temp


def test_attention_and_remat_settings_are_checked():
  with pytest.raises(errors.ConfigError, match="attention"):
    config_lib.tiny(attention="splash")
  with pytest.raises(errors.ConfigError, match="bfloat16"):
    config_lib.tiny(attention="cudnn")
  with pytest.raises(errors.ConfigError, match="remat"):
    config_lib.tiny(remat="some")
  assert config_lib.tiny(attention="cudnn", compute_dtype="bfloat16").attention == "cudnn"

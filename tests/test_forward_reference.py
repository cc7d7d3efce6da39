"""The JAX PLDR-LLM forward pass against the plain NumPy float64 reference.

`tests/reference.py` is written straight from docs/pldr.md without
looking at `pldr_jax.model`. The first group of tests checks the reference
itself against facts that do not come from its own code (complex rotation,
Q^T Q is symmetric PSD, padding invariance, causality), so a wrong reference
cannot silently agree with a wrong model. The second group compares the model.

Tolerances. `assert_close(x, ref, tol)` is np.testing.assert_allclose with
rtol=tol and atol=tol * max|ref|: elementwise relative where an element is of
the tensor's scale, and relative to the tensor's largest element where an
element is near zero (an element that is a difference of O(1) terms cannot be
held to a relative error of its own size). tol is 1e-10 in float64 and 1e-5
in float32 (fp32 parameters cast to float64 for the reference). The fp32
checks are arranged around the power law's conditioning: see the comment
above test_fp32_matches_reference_well_conditioned.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import config as config_lib
from pldr_jax.params import init_params

try:  # rootdir-relative import works whether or not tests/ is a package
  from tests import reference as ref
except ImportError:  # pragma: no cover
  import reference as ref

FP64_TOL = 1e-10
FP32_TOL = 1e-5
DEDUCTIVE_KEYS = ("A_in", "A", "A_LM", "A_P", "G_LM", "logits")
SEQ = 12
RAGGED_LENGTHS = (SEQ, 9, 4)


# ------------------------------------------------------------------ helpers

def assert_close(x, want, tol, name=""):
  x = np.asarray(x, dtype=np.float64)
  want = np.asarray(want, dtype=np.float64)
  assert x.shape == want.shape, f"{name}: shape {x.shape} != reference {want.shape}"
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  err = float(np.max(np.abs(x - want))) if want.size else 0.0
  np.testing.assert_allclose(
      x, want, rtol=tol, atol=tol * max(scale, 1e-300),
      err_msg=f"{name}: max|diff|={err:.3e}, max|ref|={scale:.3e}")


def perturb(tree, rng, dtype):
  """Adds small random values to every bias, offset and LN scale.

  The initialiser zeroes b, b_a and biases and sets LN scales to one; left like
  that, a transposed or dropped bias would go unseen.
  """
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      if isinstance(v, (dict, list, tuple)):
        out[k] = perturb(v, rng, dtype)
      else:
        arr = np.asarray(v, dtype=np.float64)
        if k in ("bias", "b", "b_a"):
          arr = arr + 0.1 * rng.standard_normal(arr.shape)
        elif k == "scale":
          arr = arr * (1.0 + 0.1 * rng.standard_normal(arr.shape))
        out[k] = jnp.asarray(arr, dtype=dtype)
    return out
  if isinstance(tree, (list, tuple)):
    return [perturb(v, rng, dtype) for v in tree]
  return jnp.asarray(tree, dtype=dtype)


def make_params(model, cfg, seed):
  params = init_params(cfg, jax.random.PRNGKey(seed))
  dtype = jnp.dtype(cfg.param_dtype)
  for leaf in jax.tree_util.tree_leaves(params):
    assert leaf.dtype == dtype, f"init_params gave {leaf.dtype}, want {dtype}"
  return perturb(params, np.random.default_rng(seed + 1000), dtype)


def make_tokens(cfg, seed, batch=len(RAGGED_LENGTHS), seq=SEQ):
  rng = np.random.default_rng(seed)
  return rng.integers(0, cfg.vocab_size, size=(batch, seq)).astype(np.int32)


def np_params(params):
  """float64 NumPy params with a list of per-layer trees (the reference layout)."""
  return ref.to_f64(ref.per_layer(jax.tree_util.tree_map(np.asarray, params)))


@pytest.fixture(scope="module")
def model():
  try:
    from pldr_jax import model as model_lib
  except ModuleNotFoundError as e:
    if e.name == "pldr_jax.model":
      pytest.skip("pldr_jax.model does not exist yet")
    raise
  return model_lib


def cfg64(**kw):
  return config_lib.tiny(param_dtype="float64", compute_dtype="float64", **kw)


def tiny_ref_config(**kw):
  """A config for the reference-only checks (no model needed)."""
  return cfg64(**kw)


def random_ref_params(cfg, seed):
  """Parameters for the reference self-checks, built without the model."""
  rng = np.random.default_rng(seed)
  d, dk, nh, dff, adff, v = (cfg.d_model, cfg.head_dim, cfg.num_heads, cfg.d_ff,
                             cfg.a_dff, cfg.vocab_size)

  def dn(i, o):
    return {"kernel": rng.standard_normal((i, o)) / math.sqrt(i),
            "bias": 0.1 * rng.standard_normal(o)}

  def ln(n):
    return {"scale": 1 + 0.1 * rng.standard_normal(n), "bias": 0.1 * rng.standard_normal(n)}

  def g(n, hdim):
    return {"w1": dn(n, hdim), "w2": dn(n, hdim), "w3": dn(hdim, n)}

  def xavier(shape):
    return rng.standard_normal(shape) * math.sqrt(2.0 / (shape[-1] + shape[-2]))

  layers = []
  for _ in range(cfg.num_layers):
    layer = {"wq": dn(d, d), "wk": dn(d, d), "wv": dn(d, d), "wo": dn(d, d),
             "ffn": g(d, dff), "ln1": ln(d), "ln2": ln(d)}
    if cfg.g_mode == "learned":
      layer["ln_a"] = ln(dk)
      layer["res_units"] = [{"glu1": g(dk, adff), "glu2": g(dk, adff), "ln": ln(dk)}
                            for _ in range(cfg.num_res_units)]
      layer["plga"] = {"W": xavier((nh, dk, dk)), "b": 0.1 * rng.standard_normal((nh, dk, dk)),
                       "P": xavier((nh, dk, dk)), "a": xavier((nh, dk, dk)),
                       "b_a": 0.1 * rng.standard_normal((nh, dk, dk))}
    layers.append(layer)
  return {"embed": rng.standard_normal((v, d)), "ln_embed": ln(d), "layers": layers,
          "head": dn(d, v)}


# ====================================================== reference self-checks

def test_reference_rotary_is_complex_rotation():
  rng = np.random.default_rng(0)
  dk, seq, base = 8, 7, 10000.0
  x = rng.standard_normal((seq, dk))
  pos = np.arange(seq)
  out = ref.rotary(x, pos, base)
  # Pair i as the complex number x[2i] + 1j x[2i+1], times exp(1j * pos * base**(-2i/dk)).
  z = x[:, 0::2] + 1j * x[:, 1::2]
  freqs = np.array([base ** (-(2.0 * i) / dk) for i in range(dk // 2)])
  zr = z * np.exp(1j * pos[:, None] * freqs[None, :])
  np.testing.assert_allclose(out[:, 0::2], zr.real, rtol=0, atol=1e-14)
  np.testing.assert_allclose(out[:, 1::2], zr.imag, rtol=0, atol=1e-14)
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1),
                             rtol=1e-14)
  np.testing.assert_array_equal(out[0], x[0])  # position 0 is not rotated
  # Hand value: pair 0 rotates by exactly `pos` radians.
  np.testing.assert_allclose(
      out[3, :2], [x[3, 0] * np.cos(3) - x[3, 1] * np.sin(3),
                   x[3, 1] * np.cos(3) + x[3, 0] * np.sin(3)], atol=1e-14)
  # Relative-position property: <rot(q, m), rot(k, n)> depends only on m - n.
  q, k = rng.standard_normal(dk), rng.standard_normal(dk)
  dots = [ref.rotary(q[None], [m], base)[0] @ ref.rotary(k[None], [m - 2], base)[0]
          for m in (2, 5, 11)]
  np.testing.assert_allclose(dots, dots[0], rtol=1e-12)


def test_reference_metric_input_is_gram_matrix():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((10, 8))
  a = ref.metric_input_raw(q, 6)
  np.testing.assert_allclose(a, q[:6].T @ q[:6], rtol=1e-13, atol=1e-13)
  np.testing.assert_array_equal(a, a.T)
  assert np.linalg.eigvalsh(a).min() > -1e-12      # positive semi-definite
  assert np.linalg.matrix_rank(ref.metric_input_raw(q, 3)) == 3  # rank <= #positions
  # LN over rows: with unit scale / zero offset each row has mean 0, variance ~1.
  ln = ref.layer_norm(a, {"scale": np.ones(8), "bias": np.zeros(8)}, 1e-6)
  np.testing.assert_allclose(ln.mean(-1), 0, atol=1e-13)
  np.testing.assert_allclose(ln.var(-1), 1, rtol=1e-4)


def test_reference_pointwise_hand_values():
  # iSwiGLU(x) = x^2 sigmoid(x): hand values.
  np.testing.assert_allclose(ref.iswiglu(np.array([1.0, -2.0, 0.0])),
                             [1 / (1 + math.exp(-1)), 4 / (1 + math.exp(2)), 0.0], rtol=1e-15)
  assert np.all(ref.iswiglu(np.linspace(-50, 50, 101)) >= 0)
  # Power law on one head with hand loops for both matrix products.
  rng = np.random.default_rng(2)
  dk = 3
  plga = {k: rng.standard_normal((1, dk, dk)) for k in ("W", "b", "P", "a", "b_a")}
  a = rng.standard_normal((dk, dk))
  a_lm, a_p, g = ref.power_law(a, plga, 0)
  for i in range(dk):
    for j in range(dk):
      pre = sum(plga["W"][0, i, m] * a[m, j] for m in range(dk)) + plga["b"][0, i, j]
      want_lm = pre * pre / (1 + math.exp(-pre)) + 1e-9
      assert a_lm[i, j] == pytest.approx(want_lm, rel=1e-13)
      assert a_p[i, j] == pytest.approx(want_lm ** plga["P"][0, i, j], rel=1e-12)
  for i in range(dk):
    for j in range(dk):
      want_g = sum(plga["a"][0, i, m] * a_p[m, j] for m in range(dk)) + plga["b_a"][0, i, j]
      assert g[i, j] == pytest.approx(want_g, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_reference_padding_invariance(causal):
  """Each padded sequence gives what it gives alone (spec: PLGA step 2)."""
  cfg = tiny_ref_config(causal_metric=causal)
  params = random_ref_params(cfg, 3)
  tokens = make_tokens(cfg, 4)
  logits, ded = ref.forward(params, tokens, RAGGED_LENGTHS, cfg)
  for b, n in enumerate(RAGGED_LENGTHS):
    alone, ded1 = ref.forward(params, tokens[b:b + 1, :n], None, cfg)
    np.testing.assert_allclose(logits[b, :n], alone[0], rtol=1e-12, atol=1e-12)
    for l in range(cfg.num_layers):
      for key in ("A_in", "A", "G_LM"):
        got = ded[l][key][b, :n] if causal else ded[l][key][b]
        np.testing.assert_allclose(got, ded1[l][key][0], rtol=1e-12, atol=1e-12)


def test_reference_causality():
  """Default metric: a later token changes earlier logits (A sees the whole
  sequence); causal metric: it cannot."""
  cfg = tiny_ref_config()
  params = random_ref_params(cfg, 5)
  tokens = make_tokens(cfg, 6, batch=1)
  changed = tokens.copy()
  changed[0, -1] = (changed[0, -1] + 1) % cfg.vocab_size
  for causal, should_differ in ((False, True), (True, False)):
    a, _ = ref.forward(params, tokens, None, cfg, causal_metric=causal)
    b, _ = ref.forward(params, changed, None, cfg, causal_metric=causal)
    diff = np.max(np.abs(a[0, :-1] - b[0, :-1]))
    assert (diff > 1e-8) == should_differ, (causal, diff)


def test_reference_causal_metric_last_position_is_full_metric():
  cfg = tiny_ref_config()
  params = random_ref_params(cfg, 7)
  tokens = make_tokens(cfg, 8)
  _, full = ref.forward(params, tokens, RAGGED_LENGTHS, cfg, causal_metric=False)
  _, caus = ref.forward(params, tokens, RAGGED_LENGTHS, cfg, causal_metric=True)
  # Layer 0 sees the same inputs in both modes (later layers do not: the
  # earlier positions of layer 0 already differ). From the last valid position
  # on, the causal A is complete, so every metric tensor and the score rows of
  # those positions equal the full-metric ones.
  for b, n in enumerate(RAGGED_LENGTHS):
    for t in range(n - 1, SEQ):
      for key in ("A_in", "A", "A_LM", "A_P", "G_LM"):
        np.testing.assert_allclose(caus[0][key][b, t], full[0][key][b], rtol=1e-13,
                                   atol=1e-13)
    for t in range(n - 1):   # before it, A is built from fewer positions
      assert np.max(np.abs(caus[0]["A_in"][b, t] - full[0]["A_in"][b])) > 1e-6
  for b, n in enumerate(RAGGED_LENGTHS):
    np.testing.assert_allclose(caus[0]["logits"][b, :, n - 1:], full[0]["logits"][b, :, n - 1:],
                               rtol=1e-12, atol=1e-12)


def test_reference_identity_g_is_sdpa():
  cfg = tiny_ref_config()
  params = random_ref_params(cfg, 9)
  tokens = make_tokens(cfg, 10)
  eye = np.broadcast_to(np.eye(cfg.head_dim), (cfg.num_layers, cfg.num_heads) + (cfg.head_dim,) * 2)
  with_g, _ = ref.forward(params, tokens, RAGGED_LENGTHS, cfg, g_lm=eye)
  sdpa, _ = ref.forward(params, tokens, RAGGED_LENGTHS, cfg, skip_g=True)
  np.testing.assert_allclose(with_g, sdpa, rtol=1e-14, atol=1e-14)
  learned, _ = ref.forward(params, tokens, RAGGED_LENGTHS, cfg)
  assert np.max(np.abs(learned - sdpa)) > 1e-3  # G_LM actually matters


# ====================================================== model vs reference

def deductive_checks(ded, want, params_np, cfg, tol, batch, causal, tag):
  nl, nh, dk = cfg.num_layers, cfg.num_heads, cfg.head_dim
  assert isinstance(ded, (list, tuple)) and len(ded) == nl, f"{tag}: {len(ded)} layers"
  g_shape = (batch, SEQ, nh, dk, dk) if causal else (batch, nh, dk, dk)
  for l in range(nl):
    for key in DEDUCTIVE_KEYS:
      assert key in ded[l], f"{tag}: layer {l} has no deductive '{key}'"
      got = np.asarray(ded[l][key])
      if key != "logits":
        assert got.shape == g_shape, f"{tag} layer {l} {key}: shape {got.shape}"
      assert_close(got, want[l][key], tol, f"{tag} layer {l} {key}")
    for key in ("P", "a", "b_a"):
      assert_close(ded[l][key], params_np["layers"][l]["plga"][key], tol, f"{tag} layer {l} {key}")


def run_model(model, params, tokens, lengths, cfg, jit=False, **kw):
  fn = model.forward
  if jit:
    fn = jax.jit(model.forward, static_argnames=("config", "return_deductive"))
  lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  return fn(params, jnp.asarray(tokens, jnp.int32), lengths, config=cfg, **kw)


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("causal", [False, True], ids=["full_metric", "causal_metric"])
def test_fp64_matches_reference(model, causal):
  """Unjitted, right-padded batch: logits and every deductive tensor."""
  cfg = cfg64(causal_metric=causal)
  params = make_params(model, cfg, 11)
  tokens = make_tokens(cfg, 12)
  logits, ded = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, return_deductive=True)
  assert logits.dtype == jnp.float64
  p_np = np_params(params)
  want, want_ded = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg)
  assert_close(logits, want, FP64_TOL, "logits")
  deductive_checks(ded, want_ded, p_np, cfg, FP64_TOL, tokens.shape[0], causal, "fp64")
  plain, none = run_model(model, params, tokens, RAGGED_LENGTHS, cfg)
  assert none is None
  assert_close(plain, want, FP64_TOL, "logits (return_deductive=False)")


@pytest.mark.x64
@pytest.mark.parametrize("causal", [False, True], ids=["full_metric", "causal_metric"])
def test_fp64_jit_matches_reference(model, causal):
  """Under jax.jit (lengths=None under jit: test_model_padding_invariance)."""
  cfg = cfg64(causal_metric=causal)
  params = make_params(model, cfg, 13)
  tokens = make_tokens(cfg, 14)
  logits, ded = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, jit=True,
                          return_deductive=True)
  p_np = np_params(params)
  want, want_ded = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg)
  assert_close(logits, want, FP64_TOL, "jit logits")
  deductive_checks(ded, want_ded, p_np, cfg, FP64_TOL, tokens.shape[0], causal, "fp64 jit")


# fp32. The power law A_P = A_LM ** P is ill-conditioned wherever an element of
# A_LM = x^2 sigmoid(x) + 1e-9 is tiny (x near 0) and P < 0: the relative error
# of A_LM there is many times fp32's epsilon, and A_P's relative error is P times
# that. With the initialiser's own parameters this takes end-to-end fp32-vs-fp64
# differences of A_P, G_LM and everything after it to 1e-4..2e-3 (measured, tiny
# config, several seeds) even though every stage of the fp32 model is accurate
# to < 5e-7 given its inputs. So the fp32 model is checked at 1e-5 in two ways
# that do not depend on that conditioning:
#  1. end to end with the power-law bias shifted so A_LM is O(1) everywhere;
#  2. with the initialiser's parameters, stage by stage: each stage of the
#     reference is fed the model's own fp32 input to that stage, and the scores
#     and logits are recomputed with the model's own G_LM.
WELL_CONDITIONED_SHIFT = 6.0


@pytest.mark.parametrize("causal", [False, True], ids=["full_metric", "causal_metric"])
def test_fp32_matches_reference_well_conditioned(model, causal):
  cfg = config_lib.tiny(param_dtype="float32", compute_dtype="float32", causal_metric=causal)
  params = make_params(model, cfg, 15)
  plga_p = params["layers"]["plga"]  # stacked over layers
  plga_p["b"] = plga_p["b"] + jnp.float32(WELL_CONDITIONED_SHIFT)
  tokens = make_tokens(cfg, 16)
  logits, ded = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, jit=True,
                          return_deductive=True)
  assert logits.dtype == jnp.float32
  p_np = np_params(params)             # the fp32 values, exactly, in float64
  want, want_ded = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg)
  assert min(d["A_LM"].min() for d in want_ded) > 1e-3, "not well conditioned"
  assert_close(logits, want, FP32_TOL, "fp32 logits")
  deductive_checks(ded, want_ded, p_np, cfg, FP32_TOL, tokens.shape[0], causal, "fp32")


@pytest.mark.parametrize("causal", [False, True], ids=["full_metric", "causal_metric"])
def test_fp32_stagewise_matches_reference(model, causal):
  cfg = config_lib.tiny(param_dtype="float32", compute_dtype="float32", causal_metric=causal)
  params = make_params(model, cfg, 17)
  tokens = make_tokens(cfg, 18)
  logits, ded = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, jit=True,
                          return_deductive=True)
  assert logits.dtype == jnp.float32
  p_np = np_params(params)
  d64 = [{k: np.asarray(v, np.float64) for k, v in layer.items()} for layer in ded]
  # Upstream of the power law, layer 0 is well conditioned end to end.
  _, want_ded = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg)
  for key in ("A_in", "A", "A_LM"):
    assert_close(d64[0][key], want_ded[0][key], FP32_TOL, f"fp32 layer 0 {key}")
  # Each stage from the model's own input to it. W, b, P, a, b_a are [H, dk, dk]
  # and broadcast over the leading batch (and position) axes.
  for l, (dl, layer) in enumerate(zip(d64, p_np["layers"])):
    pl = layer["plga"]
    stages = {
        "A": ref.metric_learner(dl["A_in"], layer, cfg.ln_eps),
        "A_LM": ref.iswiglu(pl["W"] @ dl["A"] + pl["b"]) + ref.POWER_LAW_FLOOR,
        "A_P": dl["A_LM"] ** pl["P"],
        "G_LM": pl["a"] @ dl["A_P"] + pl["b_a"],
    }
    for key, want in stages.items():
      assert_close(dl[key], want, FP32_TOL, f"fp32 layer {l} {key} from the model's input")
  # Scores and logits with the model's own G_LM.
  g_model = np.stack([dl["G_LM"] for dl in d64])
  want, want_pinned = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg, g_lm=g_model)
  assert_close(logits, want, FP32_TOL, "fp32 logits with the model's G_LM")
  for l in range(cfg.num_layers):
    assert_close(d64[l]["logits"], want_pinned[l]["logits"], FP32_TOL,
                 f"fp32 layer {l} scores with the model's G_LM")


@pytest.mark.x64
def test_model_padding_invariance(model):
  """Spec PLGA step 2: a batched sequence gives what it gives alone.

  (Also implied by test_fp64_matches_reference and the reference's own
  padding-invariance check; checked directly here on the shortest sequence,
  one compile per shape being the cost, and by refilling the padding.)
  """
  cfg = cfg64()
  params = make_params(model, cfg, 27)
  tokens = make_tokens(cfg, 28)
  # (return_deductive=True only to reuse test_fp64_jit_matches_reference's compile)
  logits, _ = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, jit=True,
                        return_deductive=True)
  b = int(np.argmin(RAGGED_LENGTHS))
  n = RAGGED_LENGTHS[b]
  alone, _ = run_model(model, params, tokens[b:b + 1, :n], None, cfg, jit=True)
  assert_close(logits[b, :n], alone[0], FP64_TOL, f"sequence {b} padded vs alone")
  refilled = tokens.copy()
  pad = np.arange(SEQ)[None, :] >= np.asarray(RAGGED_LENGTHS)[:, None]
  refilled[pad] = (refilled[pad] + 1 + np.arange(pad.sum()) % 7) % cfg.vocab_size
  logits2, _ = run_model(model, params, refilled, RAGGED_LENGTHS, cfg, jit=True,
                         return_deductive=True)
  for b, n in enumerate(RAGGED_LENGTHS):
    assert_close(logits2[b, :n], logits[b, :n], FP64_TOL, f"sequence {b}, other padding tokens")


@pytest.mark.x64
def test_identity_mode_is_sdpa(model):
  cfg = cfg64(g_mode="identity")
  params = make_params(model, cfg, 19)
  for key in ("ln_a", "res_units", "plga"):
    assert key not in params["layers"], f"g_mode identity params still have '{key}'"
  tokens = make_tokens(cfg, 20)
  logits, _ = run_model(model, params, tokens, RAGGED_LENGTHS, cfg)
  p_np = np_params(params)
  eye = np.broadcast_to(np.eye(cfg.head_dim), (cfg.num_layers, cfg.num_heads) + (cfg.head_dim,) * 2)
  want_g, _ = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg, g_lm=eye)
  want_sdpa, _ = ref.forward(p_np, tokens, RAGGED_LENGTHS, cfg, skip_g=True)
  np.testing.assert_allclose(want_g, want_sdpa, rtol=1e-14, atol=1e-14)
  assert_close(logits, want_sdpa, FP64_TOL, "identity-mode logits vs SDPA reference")
  assert_close(logits, want_g, FP64_TOL, "identity-mode logits vs G=I reference")


@pytest.mark.x64
@pytest.mark.parametrize("per_batch", [False, True], ids=["g_LHdd", "g_LBHdd"])
def test_random_mode_given_g(model, per_batch):
  cfg = cfg64(g_mode="random")
  params = make_params(model, cfg, 21)
  tokens = make_tokens(cfg, 22)
  rng = np.random.default_rng(23)
  shape = (cfg.num_layers,) + ((tokens.shape[0],) if per_batch else ()) + (
      cfg.num_heads, cfg.head_dim, cfg.head_dim)
  g = np.eye(cfg.head_dim) + 0.3 * rng.standard_normal(shape)
  logits, _ = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, g_lm=jnp.asarray(g))
  want, _ = ref.forward(np_params(params), tokens, RAGGED_LENGTHS, cfg, g_lm=g)
  assert_close(logits, want, FP64_TOL, "random-mode logits with given G_LM")


@pytest.mark.x64
def test_learned_mode_g_override_identity_is_sdpa(model):
  """A G_LM given in learned mode replaces the computed one: G = I is SDPA."""
  cfg = cfg64()
  params = make_params(model, cfg, 24)
  tokens = make_tokens(cfg, 25)
  eye = np.broadcast_to(np.eye(cfg.head_dim), (cfg.num_layers, cfg.num_heads) + (cfg.head_dim,) * 2)
  logits, _ = run_model(model, params, tokens, RAGGED_LENGTHS, cfg, g_lm=jnp.asarray(eye))
  want, _ = ref.forward(np_params(params), tokens, RAGGED_LENGTHS, cfg, skip_g=True)
  assert_close(logits, want, FP64_TOL, "learned mode with g_lm=I vs SDPA reference")

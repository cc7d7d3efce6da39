"""LESS and sparse policies on pldr_jax models (less_jax.model).

Most checks run eagerly (op by op), like tests/test_less_core.py: the small
per-op executables are compiled once and shared by every policy, kernel and
g_mode combination, whereas each jitted (config, policy, kernels, shape)
combination costs 1-4 s of XLA compilation on a CPU. After the first calls an
eager prefill or decode step of the tiny model takes ~50 ms.
`test_jitted_decode_donates_state_matches_eager_and_respects_active` checks
the jitted wrappers against the eager functions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import less_jax as lj
from less_jax import errors as lerr
from less_jax import model as lm
from helpers import perturbed_params, random_tokens
from pldr_jax import errors
from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax import g_modes, model
from pldr_jax.inference.kv_cache import GCache

# pldr_jax's whole-sequence references run their layers unrolled, op by op like
# less_jax.model (whose layers may each have their own kernels): the same eager
# ops, where the default lax.scan compiles the layer as one XLA computation
# (last-bit differences that a learned G_LM amplifies; see the test docstrings).
# decode.decode_step runs its layers unrolled already.
fwd = functools.partial(model.forward, unroll=True)
p_prefill = functools.partial(decode.prefill, unroll=True)
p_step = decode.decode_step


def l_forward(p, t, lens, kernels=None, g_lm=None, *, config, policy):
  return lm.less_forward(p, t, lens, config=config, policy=policy, kernels=kernels, g_lm=g_lm)


def l_prefill(p, t, lens, kernels=None, g_lm=None, *, config, policy, max_len=None):
  return lm.less_prefill(p, t, lens, config=config, policy=policy, kernels=kernels,
                         g_lm=g_lm, max_len=max_len, mode="greedy")


l_step = lm.less_decode_step

RANK, HIDDEN = 4, 16
W = 18  # every token array is [B, W] (B = 1 or 2): eager executables are per shape
H2O_SMALL = lj.h2o(heavy=3, recent=2)
LAMBDA_SMALL = lj.lambda_mask(sink=2, recent=3)


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision("highest"):
    yield


def _config(g_mode="learned", **kw):
  return cfg.tiny(max_len=64, g_mode=g_mode, **kw)


@functools.lru_cache(maxsize=None)
def _params(c, seed=0):
  return perturbed_params(c, seed)


_tokens = random_tokens


def _kernels(c, seed=0, rank=RANK, head_dim=None):
  """Random per-layer kernels whose low-rank part matters (d1, d2 far from 1e-4)."""
  out = []
  for i in range(c.num_layers):
    kern = lj.init_kernels(jax.random.PRNGKey(seed + i), head_dim or c.head_dim,
                           c.num_heads, rank=rank, hidden=HIDDEN)
    rng = np.random.default_rng(seed + 100 + i)
    out.append(kern._replace(
        d1=jnp.asarray(rng.uniform(0.5, 1.5, (c.num_heads, rank)), jnp.float32),
        d2=jnp.asarray(rng.uniform(-1.0, 1.0, (c.num_heads, rank)), jnp.float32)))
  return out


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _next_tokens(t, lengths):
  return jax.vmap(lambda row, n: row[n])(t, lengths)


def _less_decode_all(p, c, t, lens, steps, policy, kernels=None, g_lm=None):
  """less_prefill on the first lens[b] tokens of t [B, W] (the array padded by what
  follows), then `steps` decode steps fed t[b, lens[b]:]. One array shape [B, W]."""
  logits, state, gcache = l_prefill(p, t, jnp.asarray(lens, jnp.int32), kernels, g_lm,
                                    config=c, policy=policy)
  outs = []
  for _ in range(steps):
    lg, state = l_step(p, gcache, state, _next_tokens(t, state.lengths), kernels=kernels,
                       config=c, policy=policy)
    outs.append(lg)
  return logits, jnp.stack(outs, 1), state, gcache


def _cached_g(gcache, b):
  """The G-cache's G_LM of sequence b as a g_lm argument [L, 1, H, dk, dk]."""
  return gcache.g_lm[:, b:b + 1]


# (1) -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("g_mode,policy", [
    ("identity", lj.h2o(heavy=16, recent=16)),
    ("identity", lj.lambda_mask(sink=4, recent=28)),
    ("learned", lj.h2o(heavy=16, recent=16)),
    ("random", lj.lambda_mask(sink=4, recent=28)),
])
def test_large_budget_without_kernels_equals_full_model(g_mode, policy):
  """Budget >= sequence length: nothing is evicted, LESS == the full model.

  Learned G in fp32: layer l's G_LM depends on layer l-1's attention, and the
  power-law step amplifies its last-bit rounding (A_LM near its 1e-9 floor,
  raised to a learned power): one-ulp differences in the attention arithmetic
  (the LESS core scales logits by 1/sqrt(dk), pldr_jax divides) move a random
  tiny model's layer-1 G_LM by ~1e-5 relative and the logits by ~3e-5. So, as
  tests/test_decode.py does, the 1e-5 comparison is made with the same G_LM
  injected into both models (pldr_jax's own, for forward and for the G-cache),
  and the G_LM that LESS computes itself is compared to pldr_jax's at 1e-4
  (layer 0, which sees identical inputs: exactly).
  """
  c = _config(g_mode)
  p = _params(c)
  g_lm = g_modes.make_fixed_g(c, key=jax.random.key(3))
  t = _tokens(c, (2, W))
  lens = jnp.array([W, 13], jnp.int32)
  real = [W, 13]
  ref, aux = fwd(p, t, lens, config=c, g_lm=g_lm, return_aux=True)
  got = l_forward(p, t, lens, None, g_lm, config=c, policy=policy)
  if c.learned_g:
    for b, n in enumerate(real):
      assert _rel(got[b, :n], ref[b, :n]) < 1e-4
    g_full = aux["G_LM"]
    ref, _ = fwd(p, t, lens, config=c, g_lm=g_full)
    got = l_forward(p, t, lens, None, g_full, config=c, policy=policy)
  for b, n in enumerate(real):
    assert _rel(got[b, :n], ref[b, :n]) < 1e-5

  plens, steps = [12, 7], 6
  plens_a = jnp.asarray(plens, jnp.int32)
  if c.learned_g:
    pre_ref, _, gc = p_prefill(p, t, plens_a, config=c, cache_len=32)
    pre, _, gcache = l_prefill(p, t, plens_a, config=c, policy=policy)
    assert jax.tree.structure(gcache) == jax.tree.structure(gc)  # GCache(g_lm)
    for b, n in enumerate(plens):
      assert _rel(pre[b, :n], pre_ref[b, :n]) < 1e-4
    for i in range(c.num_layers):
      for key in ("g_lm",):
        assert _rel(getattr(gcache, key)[i], getattr(gc, key)[i]) < (1e-6 if i == 0 else 1e-4)
    g_lm = gc.g_lm  # pldr_jax's G-cache
  pre_ref, st, gc = p_prefill(p, t, plens_a, config=c, cache_len=32, g_lm=g_lm)
  outs_ref = []
  for _ in range(steps):
    lg, st = p_step(p, gc, st, _next_tokens(t, st.lengths), config=c)
    outs_ref.append(lg)
  outs_ref = jnp.stack(outs_ref, 1)
  pre, outs, state, gcache = _less_decode_all(p, c, t, plens, steps, policy, g_lm=g_lm)
  assert jax.tree.structure(gcache) == jax.tree.structure(gc)  # same G-cache as pldr_jax
  for b, n in enumerate(plens):
    assert _rel(pre[b, :n], pre_ref[b, :n]) < 1e-5
  assert _rel(outs, outs_ref) < 1e-5
  np.testing.assert_array_equal(np.asarray(state.lengths), np.asarray(plens) + steps)


# (2) -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("with_kernels", [False, True], ids=["sparse", "less"])
@pytest.mark.parametrize("policy", [H2O_SMALL, LAMBDA_SMALL], ids=["h2o", "lambda"])
@pytest.mark.parametrize("g_mode", ["identity", "learned"])
def test_decode_matches_parallel_form_position_by_position(g_mode, policy, with_kernels):
  """Prefill + decode == less_forward with the prompt's G_LM held fixed, with evictions."""
  c = _config(g_mode)
  p = _params(c)
  kern = _kernels(c) if with_kernels else None
  t = _tokens(c, (2, W), seed=2)
  lens, steps = [9, 6], 7
  pre, outs, state, gcache = _less_decode_all(p, c, t, lens, steps, policy, kern)
  # Evictions happened in the prompt and during decode.
  assert policy.budget < min(lens)
  if with_kernels:
    assert float(jnp.min(jnp.sum(state.layers[0].z, -1))) > 0
  for b, n in enumerate(lens):
    row = t[b:b + 1]
    g = _cached_g(gcache, b) if c.learned_g else None
    full = l_forward(p, row, jnp.array([n + steps], jnp.int32), kern, g, config=c,
                     policy=policy)[0]
    assert _rel(pre[b, :n], full[:n]) < 1e-5
    assert _rel(outs[b], full[n:n + steps]) < 1e-5
    # The prompt's own G_LM (no g_lm given) is what prefill used.
    alone = l_forward(p, row, jnp.array([n], jnp.int32), kern, None, config=c,
                      policy=policy)[0]
    assert _rel(pre[b, :n], alone[:n]) < 1e-5


def test_less_differs_from_sparse_and_full_attention():
  """Guards against the comparisons above passing trivially (G_LM held fixed)."""
  c = _config("learned")
  p = _params(c)
  t = _tokens(c, (1, W), seed=2)
  lens = jnp.array([W], jnp.int32)
  full, aux = fwd(p, t, lens, config=c, return_aux=True)
  g = aux["G_LM"]
  sparse = l_forward(p, t, lens, None, g, config=c, policy=H2O_SMALL)
  less = l_forward(p, t, lens, _kernels(c), g, config=c, policy=H2O_SMALL)
  assert _rel(sparse, full) > 1e-3
  assert _rel(less, sparse) > 1e-4
  # Up to the first eviction (t <= budget) all three agree; LESS up to the spec's
  # 1e-6 floor, which scales the sparse part by 1 / (1 + 1e-6 / sum_C exp(s)).
  n = H2O_SMALL.budget + 1
  assert _rel(sparse[0, :n], full[0, :n]) < 1e-5
  assert _rel(less[0, :n], full[0, :n]) < 1e-3
  assert _rel(sparse[0, n], full[0, n]) > 1e-4


# (3) -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("g_mode", ["identity", "learned"])
def test_batched_sequences_get_what_they_get_alone(g_mode):
  c = _config(g_mode)
  p = _params(c)
  kern = _kernels(c, seed=5)
  policy = H2O_SMALL
  t = _tokens(c, (2, W), seed=4)
  lens, steps = [11, 5], 4
  # Sequence b: its prompt t[b, :n], then the continuation t[b, 11:15]. Batched,
  # the rest of the array is filled with 1s; alone, with other tokens.
  alone_rows = [jnp.concatenate([t[b, :n], t[b, 11:], t[b, n:11]])[None] for b, n in
                enumerate(lens)]
  batched = jnp.concatenate([r.at[0, lens[b] + steps:].set(1) for b, r in
                             enumerate(alone_rows)])
  pre, outs, _, gcache = _less_decode_all(p, c, batched, lens, steps, policy, kern)
  fwd_b = l_forward(p, batched, jnp.asarray(lens, jnp.int32), kern, None, config=c,
                    policy=policy)
  for b, n in enumerate(lens):
    row = alone_rows[b]
    pre1, outs1, _, gc1 = _less_decode_all(p, c, row, [n], steps, policy, kern)
    assert _rel(pre[b, :n], pre1[0, :n]) < 1e-5
    assert _rel(outs[b], outs1[0]) < 1e-5
    assert jax.tree.structure(gcache) == jax.tree.structure(gc1)
    for key in ("g_lm",):
      if getattr(gcache, key) is None:
        continue
      for mine, alone in zip(getattr(gcache, key), getattr(gc1, key)):  # per layer
        assert _rel(mine[b], alone[0]) < 1e-5
    fwd1 = l_forward(p, row, jnp.array([n], jnp.int32), kern, None, config=c, policy=policy)
    assert _rel(fwd_b[b, :n], fwd1[0, :n]) < 1e-5


# (4) -------------------------------------------------------------------------

@pytest.mark.slow
def test_decode_state_bytes_do_not_grow_with_the_sequence():
  """Same bytes at 1k and 8k tokens, for contexts of 1024 and 8192.

  The prompt is short; decoding then continues at positions ~1000 and ~8000
  (what the state holds does not depend on how it got there, and nothing in it
  is sized by the position or max_len).
  """
  policy = lj.lambda_mask(sink=4, recent=12)
  c8k = cfg.tiny(max_len=8192)
  c1k = cfg.tiny(max_len=1024)
  p = _params(c8k)  # max_len sizes no parameter: the same params fit both configs
  kern = _kernels(c8k)
  t = _tokens(c8k, (2, W), seed=6)
  lens = jnp.array([W, 9], jnp.int32)
  b, h, dk, n_layers, slots = 2, c8k.num_heads, c8k.head_dim, c8k.num_layers, policy.budget
  expect = n_layers * (2 * b * h * slots * dk * 4 + b * h * slots * (4 + 4)
                       + b * h * RANK * (dk + 1) * 4) + b * 4

  _, st_1k_ctx, _ = l_prefill(p, t, lens, kern, config=c1k, policy=policy)
  _, st, gc = l_prefill(p, t, lens, kern, config=c8k, policy=policy)
  sizes = {"prompt, max_len 1024": lm.decode_state_bytes(st_1k_ctx),
           "prompt, max_len 8192": lm.decode_state_bytes(st)}
  for start in (1000, 8000):
    st = st.replace(lengths=jnp.array([start, start + 100], jnp.int32))
    for i in range(3):
      lg, st = l_step(p, gc, st, t[:, i], config=c8k, policy=policy, kernels=kern)
    assert np.isfinite(np.asarray(lg)).all()
    np.testing.assert_array_equal(np.asarray(st.lengths), [start + 3, start + 103])
    sizes[f"{start} tokens + 3 steps"] = lm.decode_state_bytes(st)
  assert set(sizes.values()) == {expect}, sizes
  # The full KV cache of pldr_jax grows with the context (shapes only, nothing allocated).
  full = {n: lj.cache_bytes(jax.eval_shape(
      functools.partial(decode.prefill, config=c8k, cache_len=n), p, t, lens)[1])
          for n in (1024, 8192)}
  assert full[8192] > 7 * full[1024] > 7 * expect


# (5) -------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors():
  c = _config("learned")
  p = _params(c)
  t = _tokens(c, (2, W))
  lens = jnp.array([W, 6], jnp.int32)
  kern = _kernels(c)
  # Budget larger than the context.
  with pytest.raises(lerr.PolicyError, match="context"):
    lm.less_prefill(p, t, lens, config=c, policy=lj.h2o(40, 40))
  with pytest.raises(lerr.PolicyError, match="context"):
    lm.less_forward(p, t, lens, config=c, policy=lj.lambda_mask(4, 61))
  with pytest.raises(lerr.PolicyError, match="context"):
    lm.less_prefill(p, t, lens, config=c, policy=lj.h2o(8, 8), max_len=12)
  with pytest.raises(lerr.PolicyError, match="Policy"):
    lm.less_forward(p, t, lens, config=c, policy="h2o")
  # Kernels for another head width / number of layers / not a list.
  with pytest.raises(lerr.KernelError, match="head width"):
    lm.less_prefill(p, t, lens, config=c, policy=H2O_SMALL, kernels=_kernels(c, head_dim=4))
  with pytest.raises(lerr.KernelError, match="layers"):
    lm.less_forward(p, t, lens, config=c, policy=H2O_SMALL, kernels=kern[:1])
  with pytest.raises(lerr.KernelError, match="per layer"):
    lm.less_forward(p, t, lens, config=c, policy=H2O_SMALL, kernels=kern[0])
  broken = [kern[0]._replace(wk3=jnp.zeros((c.num_heads, 3, 3), jnp.float32)), kern[1]]
  with pytest.raises(lerr.KernelError, match="wk3"):
    lm.less_forward(p, t, lens, config=c, policy=H2O_SMALL, kernels=broken)
  # Decode with kernels of another rank than the state was built with.
  _, state, gcache = l_prefill(p, t, lens, kern, config=c, policy=H2O_SMALL)
  with pytest.raises(lerr.SparseStateError, match="rank 2"):
    lm.less_decode_step(p, gcache, state, t[:, 0], config=c, policy=H2O_SMALL,
                        kernels=_kernels(c, rank=2))
  with pytest.raises(lerr.SparseStateError, match="rank 0"):
    lm.less_decode_step(p, gcache, state, t[:, 0], config=c, policy=H2O_SMALL)
  # Decode with another policy than the state's.
  with pytest.raises(lerr.SparseStateError, match="slots"):
    lm.less_decode_step(p, gcache, state, t[:, 0], config=c, policy=lj.h2o(4, 4),
                        kernels=kern)
  # Tokens of the wrong shape; a G-cache without G_LM.
  with pytest.raises(errors.InputError, match="tokens"):
    lm.less_decode_step(p, gcache, state, t[:, :2], config=c, policy=H2O_SMALL, kernels=kern)
  with pytest.raises(lerr.SparseStateError, match="sequences"):
    lm.less_decode_step(p, gcache, state, t[:1, 0], config=c, policy=H2O_SMALL, kernels=kern)
  with pytest.raises(lerr.SparseStateError, match="G_LM"):
    lm.less_decode_step(p, GCache(), state, t[:, 0], config=c, policy=H2O_SMALL,
                        kernels=kern)
  # Model inputs: checked as pldr_jax does.
  with pytest.raises(errors.InputError, match="outside the vocabulary"):
    lm.less_prefill(p, t.at[0, 2].set(c.vocab_size), lens, config=c, policy=H2O_SMALL)
  with pytest.raises(errors.InputError, match="context"):
    lm.less_prefill(p, t, lens, config=c, policy=lj.h2o(2, 2), max_len=8)
  with pytest.raises(errors.InputError, match="empty prompt"):
    lm.less_forward(p, t, jnp.array([W, 0], jnp.int32), config=c, policy=H2O_SMALL)
  cr = _config("random")
  with pytest.raises(ValueError, match="needs its constant G_LM"):
    lm.less_forward(_params(cr), t, lens, config=cr, policy=H2O_SMALL)


# Jit, donation, inactive sequences, kernel-training data ---------------------

@pytest.mark.slow
def test_jitted_decode_donates_state_matches_eager_and_respects_active():
  c = _config("learned")
  p = _params(c)
  kern = _kernels(c)
  t = _tokens(c, (2, W))
  lens = jnp.array([8, 6], jnp.int32)
  _, st_j, gc_j = lm.less_prefill_jit(p, t, lens, kern, config=c, policy=H2O_SMALL)
  _, st_e, gc_e = lm.less_prefill(p, t, lens, config=c, policy=H2O_SMALL, kernels=kern)
  assert _rel(gc_j.g_lm[0], gc_e.g_lm[0]) < 1e-5
  # Decode both from the eager prefill: a learned G_LM in fp32 amplifies the
  # last-bit differences of jitted vs eager prefill (see tests/test_decode.py).
  st, gc = jax.tree.map(jnp.copy, st_e), jax.tree.map(jnp.copy, gc_e)
  lg_e, st_e2 = lm.less_decode_step(p, gc_e, st_e, t[:, 8], config=c, policy=H2O_SMALL,
                                    kernels=kern)
  k_before = st.layers[0].k
  # A host copy (np.asarray would be a zero-copy view that pins the buffers).
  st_before = jax.tree.map(lambda x: np.array(x, copy=True), st)
  active = jnp.array([True, False])
  lg, st2 = lm.less_decode_step_jit(p, gc, st, t[:, 8], kern, active, config=c,
                                    policy=H2O_SMALL)
  assert k_before.is_deleted()  # donated
  assert not gc.g_lm.is_deleted()
  assert _rel(lg, lg_e) < 1e-5
  np.testing.assert_array_equal(np.asarray(st2.lengths), [9, 6])
  # Sequence 1 was inactive: its cache is untouched; sequence 0's equals eager.
  for new, ref, old in zip(st2.layers, st_e2.layers, st_before.layers):
    for a, r, o in zip(jax.tree.leaves(new), jax.tree.leaves(ref), jax.tree.leaves(old)):
      np.testing.assert_allclose(np.asarray(a[0]), np.asarray(r[0]), rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(o[1]))


@pytest.mark.parametrize("g_mode", ["identity", "learned"])
def test_collect_layer_io_is_the_frozen_models_attention(g_mode):
  c = _config(g_mode)
  p = _params(c)
  t = _tokens(c, (2, W))
  lens = jnp.array([W, 9], jnp.int32)
  io = lm.collect_layer_io(p, t, lens, config=c)
  _, aux = fwd(p, t, lens, config=c, return_aux=True)
  assert len(io) == c.num_layers
  for i, rec in enumerate(io):
    a = jax.tree.map(lambda x, i=i: x[i], aux)  # layer i of the stacked aux
    assert set(rec) == {"q_eff", "k", "v", "out", "wo"}
    assert rec["out"].shape == (2, W, c.num_heads, c.head_dim)
    assert _rel(rec["k"], a["k"]) < 1e-6 and _rel(rec["v"], a["v"]) < 1e-6  # same eager ops
    # out == dense causal attention of (q_eff, k, v) == less with an infinite budget.
    dense = lj.full_causal_attention(rec["q_eff"], rec["k"], rec["v"], lens)
    assert _rel(rec["out"], dense) < 1e-5
    big = lj.less_attention_parallel(rec["q_eff"], rec["k"], rec["v"], lens,
                                     lj.sliding_window(W))
    assert _rel(rec["out"], big) < 1e-5
    np.testing.assert_array_equal(np.asarray(rec["wo"]["kernel"]),
                                  np.asarray(p["layers"]["wo"]["kernel"][i]))


def test_one_shot_prefill_keeps_the_prompts_own_outputs():
  """Default prefill: the prompt runs with full attention, so its logits are the
  model's own; the greedy prefill changes them once the prompt exceeds the budget.
  Decoding then continues from the evicted cache (+ LESS state)."""
  c = _config("learned")
  p = _params(c)
  kern = _kernels(c)
  t = _tokens(c, (2, W))
  lens = jnp.array([W, 11], jnp.int32)
  want, _ = fwd(p, t, lens, config=c)
  logits, st, gc = lm.less_prefill(p, t, lens, config=c, policy=H2O_SMALL, kernels=kern)
  for b, n in enumerate([W, 11]):
    assert _rel(logits[b, :n], want[b, :n]) < 1e-5
  greedy, _, _ = lm.less_prefill(p, t, lens, config=c, policy=H2O_SMALL, kernels=kern,
                                 mode="greedy")
  assert _rel(greedy[0], want[0]) > 1e-3  # the sparse cache changes the prompt's outputs
  for layer in st.layers:
    assert (np.asarray(layer.pos) >= 0).sum(-1).max() == H2O_SMALL.budget
    assert np.asarray(layer.z).any()  # evicted prompt pairs folded in
  nxt, st2 = lm.less_decode_step(p, gc, st, t[:, 5], config=c, policy=H2O_SMALL, kernels=kern)
  assert np.isfinite(np.asarray(nxt)).all()
  np.testing.assert_array_equal(np.asarray(st2.lengths), [W + 1, 12])

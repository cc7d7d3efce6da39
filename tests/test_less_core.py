"""Tests of the model-independent LESS core (less_jax) against a float64 NumPy
reference written from docs/less.md (tests/less_reference.py).

Most checks run JAX eagerly (op by op): the small per-op executables are shared
by every policy, which keeps the suite fast on a CPU; `test_jit_matches_eager`
checks that the jitted functions give the same numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import less_reference as ref

import less_jax as lj
from less_jax import errors as lerr  # noqa: E402
from pldr_jax.errors import ConfigError, InputError

B, S, H, D = 2, 24, 2, 8
LENGTHS = np.array([24, 17], np.int32)
RANK, HIDDEN = 4, 16

POLICIES = {
    "h2o": (lj.h2o(heavy=4, recent=3), ("h2o", 4, 3)),
    "lambda": (lj.lambda_mask(sink=2, recent=5), ("lambda", 2, 5)),
    "window": (lj.sliding_window(6), ("window", 6)),
}


@pytest.fixture(autouse=True)
def _highest_precision():
  # fp32 matmuls everywhere (no TF32/bf16 passes on accelerators).
  with jax.default_matmul_precision("highest"):
    yield


def make_qkv(seed=0, b=B, s=S, h=H, d=D):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.normal(size=(b, s, h, d)).astype(np.float32) for _ in range(3))
  return q, k, v


def make_kernels(seed=0, h=H, d=D, share_heads=False):
  """Kernels whose low-rank part matters (d1, d2 far from their 1e-4 init)."""
  kern = lj.init_kernels(jax.random.PRNGKey(seed), d, h, rank=RANK,
                         hidden=HIDDEN, share_heads=share_heads)
  rng = np.random.default_rng(seed + 100)
  hk = kern.d1.shape[0]
  return kern._replace(
      d1=jnp.asarray(rng.uniform(0.5, 1.5, (hk, RANK)), jnp.float32),
      d2=jnp.asarray(rng.uniform(-1.0, 1.0, (hk, RANK)), jnp.float32))


def kernels_np(kern):
  return None if kern is None else {n: np.asarray(getattr(kern, n)) for n in kern._fields}


def decode_all(q, k, v, lengths, policy, kern, step_fn=lj.sparse_decode_step):
  """Feeds [B, S] tokens one by one (sequence b stops after lengths[b])."""
  b, s, h, d = q.shape
  cache = lj.init_cache(b, h, d, policy, rank=lj.kernel_rank(kern))
  outs = []
  for t in range(s):
    out, cache = step_fn(cache, jnp.asarray(q[:, t]), jnp.asarray(k[:, t]),
                         jnp.asarray(v[:, t]), jnp.full((b,), t, jnp.int32),
                         policy, kern, active=jnp.asarray(t < np.asarray(lengths)))
    outs.append(np.asarray(out))
  outs = np.stack(outs, 1)
  real = np.arange(s)[None, :, None, None] < np.asarray(lengths)[:, None, None, None]
  return np.where(real, outs, 0.0), cache


def kept_positions(cache, b, h):
  p = np.asarray(cache.pos[b, h])
  return sorted(p[p >= 0].tolist())


def assert_same_cache(c1, c2, atol=1e-5):
  """Same slots, tokens, scores, state (slot order included)."""
  np.testing.assert_array_equal(np.asarray(c1.pos), np.asarray(c2.pos))
  np.testing.assert_array_equal(np.asarray(c1.k), np.asarray(c2.k))
  np.testing.assert_array_equal(np.asarray(c1.v), np.asarray(c2.v))
  for name in ("score", "h", "z"):
    np.testing.assert_allclose(np.asarray(getattr(c1, name)),
                               np.asarray(getattr(c2, name)), atol=atol, rtol=1e-5,
                               err_msg=name)


# (a) + (d): parallel == decode == prefill == float64 reference, every policy.
@pytest.mark.slow
@pytest.mark.parametrize("with_kernels", [False, True], ids=["sparse", "less"])
@pytest.mark.parametrize("name", list(POLICIES))
def test_forms_agree_with_reference(name, with_kernels):
  policy, rpolicy = POLICIES[name]
  q, k, v = make_qkv(1)
  kern = make_kernels(2) if with_kernels else None

  expected, results = ref.ref_batch(q, k, v, LENGTHS, rpolicy, kernels_np(kern))
  out_par = np.asarray(lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern))
  out_dec, cache_dec = decode_all(q, k, v, LENGTHS, policy, kern)
  out_pre, cache_pre = lj.sparse_prefill(q, k, v, LENGTHS, policy, kern, mode="greedy")

  assert out_par.dtype == np.float32 and out_par.shape == (B, S, H, D)
  np.testing.assert_allclose(out_par, out_dec, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(out_pre), out_dec, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out_par, expected, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(out_dec, expected, atol=2e-5, rtol=1e-5)
  assert_same_cache(cache_pre, cache_dec)

  # The kept set at every query equals the reference's.
  mask = np.asarray(lj.sparse_mask(q, k, LENGTHS, policy))
  for b in range(B):
    for h in range(H):
      r = results[b][h]
      for t in range(LENGTHS[b]):
        assert np.flatnonzero(mask[b, h, t, :t + 1]).tolist() == r["kept_sets"][t]
      assert kept_positions(cache_dec, b, h) == r["kept"]
      pos = np.asarray(cache_dec.pos[b, h])
      score = np.asarray(cache_dec.score[b, h])
      for slot, p in enumerate(pos):
        if p >= 0:
          assert score[slot] == pytest.approx(r["scores"][p], abs=1e-5)
      if with_kernels:
        np.testing.assert_allclose(np.asarray(cache_dec.h[b, h]), r["H"], atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(cache_dec.z[b, h]), r["z"], atol=2e-5, rtol=1e-5)
  # Every policy evicts something here, and the low-rank part matters.
  assert all(len(results[b][h]["evicted"]) > 0 for b in range(B) for h in range(H))
  if with_kernels:
    plain = np.asarray(lj.less_attention_parallel(q, k, v, LENGTHS, policy, None))
    assert np.abs(plain - out_par).max() > 1e-2


def test_h2o_heads_keep_different_sets():
  policy, _ = POLICIES["h2o"]
  q, k, v = make_qkv(1)
  _, cache = lj.sparse_prefill(q, k, v, LENGTHS, policy, mode="greedy")
  assert kept_positions(cache, 0, 0) != kept_positions(cache, 0, 1)
  # The recent window is always kept.
  for h in range(H):
    assert set(range(LENGTHS[0] - 3, LENGTHS[0])) <= set(kept_positions(cache, 0, h))


def test_shared_head_kernels_match_reference():
  policy, rpolicy = POLICIES["h2o"]
  q, k, v = make_qkv(3)
  kern = make_kernels(4, share_heads=True)
  assert kern.wq1.shape == (1, D, HIDDEN)
  expected, _ = ref.ref_batch(q, k, v, LENGTHS, rpolicy, kernels_np(kern))
  out = lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern)
  np.testing.assert_allclose(np.asarray(out), expected, atol=2e-5, rtol=1e-5)


def test_static_masks_equal_policy_scan():
  q, k, _ = make_qkv(5)
  logits = lj.attention_logits(q, k)
  for name in ("lambda", "window"):
    policy = POLICIES[name][0]
    scanned, _, _ = lj.policy_scan(logits, LENGTHS, policy)
    static = policy.static_mask(S)
    for b in range(B):
      n = LENGTHS[b]
      np.testing.assert_array_equal(np.asarray(scanned)[b, :, :n, :n],
                                    np.broadcast_to(static[:n, :n], (H, n, n)))
  assert POLICIES["h2o"][0].static_mask(S) is None


@pytest.mark.slow
def test_jit_matches_eager():
  policy, _ = POLICIES["h2o"]
  q, k, v = make_qkv(6)
  kern = make_kernels(7)
  step = jax.jit(lj.sparse_decode_step, static_argnames=("policy",))
  out_j, cache_j = decode_all(q, k, v, LENGTHS, policy, kern, step_fn=step)
  out_e, cache_e = decode_all(q, k, v, LENGTHS, policy, kern)
  np.testing.assert_allclose(out_j, out_e, atol=1e-6, rtol=1e-6)
  assert_same_cache(cache_j, cache_e, atol=1e-6)
  prefill = jax.jit(lj.sparse_prefill, static_argnames=("policy", "mode"))
  out_p, cache_p = prefill(q, k, v, LENGTHS, policy, kern, mode="greedy")
  np.testing.assert_allclose(np.asarray(out_p), out_e, atol=1e-5, rtol=1e-5)
  assert_same_cache(cache_p, cache_e)


def test_ragged_prefill_then_decode():
  """Prompts of different lengths, then per-sequence positions in decode."""
  policy, _ = POLICIES["h2o"]
  q, k, v = make_qkv(8)
  kern = make_kernels(9)
  full = np.asarray(lj.less_attention_parallel(q, k, v, np.array([S, S], np.int32),
                                               policy, kern))
  prompt = np.array([10, 6], np.int32)
  # Padded prompts (positions >= prompt[b] are padding and must not matter).
  out, cache = lj.sparse_prefill(q, k, v, prompt, policy, kern, mode="greedy")
  assert np.asarray(cache.pos).max(axis=(1, 2)).tolist() == [9, 5]
  assert not np.asarray(out)[1, 6:].any()
  for b in range(B):
    np.testing.assert_allclose(np.asarray(out)[b, :prompt[b]], full[b, :prompt[b]],
                               atol=1e-5, rtol=1e-5)
  bi = np.arange(B)
  for i in range(S - 10):
    pos = prompt + i
    o, cache = lj.sparse_decode_step(cache, q[bi, pos], k[bi, pos], v[bi, pos],
                                     jnp.asarray(pos), policy, kern)
    np.testing.assert_allclose(np.asarray(o), full[bi, pos], atol=1e-5, rtol=1e-5)


# (b) no eviction / no kernels: full causal attention.
def test_no_eviction_is_full_attention():
  q, k, v = make_qkv(10)
  want = ref.ref_full_attention(q, k, v, LENGTHS)
  kern = make_kernels(11)
  for policy in (lj.h2o(S - 3, 3), lj.lambda_mask(4, S - 4), lj.sliding_window(S)):
    out = lj.less_attention_parallel(q, k, v, LENGTHS, policy, None)
    np.testing.assert_allclose(np.asarray(out), want, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(lj.full_causal_attention(q, k, v, LENGTHS)),
                               want, atol=1e-6, rtol=1e-6)
    # With kernels: H = z = 0, so only the spec's 1e-6 denominator floor
    # separates it from full attention.
    out_k, cache = lj.sparse_prefill(q, k, v, LENGTHS, policy, kern)
    np.testing.assert_allclose(np.asarray(out_k), want, atol=1e-4, rtol=1e-4)
    assert not np.asarray(cache.h).any() and not np.asarray(cache.z).any()
  # R = 0 (no kernels) with evictions is exactly the sparse policy.
  policy, rpolicy = POLICIES["h2o"]
  out0, cache0 = lj.sparse_prefill(q, k, v, LENGTHS, policy, None, mode="greedy")
  assert cache0.h.shape == (B, H, 0, D) and cache0.z.shape == (B, H, 0)
  expected, _ = ref.ref_batch(q, k, v, LENGTHS, rpolicy, None)
  np.testing.assert_allclose(np.asarray(out0), expected, atol=2e-5)


# (c) every evicted pair is folded in exactly once.
def test_each_evicted_pair_folded_exactly_once():
  q, k, _ = make_qkv(12)
  # v_j = e_(j mod D): column c of H collects exactly the tokens j = c mod D.
  v = np.broadcast_to(np.eye(D, dtype=np.float32)[np.arange(S) % D][None, :, None, :],
                      (B, S, H, D)).copy()
  kern = make_kernels(13)
  psi_k = np.asarray(lj.psi(kern, jnp.asarray(k)), np.float64)  # [B, S, H, R]
  for policy in (POLICIES["h2o"][0], POLICIES["lambda"][0]):
    cache = lj.init_cache(B, H, D, policy, rank=RANK)
    left = [[[] for _ in range(H)] for _ in range(B)]  # tokens that left, in order
    for t in range(S):
      before = np.asarray(cache.pos)
      _, cache = lj.sparse_decode_step(cache, q[:, t], k[:, t], v[:, t],
                                       jnp.full((B,), t, jnp.int32), policy, kern,
                                       active=jnp.asarray(t < LENGTHS))
      after = np.asarray(cache.pos)
      for b in range(B):
        for h in range(H):
          left[b][h] += sorted(set(before[b, h]) - set(after[b, h]) - {-1})
    for b in range(B):
      for h in range(H):
        gone = left[b][h]
        assert len(gone) == len(set(gone)) == LENGTHS[b] - policy.budget
        assert sorted(gone) == sorted(set(range(LENGTHS[b])) - set(kept_positions(cache, b, h)))
        want_h = np.zeros((RANK, D))
        for j in gone:
          want_h[:, j % D] += psi_k[b, j, h]
        np.testing.assert_allclose(np.asarray(cache.h[b, h]), want_h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(cache.z[b, h]), psi_k[b, gone, h].sum(0),
                                   rtol=1e-5, atol=1e-6)


# (e) decode state does not grow with the sequence.
@pytest.mark.slow
def test_decode_state_bytes_constant():
  policy = lj.h2o(4, 4)
  kern = make_kernels(14)

  @jax.jit
  def run(n):
    def body(t, carry):
      cache, total = carry
      qt, kt, vt = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(0), t),
                                     (3, 1, H, D), jnp.float32)
      out, cache = lj.sparse_decode_step(cache, qt, kt, vt, jnp.full((1,), t, jnp.int32),
                                         policy, kern)
      return cache, total + jnp.sum(out)
    cache = lj.init_cache(1, H, D, policy, rank=RANK)
    return jax.lax.fori_loop(0, n, body, (cache, jnp.zeros((), jnp.float32)))

  sizes = {}
  for n in (1024, 8192):
    cache, total = run(n)  # one compilation: n is traced
    assert np.isfinite(float(total))
    pos = np.asarray(cache.pos)
    assert pos.min() >= 0 and pos.max() == n - 1
    sizes[n] = lj.cache_bytes(cache)
    assert sizes[n] == lj.cache_bytes(lj.init_cache(1, H, D, policy, rank=RANK))
  assert sizes[1024] == sizes[8192]
  # k, v: 2*B*H*T*D*4, pos+score: 2*B*H*T*4, h: B*H*R*D*4, z: B*H*R*4
  t = policy.budget
  assert sizes[1024] == 4 * H * (2 * t * D + 2 * t + RANK * D + RANK)


# No NaN in values or gradients when phi(q) has zero features.
@pytest.mark.slow
def test_zero_phi_features_give_finite_gradients():
  policy, _ = POLICIES["h2o"]
  q, k, v = make_qkv(15)
  kern = make_kernels(16)
  kern = kern._replace(wq2=kern.wq2.at[:, :, :2].set(0.0))  # phi[..., :2] == 0
  phi_q = np.asarray(lj.phi(kern, jnp.asarray(q)))
  assert (phi_q[..., :2] == 0).all() and (phi_q[..., 2:] > 0).any()

  def loss_par(kern, q):
    return jnp.sum(lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern) ** 2)

  val, grads = jax.jit(jax.value_and_grad(loss_par, argnums=(0, 1)))(kern, jnp.asarray(q))
  assert np.isfinite(float(val))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()
  assert np.abs(np.asarray(grads[0].d1)).max() > 0

  last = LENGTHS - 1
  _, cache = lj.sparse_prefill(q, k, v, last, policy, kern, mode="greedy")  # padded prompts
  bi = np.arange(B)

  def loss_dec(kern, qt):
    out, _ = lj.sparse_decode_step(cache, qt, k[bi, last], v[bi, last],
                                   jnp.asarray(last), policy, kern)
    return jnp.sum(out ** 2)

  val, grads = jax.jit(jax.value_and_grad(loss_dec, argnums=(0, 1)))(kern, jnp.asarray(q[bi, last]))
  assert np.isfinite(float(val))
  for g in jax.tree_util.tree_leaves(grads):
    assert np.isfinite(np.asarray(g)).all()


def test_kernel_dropout_only_in_training():
  policy, _ = POLICIES["lambda"]
  q, k, v = make_qkv(17)
  kern = make_kernels(18)
  base = lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern)
  same = lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern,
                                    dropout_rng=jax.random.PRNGKey(0), deterministic=True)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(same))
  drop = lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern,
                                    dropout_rng=jax.random.PRNGKey(0), deterministic=False)
  assert np.abs(np.asarray(drop) - np.asarray(base)).max() > 1e-4
  with pytest.raises(lerr.KernelError, match="dropout_rng"):
    lj.less_attention_parallel(q, k, v, LENGTHS, policy, kern, deterministic=False)


def test_kernel_init_defaults():
  shapes = jax.eval_shape(lambda key: lj.init_kernels(key, 64, 14), jax.random.PRNGKey(0))
  assert shapes.wq1.shape == (14, 64, 512) and shapes.wq2.shape == (14, 512, 8)
  assert shapes.wk3.shape == (14, 8, 8) and shapes.d1.shape == (14, 8)
  shared = jax.eval_shape(lambda key: lj.init_kernels(key, 64, 14, share_heads=True),
                          jax.random.PRNGKey(0))
  assert shared.wq1.shape == (1, 64, 512)
  assert jax.eval_shape(lj.phi, shapes, jnp.zeros((3, 14, 64))).shape == (3, 14, 8)
  kern = lj.init_kernels(jax.random.PRNGKey(0), D, H, rank=RANK, hidden=HIDDEN)
  assert kern.rank == RANK and kern.hidden == HIDDEN and kern.num_heads == H
  np.testing.assert_array_equal(np.asarray(kern.d1), np.float32(1e-4))
  np.testing.assert_array_equal(np.asarray(kern.d2), np.float32(1e-4))
  x = jnp.asarray(make_qkv(0)[1])
  assert (np.asarray(lj.psi(kern, x)) >= 0).all() and (np.asarray(lj.phi(kern, x)) >= 0).all()


def test_baseline_plus_and_make_policy():
  assert lj.baseline_plus(lj.h2o(10, 10), 4) == lj.h2o(12, 12)
  assert lj.baseline_plus(lj.h2o(10, 10), 5).budget == 25
  assert lj.baseline_plus(lj.lambda_mask(4, 200), 4) == lj.lambda_mask(4, 204)
  assert lj.baseline_plus(lj.sliding_window(8), 4) == lj.sliding_window(12)
  assert lj.make_policy("H2O", heavy=102, recent=102).budget == 204
  assert lj.make_policy("lambda", recent=200) == lj.lambda_mask(4, 200)
  assert lj.make_policy("streaming-llm".replace("-", ""), sink=4, recent=200).budget == 204
  assert lj.make_policy("sliding_window", recent=8, extra=4) == lj.sliding_window(12)
  assert hash(lj.h2o(3, 3)) == hash(lj.h2o(3, 3))
  assert lj.loss_positions(np.array([6, 3]), lj.h2o(2, 2), 6).tolist() == [
      [False] * 4 + [True] * 2, [False] * 6]


# (f) bad inputs give clear errors.
def test_bad_inputs():
  with pytest.raises(lerr.PolicyError, match="unknown sparse policy"):
    lj.make_policy("foo")
  with pytest.raises(lerr.PolicyError, match="recent"):
    lj.make_policy("h2o", heavy=0, recent=0)
  with pytest.raises(lerr.PolicyError, match="recent"):
    lj.sliding_window(0)
  with pytest.raises(lerr.PolicyError, match="heavy"):
    lj.h2o(-1, 4)
  with pytest.raises(lerr.PolicyError, match="must be an int"):
    lj.h2o(2.5, 4)
  with pytest.raises(lerr.PolicyError, match="sink"):
    lj.make_policy("h2o", heavy=4, recent=4, sink=4)
  with pytest.raises(lerr.PolicyError, match="needs arguments"):
    lj.make_policy("h2o", heavy=4)
  with pytest.raises(lerr.PolicyError, match="cache slots"):
    lj.make_policy("h2o", heavy=150, recent=150, max_len=256)
  with pytest.raises(lerr.PolicyError, match="cache slots"):
    lj.init_cache(1, 2, 8, lj.sliding_window(20), max_len=16)
  with pytest.raises(lerr.PolicyError, match="needs a Policy"):
    lj.baseline_plus("h2o", 4)
  with pytest.raises(lerr.PolicyError, match="recent"):
    lj.make_policy("lambda", sink=4)
  with pytest.raises(lerr.PolicyError, match="extra"):
    lj.baseline_plus(lj.h2o(2, 2), -1)

  policy = lj.h2o(2, 2)
  kern = make_kernels(0)
  cache = lj.init_cache(B, H, D, policy, rank=RANK)
  q = jnp.zeros((B, H, D), jnp.float32)
  lengths = jnp.zeros((B,), jnp.int32)
  with pytest.raises(lerr.SparseStateError, match="budget"):
    lj.sparse_decode_step(cache, q, q, q, lengths, lj.h2o(3, 3), kern)
  with pytest.raises(lerr.SparseStateError, match="rank"):
    lj.sparse_decode_step(cache, q, q, q, lengths, policy, None)
  with pytest.raises(InputError, match="q must"):
    lj.sparse_decode_step(cache, q[:, :1], q, q, lengths, policy, kern)
  with pytest.raises(InputError, match="lengths"):
    lj.sparse_decode_step(cache, q, q, q, jnp.zeros((3,), jnp.int32), policy, kern)
  with pytest.raises(lerr.KernelError, match="head width"):
    lj.sparse_decode_step(lj.init_cache(B, H, 4, policy, rank=RANK), q[..., :4], q[..., :4],
                          q[..., :4], lengths, policy, kern)
  with pytest.raises(lerr.PolicyError):
    lj.sparse_decode_step(cache, q, q, q, lengths, "h2o", kern)
  x = np.zeros((B, S, H, D), np.float32)
  with pytest.raises(InputError, match="lengths"):
    lj.less_attention_parallel(x, x, x, np.array([S + 1, 3]), policy)
  with pytest.raises(InputError, match="shapes"):
    lj.sparse_prefill(x, x[:, :3], x, LENGTHS, policy)
  with pytest.raises(InputError, match="must be"):
    lj.sparse_prefill(x[0], x[0], x[0], LENGTHS, policy)
  bad = kern._replace(**{n: np.zeros((3,) + getattr(kern, n).shape[1:], np.float32)
                         for n in kern._fields})
  with pytest.raises(lerr.KernelError, match="heads"):
    lj.less_attention_parallel(x, x, x, LENGTHS, policy, bad)
  with pytest.raises(lerr.KernelError, match="wk3"):
    lj.less_attention_parallel(x, x, x, LENGTHS, policy,
                               kern._replace(wk3=np.zeros((2, 3, 3), np.float32)))


# One-shot prefill (the default): full attention over the prompt, one eviction.

def _one_shot_reference(q, k, v, length, ref_policy, kern=None):
  """Float64, one sequence, plainly: dense causal attention over the prompt, column
  sums as H2O scores, then the kept set written from the policy's definition."""
  q, k, v = (np.asarray(x, np.float64)[:length] for x in (q, k, v))
  s, h, d = q.shape
  outs, kept, scores = np.zeros((s, h, d)), [], []
  for hh in range(h):
    logits = q[:, hh] @ k[:, hh].T / np.sqrt(d)
    logits = np.where(np.tril(np.ones((s, s), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    outs[:, hh] = p @ v[:, hh]
    score = p.sum(0)
    kind, *args = ref_policy
    if kind == "h2o":
      heavy, recent = args
      rec = set(range(max(s - recent, 0), s))
      rest = [j for j in range(s) if j not in rec]
      rest.sort(key=lambda j: (-score[j], -j))  # ties: the oldest leaves first
      keep = rec | set(rest[:heavy])
    elif kind == "lambda":
      sink, recent = args
      keep = set(range(min(sink, s))) | set(range(max(s - recent, 0), s))
    else:
      (recent,) = args
      keep = set(range(max(s - recent, 0), s))
    kept.append(sorted(keep))
    scores.append(score)
  return outs, kept, scores


@pytest.mark.slow
@pytest.mark.parametrize("name", list(POLICIES))
def test_one_shot_prefill_keeps_the_policy_set_after_full_attention(name):
  policy, rpolicy = POLICIES[name]
  q, k, v = make_qkv(21)
  kern = make_kernels(22)
  out, cache = lj.sparse_prefill(q, k, v, LENGTHS, policy, kern)  # one_shot by default
  for b in range(B):
    n = int(LENGTHS[b])
    want_out, want_kept, want_scores = _one_shot_reference(q[b], k[b], v[b], n, rpolicy)
    np.testing.assert_allclose(np.asarray(out)[b, :n], want_out, atol=2e-5, rtol=1e-5)
    assert not np.asarray(out)[b, n:].any()
    for hh in range(H):
      assert kept_positions(cache, b, hh) == want_kept[hh], (b, hh)
      pos = np.asarray(cache.pos[b, hh])
      for slot in np.flatnonzero(pos >= 0):
        j = int(pos[slot])
        np.testing.assert_array_equal(np.asarray(cache.k[b, hh, slot]), k[b, j, hh])
        np.testing.assert_array_equal(np.asarray(cache.v[b, hh, slot]), v[b, j, hh])
        np.testing.assert_allclose(float(cache.score[b, hh, slot]), want_scores[hh][j],
                                   rtol=1e-5, atol=1e-6)
      # Every evicted prompt pair folded into (H, z) exactly once.
      gone = [j for j in range(n) if j not in want_kept[hh]]
      one = jax.tree.map(lambda x: x[hh:hh + 1], kern)
      psi = np.asarray(lj.psi(one, jnp.asarray(k[b][gone][:, hh:hh + 1])), np.float64)[:, 0]
      np.testing.assert_allclose(np.asarray(cache.h[b, hh]), psi.T @ v[b][gone][:, hh],
                                 rtol=1e-4, atol=1e-5)
      np.testing.assert_allclose(np.asarray(cache.z[b, hh]), psi.sum(0), rtol=1e-4, atol=1e-5)


def test_one_shot_prefill_then_decode_and_short_prompts():
  policy, _ = POLICIES["h2o"]
  q, k, v = make_qkv(23)
  kern = make_kernels(24)
  prompt = np.array([12, 5], np.int32)  # the second prompt fits in the budget (7 slots)
  _, cache = jax.jit(lj.sparse_prefill, static_argnames=("policy",))(
      q, k, v, prompt, policy, kern)
  assert (np.asarray(cache.pos[1]) >= 0).sum(-1).tolist() == [5, 5]  # nothing evicted
  assert not np.asarray(cache.h[1]).any()
  assert (np.asarray(cache.pos[0]) >= 0).sum(-1).tolist() == [7, 7]
  bi = np.arange(B)
  out, cache2 = lj.sparse_decode_step(cache, q[bi, prompt], k[bi, prompt], v[bi, prompt],
                                      jnp.asarray(prompt), policy, kern)
  assert np.isfinite(np.asarray(out)).all()
  assert sorted(np.asarray(cache2.pos[1, 0])[np.asarray(cache2.pos[1, 0]) >= 0]) == [0, 1, 2, 3, 4, 5]
  with pytest.raises(ConfigError, match="prefill mode"):
    lj.sparse_prefill(q, k, v, prompt, policy, kern, mode="lazy")

"""KV-cache / G-cache decode, padding, causality, generation and bad inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import perturbed_params, random_tokens
from pldr_jax import errors
from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax import g_modes, model, params as params_lib
from pldr_jax.inference import caches, generate as gen
from pldr_jax.errors import InputError
from pldr_jax.inference.kv_cache import GCache
from pldr_jax.params import init_params

F64 = dict(param_dtype="float64", compute_dtype="float64")

# Jitted once per config: eager op-by-op dispatch would dominate the suite's time.
fwd = jax.jit(model.forward, static_argnames=("config", "return_deductive", "return_aux"))
prefill = jax.jit(decode.prefill, static_argnames=("config", "cache_len", "g_cache"))
step = jax.jit(decode.decode_step, static_argnames=("config", "g_cache", "return_deductive"))


_params = perturbed_params
_tokens = random_tokens


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def _prompt_g(p, row, n, c):
  """Per-layer G_LM that the first n tokens of row [1, W] produce (what the G-cache holds).

  Returns [L, 1, H, dk, dk]. Uses padding (tested below) to keep one shape.
  """
  _, aux = fwd(p, row, jnp.array([n], jnp.int32), config=c, return_aux=True)
  g = aux["G_LM"]  # stacked over layers
  return g[:, :, n - 1] if c.causal_metric else g


def _fwd_n(p, row, n, c, g_lm=None):
  """Forward over the first n tokens of row [1, W] (padded, one compiled shape): [n, V]."""
  logits, _ = fwd(p, row, jnp.array([n], jnp.int32), config=c, g_lm=g_lm)
  return logits[0, :n]


def _decode_all(p, c, t, lens, steps, g_cache, cache_len=20):
  logits, state, gcache = prefill(p, t[:, :int(max(lens))], jnp.asarray(lens, jnp.int32),
                                         config=c, cache_len=cache_len, g_cache=g_cache)
  outs, deds = [], []
  for _ in range(steps):
    tok = jax.vmap(lambda row, n: row[n])(t, state.lengths)
    lg, state, ded = step(p, gcache, state, tok, config=c, g_cache=g_cache,
                                        return_deductive=True)
    outs.append(lg)
    deds.append(ded)
  return logits, jnp.stack(outs, 1), deds, gcache


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("g_cache", [True, False])
def test_cached_decode_matches_forward_position_by_position(g_cache):
  """Reference mode: A/G come from the prompt; decode == forward with that G held fixed."""
  c = cfg.tiny(**F64)
  p = _params(c)
  t = _tokens(c, (2, 14))
  lens, steps = [7, 4], 6
  pre, outs, _, _ = _decode_all(p, c, t, lens, steps, g_cache)
  for b, n in enumerate(lens):
    row = t[b:b + 1]
    full = _fwd_n(p, row, n + steps, c, g_lm=_prompt_g(p, row, n, c))
    alone, _ = model.forward(p, row[:, :n], config=c)  # unpadded, unjitted, once
    assert _rel(pre[b, :n], alone[0]) < 1e-10
    assert _rel(outs[b], full[n:n + steps]) < 1e-10


@pytest.mark.slow
@pytest.mark.x64
def test_causal_metric_decode_without_g_cache_matches_causal_forward():
  """Causal metric, no G-cache: every step extends A, so decode == forward exactly."""
  c = cfg.tiny(causal_metric=True, **F64)
  p = _params(c)
  t = _tokens(c, (2, 14))
  lens, steps = [6, 3], 7
  _, outs, _, _ = _decode_all(p, c, t, lens, steps, g_cache=False)
  for b, n in enumerate(lens):
    full = _fwd_n(p, t[b:b + 1], n + steps, c)
    assert _rel(outs[b], full[n:n + steps]) < 1e-10


@pytest.mark.x64
def test_g_cache_on_off_same_deductive_outputs_15_decimals():
  """The paper's claim: RMSE and determinant of G_LM equal to 15 decimal places."""
  c = cfg.tiny(**F64)
  p = _params(c)
  t = _tokens(c, (2, 12))
  _, out_on, ded_on, gc_on = _decode_all(p, c, t, [6, 5], 4, g_cache=True)
  _, out_off, ded_off, gc_off = _decode_all(p, c, t, [6, 5], 4, g_cache=False)
  assert isinstance(gc_on, GCache) and isinstance(gc_off, GCache)
  assert gc_on.g_lm is not None and gc_on.a is None  # only what decode reads
  assert gc_off.a is not None and gc_off.g_lm is None
  assert set(ded_off[0][0]) == {"A", "A_LM", "A_P", "G_LM"}  # recomputed each step
  for step_on, step_off in zip(ded_on, ded_off):
    for l_on, l_off in zip(step_on, step_off):
      g_on, g_off = np.asarray(l_on["G_LM"]), np.asarray(l_off["G_LM"])
      rmse_on = np.sqrt(np.mean(g_on ** 2, axis=(-1, -2)))
      rmse_off = np.sqrt(np.mean(g_off ** 2, axis=(-1, -2)))
      det_on, det_off = np.linalg.det(g_on), np.linalg.det(g_off)
      np.testing.assert_array_equal(np.round(rmse_on, 15), np.round(rmse_off, 15))
      np.testing.assert_allclose(det_on, det_off, rtol=1e-15, atol=0)
  assert _rel(out_on, out_off) < 1e-14


@pytest.mark.slow
@pytest.mark.x64
def test_g_cache_skips_the_metric_learner():
  """With the G-cache, decode never reads the metric learner or power-law weights."""
  c = cfg.tiny(**F64)
  p = _params(c)
  t = _tokens(c, (1, 10))
  _, state, gcache = prefill(p, t[:, :5], jnp.array([5]), config=c, cache_len=12)
  broken = jax.tree.map(lambda x: x, p)
  layers = broken["layers"]  # stacked over layers
  layers["plga"] = jax.tree.map(lambda x: x * jnp.nan, layers["plga"])
  layers["res_units"] = jax.tree.map(lambda x: x * jnp.nan, layers["res_units"])
  lg_ok, _ = step(p, gcache, state, t[:, 5], config=c)
  lg_broken, _ = step(broken, gcache, state, t[:, 5], config=c)
  np.testing.assert_array_equal(np.asarray(lg_ok), np.asarray(lg_broken))
  _, state, gcache_off = prefill(p, t[:, :5], jnp.array([5]), config=c, cache_len=12,
                                g_cache=False)
  lg_off, _ = step(broken, gcache_off, state, t[:, 5], config=c, g_cache=False)
  assert np.isnan(np.asarray(lg_off)).all()
  with pytest.raises(InputError, match="g_cache"):  # the G-cache holds G_LM only
    step(p, gcache, state, t[:, 5], config=c, g_cache=False)


@pytest.mark.slow
@pytest.mark.x64
def test_causal_metric_is_causal_and_reference_mode_is_not():
  c_ref = cfg.tiny(**F64)
  c_causal = c_ref.replace(causal_metric=True)
  p = _params(c_ref)
  t = _tokens(c_ref, (1, 12))
  t2 = t.at[0, 8].set((t[0, 8] + 7) % c_ref.vocab_size)
  a, _ = fwd(p, t, config=c_causal)
  b, _ = fwd(p, t2, config=c_causal)
  np.testing.assert_array_equal(np.asarray(a[0, :8]), np.asarray(b[0, :8]))
  assert np.max(np.abs(np.asarray(a[0, 8:] - b[0, 8:]))) > 1e-6
  # Reference mode: A sums over the whole sequence, so earlier positions move.
  a, _ = fwd(p, t, config=c_ref)
  b, _ = fwd(p, t2, config=c_ref)
  moved = float(np.max(np.abs(np.asarray(a[0, :8] - b[0, :8]))))
  print(f"reference (non-causal) mode: max |logit change| at positions <= 7 = {moved:.3e}")
  assert moved > 1e-8


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("causal", [False, True])
def test_padding_invariance(causal):
  c = cfg.tiny(causal_metric=causal, **F64)
  p = _params(c)
  t = _tokens(c, (3, 11))
  lens = [11, 5, 8]
  batched, ded = fwd(p, t, jnp.asarray(lens, jnp.int32), config=c, return_deductive=True)
  for b, n in enumerate(lens):
    garbage = t.at[b, n:].set(1)  # pads hold different ids: must not matter
    alone, ded1 = model.forward(p, t[b:b + 1, :n], config=c, return_deductive=True)
    again, _ = fwd(p, garbage[b:b + 1], jnp.array([n], jnp.int32), config=c)
    assert _rel(batched[b, :n], alone[0]) < 1e-12
    assert _rel(again[0, :n], alone[0]) < 1e-12
    for l in range(c.num_layers):
      g_b, g_1 = ded[l]["G_LM"][b], ded1[l]["G_LM"][0]
      if causal:
        g_b, g_1 = g_b[:n], g_1
      assert _rel(g_b, g_1) < 1e-10


def test_fp32_decode_close_to_forward():
  c = cfg.tiny()
  p = _params(c)
  t = _tokens(c, (2, 12))
  lens, steps = [6, 4], 5
  _, outs, _, gcache = _decode_all(p, c, t, lens, steps, g_cache=True)
  for b, n in enumerate(lens):
    # fp32 G_LM is sensitive to rounding (A_LM near its 1e-9 floor, raised to a
    # power), so compare against the forward run with the cached G itself.
    g = gcache.g_lm[:, b:b + 1]
    full = _fwd_n(p, t[b:b + 1], n + steps, c, g_lm=g)
    assert _rel(outs[b], full[n:n + steps]) < 1e-5


@pytest.mark.x64
def test_kv_cache_holds_the_forward_keys_and_values_time_minor():
  """KVCache k/v are [B, H, dk, T]: slot t of sequence b holds the forward pass's
  (rotated) key and value of its token t (with the G_LM decode uses, its prompt's),
  from prefill and from decode steps alike; slots past each sequence's length stay zero."""
  c = cfg.tiny(**F64)
  p = _params(c)
  t = _tokens(c, (2, 8))
  lens = np.array([5, 3])
  _, st, gc = prefill(p, t[:, :5], jnp.asarray(lens, jnp.int32), config=c, cache_len=12)
  for _ in range(2):
    tok = jax.vmap(lambda row, n: row[n])(t, st.lengths)
    _, st = step(p, gc, st, tok, config=c)
  assert st.k[0].shape == (2, c.num_heads, c.head_dim, 12) and st.cache_len == 12
  for b, n in enumerate(lens + 2):
    _, aux = fwd(p, t[b:b + 1], jnp.array([n], jnp.int32), config=c, return_aux=True,
                 g_lm=gc.g_lm[:, b:b + 1])
    for layer in range(c.num_layers):
      for name, buf in (("k", st.k[layer]), ("v", st.v[layer])):
        want = np.asarray(aux[name][layer][0, :n]).transpose(1, 2, 0)  # [S, H, dk] -> [H, dk, S]
        np.testing.assert_allclose(np.asarray(buf[b, :, :, :n]), want, rtol=1e-12, atol=1e-12)
        assert not np.any(np.asarray(buf[b, :, :, n:]))


@pytest.mark.slow
@pytest.mark.x64
def test_prefill_last_logits_only_runs_the_head_at_each_prompts_last_token():
  """all_logits=False (what generate, stream and lm-eval's scoring use) gives each
  prompt's last-token logits of the full prefill, the same caches, and for the full
  and the sparse/LESS prefill alike its program has no [B, S, V] logits at all."""
  import less_jax
  from less_jax import model as less_model
  c = cfg.tiny(**F64)
  p = _params(c)
  t = _tokens(c, (2, 7))
  lens = jnp.array([7, 4], jnp.int32)
  kern = [less_jax.init_kernels(jax.random.key(i), c.head_dim, c.num_heads, rank=2, hidden=4)
          for i in range(c.num_layers)]
  runs = {"full": lambda **kw: decode.prefill(p, t, lens, config=c, cache_len=12, **kw),
          "less": lambda **kw: less_model.less_prefill(
              p, t, lens, config=c, policy=less_jax.h2o(2, 2), kernels=kern, **kw)}
  for name, run in runs.items():
    all_lg, st, gc = run()
    last, st1, gc1 = run(all_logits=False)
    assert last.shape == (2, c.vocab_size), name
    assert _rel(last, model.at_last(all_lg, lens)) < 1e-12, name
    jax.tree.map(np.testing.assert_array_equal, (st, gc), (st1, gc1))  # same caches
    program = lambda **kw: str(jax.make_jaxpr(lambda: run(**kw))())  # nested jaxprs too
    bsv = f"f64[2,7,{c.vocab_size}]"
    assert bsv in program(), name  # the check can see [B, S, V] logits
    assert bsv not in program(all_logits=False), name


@pytest.mark.slow
def test_jitted_decode_donates_state_and_matches_eager():
  c = cfg.tiny()
  p = _params(c)
  t = _tokens(c, (2, 10))
  lens = jnp.array([5, 3], jnp.int32)
  _, st, gc = decode.prefill_jit(p, t[:, :5], lens, config=c, cache_len=16)
  _, st_e, gc_e = prefill(p, t[:, :5], lens, config=c, cache_len=16)
  k_before = st.k[0]
  with pytest.raises(InputError, match="decode_params"):  # the slow layout is refused
    decode.decode_step_jit(p, gc, st, t[:, 5], config=c)
  lg, st2 = decode.decode_step_jit(decode.decode_params(p, c), gc, st, t[:, 5], config=c)
  lg_e, _ = step(p, gc_e, st_e, t[:, 5], config=c)
  assert k_before.is_deleted()  # donated
  assert not gc.g_lm.is_deleted()  # G-cache kept
  assert _rel(lg, lg_e) < 1e-5
  np.testing.assert_array_equal(np.asarray(st2.lengths), [6, 4])


@pytest.mark.slow
@pytest.mark.x64
def test_generate_greedy_matches_forward_and_stream():
  c = cfg.tiny(**F64)
  p = _params(c)
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
  out = gen.generate(p, prompts, config=c, max_new_tokens=6)
  streamed = np.stack(list(gen.stream(p, prompts, config=c, max_new_tokens=6)), 1)
  for i, prompt in enumerate(prompts):
    assert len(out[i]) == 6
    assert out[i] == streamed[i].tolist()
    row = jnp.zeros((1, 16), jnp.int32).at[0, :len(prompt) + 6].set(
        jnp.asarray(prompt + out[i], jnp.int32))
    logits = _fwd_n(p, row, len(prompt) + 6, c, g_lm=_prompt_g(p, row, len(prompt), c))
    greedy = np.argmax(np.asarray(logits[len(prompt) - 1:-1]), -1)
    assert greedy.tolist() == out[i]


@pytest.mark.slow
def test_generate_no_recompile_within_bucket():
  c = cfg.tiny()
  p = _params(c)
  # From a cold cache: a test that ran before in this process may have compiled the
  # same config's next bucket already (the jit cache is per process).
  gen.generate_tokens.clear_cache()
  gen.generate(p, [[4, 5, 6]], config=c, max_new_tokens=4)  # warm the 16-bucket
  before = gen.generate_tokens._cache_size()
  rng = np.random.default_rng(0)
  samp = lambda: gen.SamplingConfig(temperature=float(rng.uniform(0.5, 1.5)), top_k=4,
                                    top_p=float(rng.uniform(0.5, 0.95)))
  gen.generate(p, [[4, 5, 6]], config=c, max_new_tokens=4, sampling=samp())  # the top-k path
  before = gen.generate_tokens._cache_size()
  for n in (1, 7, 9, 12, 16):  # temperature and top_p are traced: no recompilation
    prompt = rng.integers(4, c.vocab_size, n).tolist()
    gen.generate(p, [prompt], config=c, max_new_tokens=4, sampling=samp(),
                 key=jax.random.key(n))
  assert gen.generate_tokens._cache_size() == before
  gen.generate(p, [[4] * 17], config=c, max_new_tokens=4)  # next bucket, greedy: new programs
  assert gen.generate_tokens._cache_size() == before + 1


@pytest.mark.slow
@pytest.mark.x64
def test_generate_sizes_the_cache_to_the_request():
  """The default cache is the smallest bucket holding prompt bucket + new tokens (a
  decode step reads every slot); the tokens equal those of a context-sized cache."""
  c = cfg.tiny(**F64).replace(max_len=128)
  p = _params(c)
  assert gen.auto_cache_len(16, 6, c) == 32
  assert gen.auto_cache_len(16, 16, c) == 32
  assert gen.auto_cache_len(64, 60, c) == 128
  assert gen.auto_cache_len(100, 28, c) == 128  # never beyond the context
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
  auto = gen.generate(p, prompts, config=c, max_new_tokens=6)
  full = gen.generate(p, prompts, config=c, max_new_tokens=6, cache_len=c.max_len)
  assert auto == full
  streamed = np.stack(list(gen.stream(p, prompts, config=c, max_new_tokens=6)), 1)
  assert streamed.tolist() == full


@pytest.mark.slow
def test_stop_token_and_per_sequence_lengths():
  c = cfg.tiny()
  p = _params(c)
  prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
  free = gen.generate(p, prompts, config=c, max_new_tokens=8)
  stop = free[0][2]
  out = gen.generate(p, prompts, config=c, max_new_tokens=8,
                     sampling=gen.SamplingConfig(stop_token=stop))
  first = free[0].index(stop)
  assert out[0] == free[0][:first + 1]
  want1 = free[1][:free[1].index(stop) + 1] if stop in free[1] else free[1]
  assert out[1] == want1


@pytest.mark.slow
def test_sample_logits_filters():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((4, 50)), jnp.float32)
  order = np.argsort(-np.asarray(logits), axis=-1)
  keys = [jax.random.key(i) for i in range(200)]
  f = jax.jit(gen.sample_logits, static_argnames=("path",))
  P = gen.SamplingPath
  greedy = f(logits, keys[0], jnp.float32(0.0), jnp.float32(1.0), path=P())
  np.testing.assert_array_equal(np.asarray(greedy), order[:, 0])
  top1 = f(logits, keys[1], jnp.float32(1.0), jnp.float32(1.0), path=P(False, 1, False))
  np.testing.assert_array_equal(np.asarray(top1), order[:, 0])
  tiny_p = f(logits, keys[2], jnp.float32(1.0), jnp.float32(1e-6), path=P(False, 0, True))
  np.testing.assert_array_equal(np.asarray(tiny_p), order[:, 0])
  draws = np.stack([np.asarray(f(logits, k, jnp.float32(2.0), jnp.float32(1.0),
                                 path=P(False, 5, False))) for k in keys])
  for row in range(4):
    assert set(draws[:, row]) <= set(order[row, :5])
    assert len(set(draws[:, row])) > 1  # really sampling
  # top-p: the kept set is the smallest prefix whose probability reaches p, over
  # the whole vocabulary (top_k 0) or over the top-k candidates.
  for top_k, width in ((0, 50), (8, 8)):
    probs = np.asarray(jax.nn.softmax(
        jnp.take_along_axis(logits, jnp.asarray(order[:, :width]), -1) / 2.0, axis=-1))
    draws = np.stack([np.asarray(f(logits, k, jnp.float32(2.0), jnp.float32(0.5),
                                   path=P(False, top_k, True))) for k in keys])
    for row in range(4):
      cum = np.cumsum(probs[row])
      n_keep = int(np.searchsorted(cum, 0.5) + 1)
      assert set(draws[:, row]) <= set(order[row, :n_keep])
  # The static path: greedy is an argmax, top-k a lax.top_k, no sort of the vocabulary.
  greedy_hlo = jax.jit(gen.sample_logits, static_argnames=("path",)).lower(
      logits, keys[0], 1.0, 1.0, path=P()).as_text()
  topk_hlo = jax.jit(gen.sample_logits, static_argnames=("path",)).lower(
      logits, keys[0], 1.0, 0.9, path=P(False, 8, True)).as_text()
  assert "stablehlo.sort" not in greedy_hlo and "stablehlo.sort" not in topk_hlo
  assert "top_k" in topk_hlo
  assert gen.SamplingConfig(temperature=0.7, top_k=40, top_p=0.95).path == P(False, 40, True)


def test_bad_inputs_raise_clear_errors():
  c = cfg.tiny()
  p = _params(c)
  with pytest.raises(errors.InputError, match="context"):
    gen.generate(p, [[5] * (c.max_len + 1)], config=c, max_new_tokens=1)
  with pytest.raises(errors.InputError, match="exceeds the context"):
    gen.generate(p, [[5] * (c.max_len - 2)], config=c, max_new_tokens=5)
  with pytest.raises(errors.InputError, match="empty prompt"):
    gen.generate(p, [[5, 6], []], config=c, max_new_tokens=2)
  with pytest.raises(errors.InputError, match="empty prompt"):
    model.forward(p, jnp.zeros((1, 0), jnp.int32), config=c)
  with pytest.raises(errors.InputError, match="vocabulary"):
    gen.generate(p, [[5, 64]], config=c, max_new_tokens=2)
  with pytest.raises(errors.InputError, match="token id -1"):
    model.forward(p, jnp.array([[3, -1]], jnp.int32), config=c)
  with pytest.raises(errors.InputError, match="context"):
    model.forward(p, jnp.zeros((1, c.max_len + 1), jnp.int32), config=c)
  with pytest.raises(errors.ConfigError, match="divisible"):
    cfg.tiny(d_model=30, num_heads=4)
  with pytest.raises(errors.ConfigError, match="g_mode"):
    cfg.tiny(g_mode="learnt")
  with pytest.raises(errors.ConfigError, match="unknown"):
    cfg.tiny(num_head=3)
  ct = cfg.tiny(g_mode="transferred")
  pt = init_params(ct, jax.random.key(0))
  with pytest.raises(errors.GShapeError):
    model.forward(pt, jnp.ones((1, 4), jnp.int32), config=ct, g_lm=np.zeros((2, 2, 4, 4)))
  with pytest.raises(ValueError, match="needs its constant G_LM"):
    model.forward(pt, jnp.ones((1, 4), jnp.int32), config=ct)


@pytest.mark.slow
def test_fixed_g_modes():
  c = cfg.tiny(g_mode="random")
  p = init_params(c, jax.random.key(0))
  assert "plga" not in p["layers"] and "res_units" not in p["layers"]
  g = g_modes.make_fixed_g(c, jax.random.key(1))
  t = _tokens(c, (2, 9))
  lg, _ = fwd(p, t, config=c, g_lm=g)
  # The decode path reads the constant G from the G-cache, with or without g_cache.
  for g_cache in (True, False):
    _, st, gc = prefill(p, t[:, :5], jnp.array([5, 5]), config=c, g_lm=g, g_cache=g_cache)
    lg_dec, _ = step(p, gc, st, t[:, 5], config=c, g_cache=g_cache)
    ref, _ = fwd(p, t[:, :6], config=c, g_lm=g)
    assert _rel(lg_dec, ref[:, 5]) < 1e-5
  ci = c.replace(g_mode="identity")
  lg_i, _ = fwd(p, t, config=ci)
  lg_eye, _ = fwd(p, t, config=c, g_lm=g_modes.identity_g(c))
  assert _rel(lg_i, lg_eye) < 1e-6


def test_published_config_parameter_count():
  c = cfg.pldrv51_110m()
  assert params_lib.count_params(c) == 109_689_362
  assert params_lib.count_params(c.replace(g_mode="identity")) == 105_606_482
  shapes = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))
  assert sum(np.prod(x.shape) for x in jax.tree.leaves(shapes)) == 109_689_362


def test_transferred_g_from_published_model(published_data):
  c = cfg.pldrv51_110m(g_mode="transferred")
  g = g_modes.make_fixed_g(c, source=published_data / "g_lm_pldrv51_110m_1.npy")
  assert g.shape == (5, 14, 64, 64)
  with pytest.raises(errors.GShapeError):
    g_modes.make_fixed_g(cfg.tiny(g_mode="transferred"),
                         source=published_data / "g_lm_pldrv51_110m_1.npy")


@pytest.mark.slow  # end-to-end; CI runs it (`-m 'not slow'` skips it)
def test_generate_and_stream_take_a_sparse_or_less_cache():
  """generate/stream with SparseCache(policy, kernels): a budget that holds every token
  gives the full cache's tokens; a small one gives what a hand-driven loop of
  less_prefill + less_decode_step gives (greedy), with or without LESS kernels."""
  import less_jax
  from less_jax import model as less_model
  c = cfg.tiny(max_len=64)
  p = _params(c)
  prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [17, 18, 19, 20, 21]]
  full = gen.generate(p, prompts, config=c, max_new_tokens=10)
  big = less_jax.SparseCache(less_jax.h2o(heavy=16, recent=16))
  assert gen.generate(p, prompts, config=c, max_new_tokens=10, cache=big) == full
  small = less_jax.h2o(heavy=2, recent=3)
  kern = [less_jax.init_kernels(jax.random.key(i), c.head_dim, c.num_heads, rank=4, hidden=8)
          for i in range(c.num_layers)]
  for kernels in (None, kern):
    sc = less_jax.SparseCache(small, kernels)
    got = gen.generate(p, prompts, config=c, max_new_tokens=10, cache=sc)
    streamed = np.stack(list(gen.stream(p, prompts, config=c, max_new_tokens=10, cache=sc)), 1)
    assert streamed.tolist() == got
    tokens, lengths = gen.pad_prompts(prompts, c, 10)
    logits, state, gcache = less_model.less_prefill(p, tokens, lengths, config=c, policy=small,
                                                    kernels=kernels)
    tok = jnp.argmax(logits[jnp.arange(2), jnp.asarray(lengths) - 1], -1)
    want = []
    for _ in range(10):
      want.append(np.asarray(tok))
      logits, state = less_model.less_decode_step(p, gcache, state, tok, config=c,
                                                  policy=small, kernels=kernels)
      tok = jnp.argmax(logits, -1)
    assert np.stack(want, 1).tolist() == got
  assert got != full  # the small budget really changes the continuation
  with pytest.raises(InputError):  # not a decode cache
    gen.generate(p, prompts, config=c, max_new_tokens=2, cache="h2o")

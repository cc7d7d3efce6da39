"""Train step: loss, schedule, sharding equivalence (1 vs 8 devices), bad configs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import child_script
from pldr_jax import errors
from pldr_jax import config as cfg
from pldr_jax import model
from pldr_jax.config import TrainConfig
from pldr_jax.training import train
from pldr_jax.params import init_params

REPO = Path(__file__).resolve().parents[1]

def _run_sharded(devices: int, *cases: dict) -> list[dict]:
  """Each case (data, fsdp, steps=20, dtype="float64", lr=3e-3, g_mode="learned") on
  `devices` forced CPU devices, in one process; one result per case."""
  defaults = dict(steps=20, dtype="float64", lr=3e-3, g_mode="learned")
  args = [[c["data"], c["fsdp"], *({**defaults, **c}[k] for k in defaults)] for c in cases]
  # Backend optimisations off, as for the suite (tests/conftest.py): a few tiny steps.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                       "--xla_backend_optimization_level=0")
  out = subprocess.run([sys.executable, child_script("sharded_train"), json.dumps(args)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [json.loads(l) for l in out.stdout.strip().splitlines()[-len(cases):]]
  assert len(results) == len(cases)
  return results


@pytest.mark.slow
def test_same_losses_on_1_and_8_devices():
  """The sharded step computes the same maths as the single-device one.

  SDPA (identity G): 20 steps on 1 device, 8-way data parallel and a 2 x 4
  data x FSDP mesh agree to 1e-5 (measured: ~1e-15 in float64).
  Learned G: the power-law step (A_LM at its 1e-9 floor raised to a learned
  power) makes tiny-model training chaotic: a 1e-15 difference in reduction
  order grows ~400x per step (measured 2e-14, 7e-10, 2e-7, 1e-5, 1e-3 at
  steps 4-8), in float32 and float64 alike. So learned G is compared over
  the first 4 steps, where the sharded maths must agree to 1e-10.
  (Two processes, one per device count: each runs its identity and learned case.)
  """
  one, one_learned = _run_sharded(1, dict(data=1, fsdp=1, g_mode="identity"),
                                  dict(data=1, fsdp=1, steps=4))
  mixed, dp = _run_sharded(8, dict(data=2, fsdp=4, g_mode="identity"),
                           dict(data=8, fsdp=1, steps=4))
  assert one["devices"] == 1 and mixed["devices"] == 8
  assert "fsdp" in mixed["spec"]  # weights really are sharded over fsdp
  assert one["losses"][-1] < one["losses"][0] - 0.05  # it learns something
  np.testing.assert_allclose(mixed["losses"], one["losses"], rtol=1e-5, atol=0)
  assert len(dp["losses"]) == len(one_learned["losses"]) == 4
  np.testing.assert_allclose(dp["losses"], one_learned["losses"], rtol=1e-10, atol=0)


@pytest.mark.slow
@pytest.mark.x64
def test_loss_ignores_pad_and_matches_plain_cross_entropy():
  c = cfg.tiny(param_dtype="float64", compute_dtype="float64")
  p = init_params(c, jax.random.key(0))
  rng = np.random.default_rng(1)
  toks = rng.integers(4, c.vocab_size, (2, 10)).astype(np.int32)
  toks[1, 6:] = 0
  mask = (toks != 0).astype(np.int32)
  loss, m = train.loss_fn(p, {"tokens": jnp.asarray(toks), "mask": jnp.asarray(mask)}, config=c)
  want, n, hits = 0.0, 0, 0
  for b, length in enumerate([10, 6]):
    # As the authors' code: each sequence alone, the model reads its tokens
    # but the last (so A never holds the last target's query) and predicts 1..n-1.
    logits, _ = model.forward(p, jnp.asarray(toks[b:b + 1, :length - 1]), config=c)
    lp = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float64)))
    for t in range(length - 1):
      want -= lp[t, toks[b, t + 1]]
      hits += int(np.argmax(lp[t]) == toks[b, t + 1])
      n += 1
  assert int(m["tokens"]) == n == 14
  np.testing.assert_allclose(float(loss), want / n, rtol=1e-6)
  np.testing.assert_allclose(float(m["accuracy"]), hits / n, rtol=1e-12)


@pytest.mark.x64
def test_cross_entropy_against_log_softmax_and_argmax():
  """train.cross_entropy: -log softmax at the target, its gradient softmax - one-hot,
  and the hit an argmax == target (a target tied for the largest logit counts)."""
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(3, 5, 11)) * 4
  targets = rng.integers(0, 11, (3, 5))
  targets[0, 0] = np.argmax(logits[0, 0])  # at least one hit
  ce, hit = train.cross_entropy(jnp.asarray(logits), jnp.asarray(targets))
  z = logits - logits.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(ce), want, rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(hit), np.argmax(logits, -1) == targets)
  grad = jax.grad(lambda x: train.cross_entropy(x, jnp.asarray(targets))[0].sum())(
      jnp.asarray(logits))
  np.testing.assert_allclose(np.asarray(grad), np.exp(logp) - np.eye(11)[targets], atol=1e-12)
  tie = jnp.asarray([[1.0, 3.0, 3.0, 0.0]])
  assert bool(train.cross_entropy(tie, jnp.asarray([2]))[1][0])  # argmax says 1
  assert not bool(train.cross_entropy(tie, jnp.asarray([0]))[1][0])


@pytest.mark.slow
@pytest.mark.x64
@pytest.mark.parametrize("chunk", [4, 5])
def test_loss_chunk_gives_the_same_loss_and_gradients(chunk):
  """PLDRConfig.loss_chunk: the LM head and cross-entropy over chunks of positions
  (chunks of 4 over the 15 targets, the last one padded; chunks of 5, even) give the
  whole-sequence loss, metrics and gradients (float64)."""
  c = cfg.tiny(param_dtype="float64", compute_dtype="float64")
  p = init_params(c, jax.random.key(0))
  rng = np.random.default_rng(2)
  toks = rng.integers(4, c.vocab_size, (3, 16)).astype(np.int32)
  toks[1, 11:] = 0
  batch = {"tokens": jnp.asarray(toks), "mask": jnp.asarray((toks != 0).astype(np.int32))}
  grad = lambda cc: jax.value_and_grad(
      lambda q: train.loss_fn(q, batch, config=cc), has_aux=True)(p)
  (loss, m), g = grad(c)
  (loss_c, m_c), g_c = grad(c.replace(loss_chunk=chunk))
  np.testing.assert_allclose(float(loss_c), float(loss), rtol=1e-12)
  for k in m:
    np.testing.assert_allclose(float(m_c[k]), float(m[k]), rtol=1e-12)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-9, atol=1e-12), g_c, g)


@pytest.mark.slow
def test_loss_chunk_never_stores_the_whole_logits():
  """With loss_chunk the compiled gradient of the loss needs less temporary memory than
  the whole-sequence loss, by more than the [B, S, V] fp32 logits (XLA's own memory
  analysis, CPU: here 41.6 MB against 17.0 MB, the logits 16.6 MB)."""
  c = cfg.tiny(vocab_size=4096, max_len=128)
  p = jax.eval_shape(lambda: init_params(c, jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((8, 128), jnp.int32) for k in ("tokens", "mask")}
  logits_bytes = 8 * 127 * c.vocab_size * 4

  def temps(cc):
    f = jax.jit(jax.grad(lambda q, b: train.loss_fn(q, b, config=cc)[0]))
    return f.lower(p, batch).compile().memory_analysis().temp_size_in_bytes

  assert temps(c) - temps(c.replace(loss_chunk=32)) > logits_bytes


@pytest.mark.slow
def test_weight_decay_on_every_parameter_by_default():
  """AdamW decays biases, LayerNorms and the embedding too (the authors' torch AdamW);
  decay_all_params=False decays matrices only."""
  p = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,))}
  zero = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
  for all_params, b_decays in ((True, True), (False, False)):
    tc = TrainConfig(num_steps=10, warmup_steps=0, learning_rate=0.5, weight_decay=0.1,
                           end_lr_ratio=1.0, decay_all_params=all_params)
    tx = train.make_optimizer(tc)
    upd, _ = tx.update(zero, tx.init(p), p)  # zero gradient: the update is the decay alone
    np.testing.assert_allclose(np.asarray(upd["w"]), -0.05, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(upd["b"]), -0.05 if b_decays else 0.0, rtol=1e-6)


def test_schedule_and_clipping():
  tc = TrainConfig(num_steps=100, warmup_steps=10, learning_rate=1e-3, end_lr_ratio=0.1)
  s = train.lr_schedule(tc)
  assert float(s(0)) == 0.0
  np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(s(100)), 1e-4, rtol=1e-5)
  np.testing.assert_allclose(float(s(55)), 1e-4 + 0.9e-3 * 0.5, rtol=1e-5)
  tx = train.make_optimizer(TrainConfig(num_steps=10, warmup_steps=0, weight_decay=0.0,
                                              learning_rate=1.0))
  p = {"w": jnp.zeros((2, 2)), "b": jnp.zeros((2,))}
  g = {"w": jnp.array([[100.0, -0.5], [3.0, -7.0]]), "b": jnp.array([0.25, -9.0])}
  # clipping by value happens before Adam: Adam's first step is sign(g) * lr
  # whatever the scale, so check the clip transform on its own.
  clipped, _ = optax.clip(1.0).update(g, None)
  np.testing.assert_array_equal(np.asarray(clipped["w"]), [[1.0, -0.5], [1.0, -1.0]])
  upd, _ = tx.update(g, tx.init(p), p)
  assert np.all(np.isfinite(np.asarray(upd["w"])))


@pytest.mark.slow
def test_dag_term_matches_scipy_and_survives_large_entries():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  x = np.random.default_rng(0).standard_normal((3, 6, 6))
  want = np.mean([abs(np.log(np.trace(scipy_linalg.expm(a ** 2)) / 6)) for a in x])
  np.testing.assert_allclose(float(train.dag_term(jnp.asarray(x, jnp.float32))), want, rtol=1e-5)
  big = jnp.asarray(300.0 * x, jnp.float32)  # expm entries ~ exp(1e5): must not overflow
  val = float(train.dag_term(big))
  assert np.isfinite(val) and val > 1e4
  grad = jax.grad(lambda t: train.dag_term(t))(big)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_mesh_and_batch_errors():
  with pytest.raises(errors.ConfigError, match="device"):
    train.make_mesh(TrainConfig(mesh_data=2, mesh_fsdp=1))
  mesh = train.make_mesh(TrainConfig())
  train.check_batch_fits(3, mesh)
  fake = type("M", (), {"shape": {"data": 2, "fsdp": 4}})()
  with pytest.raises(errors.ConfigError, match="divisible"):
    train.check_batch_fits(12, fake)
  with pytest.raises(errors.ConfigError, match="num_steps"):
    TrainConfig(num_steps=0)


def test_flops_per_token_counts_the_metric_learner():
  c = cfg.pldrv51_110m()
  f_learned = train.flops_per_token(c, 1024)
  f_sdpa = train.flops_per_token(c.replace(g_mode="identity"), 1024)
  # 6 N per token for the matmul weights (the embedding is a lookup, not a
  # matmul); attention and the metric learner add to it.
  n_matmul = 105_606_482 - 32000 * 896
  assert 6 * n_matmul < f_sdpa < 6 * n_matmul * 1.2
  assert f_learned > f_sdpa


@pytest.mark.slow
def test_bf16_compute_with_fp32_params_trains_and_decodes():
  """bf16 matmuls (fp32 params, fp32 softmax/loss) run on CPU and stay close to fp32."""
  from pldr_jax.inference import generate
  c32 = cfg.tiny(vocab_size=96, max_len=24, g_mode="identity")
  c16 = c32.replace(compute_dtype="bfloat16")
  tc = TrainConfig(num_steps=4, warmup_steps=1, learning_rate=3e-3)
  tx = train.make_optimizer(tc)
  mesh = train.make_mesh(tc)
  toks = (4 + (np.arange(8)[:, None] + np.arange(24)) % 30).astype(np.int32)
  batch = {"tokens": toks, "mask": np.ones_like(toks)}
  losses = {}
  for c in (c32, c16):
    state = train.init_train_state(c, tc, tx, mesh)
    step = train.make_train_step(c, tc, tx, mesh)
    losses[c.compute_dtype] = []
    for _ in range(3):
      state, m = step(state, train.global_batch(batch, mesh))
      losses[c.compute_dtype].append(float(m["loss"]))
    assert state["params"]["embed"].dtype == jnp.float32
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
  out = generate.generate(state["params"], [[4, 5, 6, 7]], config=c16, max_new_tokens=4)
  assert len(out[0]) == 4

"""LESS kernel training: loss decreases, save/load, load errors, ignored positions."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from less_jax import errors as lerr
from less_jax import kernels as kernels_lib
from less_jax.config import LessTrainConfig
from less_jax import model as less_model
from less_jax import parallel as parallel_lib
from less_jax import policies as policies_lib
from less_jax import train_kernels as tk
from pldr_jax import config as config_lib
from pldr_jax import params as params_lib

S = 32
B = 2


@pytest.fixture(scope="module")
def setup():
  config = config_lib.tiny()  # 2 layers, 2 heads of width 8, max_len 32
  params = params_lib.init_params(config, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (B, S), 4, config.vocab_size, jnp.int32)
  batch = {"tokens": np.asarray(tokens, np.int32), "mask": np.ones((B, S), np.int32)}
  return config, params, batch


def _tc(**kw):
  base = dict(policy="h2o", heavy=4, recent=4, rank=4, hidden=16, epochs=1, epoch_steps=1,
              lr=1e-2, dropout=0.0, seed=0, val_batches=1)
  base.update(kw)
  return LessTrainConfig(**base)


def test_config_validation_and_name():
  tc = _tc()
  assert tc.run_name() == "h2o_8"
  assert LessTrainConfig(policy="lambda", sink=2, recent=6).run_name() == "lambda_8"
  with pytest.raises(lerr.PolicyError):
    LessTrainConfig(policy="nope", recent=4)
  with pytest.raises(ValueError, match="rank"):
    _tc(rank=0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    tc.rank = 3


def test_training_steps_reduce_loss(setup):
  config, params, batch = setup
  tc = _tc()
  policy = tc.make_policy(max_len=config.max_len)
  tx = tk.make_optimizer(tc)
  stacked = tk.init_stacked_kernels(jax.random.key(2), config, tc.rank, tc.hidden)
  opt_state = tx.init(stacked)
  step = tk.make_train_step(config, policy, tx, dropout=0.0)
  eval_step = tk.make_eval_step(config, policy)
  tokens, lengths = jnp.asarray(batch["tokens"]), tk._batch_lengths(batch)
  before = tk.evaluate(eval_step, stacked, params, [batch])
  sparse = tk.evaluate(eval_step, None, params, [batch])
  assert before.shape == (config.num_layers,) and np.all(before > 0)
  rng = jax.random.key(3)
  for _ in range(40):
    stacked, opt_state, per_layer = step(stacked, opt_state, params, tokens, lengths, rng)
  after = tk.evaluate(eval_step, stacked, params, [batch])
  assert np.all(np.isfinite(after))
  assert np.all(after < 0.95 * before), (before, after)
  assert np.all(after < sparse), (sparse, after)  # LESS beats the sparse policy alone
  assert stacked.wq1.dtype == jnp.float32


@pytest.mark.slow
def test_train_kernels_loop_keeps_best(setup):
  config, params, batch = setup
  tc = _tc(epochs=3, epoch_steps=2, dropout=0.3)
  logs = []
  res = tk.train_kernels(params, config, tc, itertools.repeat(batch), [batch], log=logs.append)
  assert len(res.history) == 3 and len(res.kernels) == config.num_layers
  assert all(0 <= e < 3 for e in res.best_epoch)
  vals = np.array([h["val"] for h in res.history])
  np.testing.assert_allclose(res.best_val, vals.min(axis=0))
  # The returned kernels are the best-validation ones, layer by layer.
  eval_step = tk.make_eval_step(config, tc.make_policy())
  got = tk.evaluate(eval_step, tk.stack_kernels(res.kernels), params, [batch])
  np.testing.assert_allclose(got, res.best_val, rtol=1e-5)
  assert any("sparse policy alone" in l for l in logs)
  # usable by the LESS model
  logits = less_model.less_forward(params, jnp.asarray(batch["tokens"]), config=config,
                                   policy=tc.make_policy(), kernels=res.kernels)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_lr_halves_every_ten_epochs():
  tc = _tc(epoch_steps=3, lr=1e-3, lr_halve_epochs=10)
  tx = tk.make_optimizer(tc)
  p = {"w": jnp.zeros((2,), jnp.float32)}
  g = {"w": jnp.ones((2,), jnp.float32)}
  state = tx.init(p)
  sizes = []
  for _ in range(31):  # Adam on a constant gradient: each update is -lr
    u, state = tx.update(g, state, p)
    sizes.append(-float(u["w"][0]))
  assert sizes[0] == pytest.approx(1e-3, rel=1e-4)
  assert sizes[29] == pytest.approx(1e-3, rel=1e-4)  # step 29: still epoch 9
  assert sizes[30] == pytest.approx(5e-4, rel=1e-4)  # step 30 = 10 epochs of 3 batches


def _kernels(config, rank=4, hidden=16, seed=5):
  return tk.unstack_kernels(tk.init_stacked_kernels(jax.random.key(seed), config, rank, hidden))


def test_save_load_round_trip_exact(setup, tmp_path):
  config, _, _ = setup
  tc = _tc()
  policy = tc.make_policy()
  kern = _kernels(config)
  kern = [k._replace(d1=k.d1 + 0.37) for k in kern]  # not the init value
  path = tk.save_kernels(tmp_path / "k", kern, config, policy, extra_meta={"note": "x"})
  loaded = tk.load_kernels(path, config, policy, rank=4)
  assert len(loaded) == config.num_layers
  for a, b in zip(kern, loaded):
    assert isinstance(b, kernels_lib.KernelParams)
    for name in kernels_lib.KernelParams._fields:
      x, y = np.asarray(getattr(a, name)), np.asarray(getattr(b, name))
      assert x.dtype == y.dtype == np.float32 and x.shape == y.shape
      np.testing.assert_array_equal(x, y)
  meta = tk.load_kernels_meta(path)
  assert meta["rank"] == 4 and meta["hidden"] == 16 and meta["head_dim"] == config.head_dim
  assert meta["policy"]["kind"] == "h2o" and meta["policy"]["budget"] == 8
  assert meta["note"] == "x"
  # saving again replaces the previous save
  kern2 = _kernels(config, seed=9)
  tk.save_kernels(path, kern2, config, policy)
  np.testing.assert_array_equal(np.asarray(tk.load_kernels(path, config)[1].wk1),
                                np.asarray(kern2[1].wk1))


def test_load_mismatch_errors(setup, tmp_path):
  config, _, _ = setup
  policy = _tc().make_policy()
  path = tk.save_kernels(tmp_path / "k", _kernels(config), config, policy)
  with pytest.raises(lerr.KernelLoadError, match="rank"):
    tk.load_kernels(path, config, policy, rank=8)
  with pytest.raises(lerr.KernelLoadError, match="head_dim"):
    tk.load_kernels(path, config.replace(num_heads=1), policy)  # d_model 16: dk 16
  with pytest.raises(lerr.KernelLoadError, match="num_heads"):
    tk.load_kernels(path, config.replace(d_model=32, num_heads=4), policy)  # dk still 8
  with pytest.raises(lerr.KernelLoadError, match="num_layers"):
    tk.load_kernels(path, config.replace(num_layers=3), policy)
  with pytest.raises(lerr.KernelLoadError, match="policy"):
    tk.load_kernels(path, config, policies_lib.h2o(2, 6), rank=4)
  with pytest.raises(lerr.KernelLoadError, match="missing"):
    tk.load_kernels(tmp_path / "nothing", config)
  assert issubclass(lerr.KernelLoadError, ValueError)


def test_loss_ignores_positions_before_budget(setup):
  config, params, batch = setup
  policy = policies_lib.h2o(4, 4)
  recs = less_model.collect_layer_io(params, jnp.asarray(batch["tokens"]), config=config)
  r = recs[0]
  lengths = jnp.full((B,), S, jnp.int32)
  mask = parallel_lib.sparse_mask(r["q_eff"], r["k"], lengths, policy)
  kern = kernels_lib.init_kernels(jax.random.key(4), config.head_dim, config.num_heads, 4, 16)
  args = (r["q_eff"], r["k"], r["v"])
  loss = lambda out: tk.kernel_loss(kern, *args, out, r["wo"]["kernel"], lengths, mask, policy)
  base = float(loss(r["out"]))
  budget = policy.budget
  noise = jax.random.normal(jax.random.key(6), r["out"].shape, r["out"].dtype)
  early = r["out"].at[:, :budget].add(100.0 * noise[:, :budget])
  assert float(loss(early)) == base
  late = r["out"].at[:, budget:].add(noise[:, budget:])
  assert float(loss(late)) > base + 1e-3
  # padding is ignored too
  short = jnp.array([S, S - 5], jnp.int32)
  pad_mask = parallel_lib.sparse_mask(r["q_eff"], r["k"], short, policy)
  lp = lambda out: tk.kernel_loss(kern, *args, out, r["wo"]["kernel"], short, pad_mask, policy)
  padded = r["out"].at[1, S - 5:].add(100.0)
  assert float(lp(padded)) == float(lp(r["out"]))
  # sse/count agrees with the mean
  sse, n = tk.layer_loss_terms(kern, *args, r["out"], r["wo"]["kernel"], lengths, mask, policy)
  assert float(n) == B * (S - budget)
  np.testing.assert_allclose(float(sse / n), base, rtol=1e-6)

"""The SOC order parameter (paper and audit variants) and the rank-one collapse
statistics (pldr_jax.analysis): plain NumPy float64 references, constructed cases
with known answers, the RoPE commutant against pldr_jax.rotary, and the scripts."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import analysis, errors, g_modes, rotary
from pldr_jax import criticality as crit
from pldr_jax import config as config_lib
from pldr_jax import params as params_lib

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- statistics vs NumPy

def _runs(seed=0, shape=(3, 2, 2, 4, 4)):
  rng = np.random.default_rng(seed)
  base = rng.normal(size=shape) + 0.3
  return ({"G_LM": base + 0.1 * rng.normal(size=shape)},
          {"G_LM": base + 0.1 * rng.normal(size=shape)},
          {"G_LM": base.astype(np.float32)})


def test_order_parameter_matches_plain_numpy_float64():
  r1, r2, rc = _runs()
  out = analysis.order_parameter(r1, r2, rc)["G_LM"]
  x1, x2, xc = (np.asarray(r["G_LM"], np.float64) for r in (r1, r2, rc))
  n = x1.size
  mean_c = sum(xc.ravel()) / n
  rmse_1c = np.sqrt(sum((a - b) ** 2 for a, b in zip(x1.ravel(), xc.ravel())) / n)
  rmse_12 = np.sqrt(sum((a - b) ** 2 for a, b in zip(x1.ravel(), x2.ravel())) / n)
  std_1 = np.sqrt(sum((a - x1.mean()) ** 2 for a in x1.ravel()) / n)
  assert out["mean_c"] == pytest.approx(mean_c, rel=1e-12)
  assert out["rmse_1c"] == pytest.approx(rmse_1c, rel=1e-12)
  assert out["rmse_12"] == pytest.approx(rmse_12, rel=1e-12)
  assert out["std_1"] == pytest.approx(std_1, rel=1e-12)
  assert out["order_parameter"] == pytest.approx(rmse_1c / abs(mean_c), rel=1e-12)
  for l in range(x1.shape[1]):  # per layer: over prompts, heads and entries
    a, c = x1[:, l].ravel(), xc[:, l].ravel()
    want = np.sqrt(np.mean((a - c) ** 2)) / abs(c.mean())
    assert out["per_layer"]["order_parameter"][l] == pytest.approx(want, rel=1e-12)


def test_order_parameter_is_zero_for_equal_runs_and_constant_zero_tensors():
  r1, _, _ = _runs()
  out = analysis.order_parameter(r1, r1, r1)["G_LM"]
  assert out["order_parameter"] == 0.0 and out["rmse_12"] == 0.0
  z = {"G_LM": np.zeros((1, 1, 1, 2, 2))}
  assert analysis.order_parameter(z, z, z)["G_LM"]["order_parameter"] == 0.0  # 0/0 -> 0
  with pytest.raises(ValueError, match="none of"):
    analysis.order_parameter({"X": 1}, {}, {})


def test_audit_statistics_match_numpy_and_rms_variant_is_bounded_by_two():
  rng = np.random.default_rng(1)
  x1 = rng.normal(size=(4, 3, 2, 4, 4)) + 0.5
  x2 = x1 + 0.2 * rng.normal(size=x1.shape)
  st = analysis.audit_statistics(x1, x2)
  for p in range(4):
    for l in range(3):
      a, b = x1[p, l].ravel(), x2[p, l].ravel()
      d = np.sqrt(np.mean((a - b) ** 2))
      assert st["rmse"][p, l] == pytest.approx(d, rel=1e-12)
      rms = 0.5 * (np.sqrt(np.mean(a * a)) + np.sqrt(np.mean(b * b)))
      assert st["audit_rms"][p, l] == pytest.approx(d / rms, rel=1e-12)
      mu = 0.5 * (abs(a.mean()) + abs(b.mean()))
      assert st["audit_mu"][p, l] == pytest.approx(d / mu, rel=1e-12)
  opposite = analysis.audit_statistics(x1, -x1)
  np.testing.assert_allclose(opposite["audit_rms"], 2.0, rtol=1e-12)   # the bound
  np.testing.assert_allclose(  # d = 2 rms(x1), mu = |mean x1|: unbounded as the mean -> 0
      opposite["audit_mu"], 2 * np.sqrt(np.mean(x1 ** 2, axis=(2, 3, 4)))
      / np.abs(x1.mean(axis=(2, 3, 4))), rtol=1e-12)
  far = analysis.audit_statistics(x1, rng.normal(size=x1.shape) * 100)
  assert np.all(far["audit_rms"] <= 2.0)
  s = analysis.summarize_audit(st)
  assert s["audit_rms"]["median"] == pytest.approx(np.median(st["audit_rms"]))
  assert len(s["audit_mu"]["per_layer_median"]) == 3


# ----------------------------------------------------------------- collapse statistics

def test_row_variance_ratio_and_cross_head_spread():
  rng = np.random.default_rng(2)
  row = rng.normal(size=6)
  same_rows = np.tile(row, (6, 1))
  assert analysis.row_variance_ratio(same_rows) == pytest.approx(0.0, abs=1e-15)
  m = rng.normal(size=(6, 6))
  want = np.sum((m - m.mean(0)) ** 2) / np.sum((m - m.mean()) ** 2)
  assert analysis.row_variance_ratio(m) == pytest.approx(want, rel=1e-12)
  assert np.isnan(analysis.row_variance_ratio(np.ones((3, 3))))
  heads = np.stack([m, m, m])
  assert analysis.cross_head_spread(heads) == pytest.approx(0.0, abs=1e-15)
  h2 = np.stack([m, -m])  # mean over heads is 0: infinite spread
  assert np.isinf(analysis.cross_head_spread(h2))
  h3 = np.stack([m, 2 * m, 3 * m])  # mean 2m, deviations -m, 0, m
  assert analysis.cross_head_spread(h3) == pytest.approx(np.sqrt(2 / 3) / 2, rel=1e-12)


@pytest.mark.parametrize("interleaved", [True, False])
def test_commutant_projection_folds_through_the_model_rotary(interleaved):
  """Pi_comm G commutes with pldr_jax.rotary at every position: rotating q G equals
  (rotated q) G, so it folds into the query projection; G itself does not."""
  dk = 8
  rng = np.random.default_rng(3)
  g = rng.normal(size=(2, dk, dk))
  p = analysis.commutant_projection(g, interleaved)
  np.testing.assert_allclose(analysis.commutant_projection(p, interleaved), p, atol=1e-14)
  assert abs(np.sum((g - p) * p)) < 1e-12   # orthogonal projection
  q = rng.normal(size=(1, 5, 1, dk))
  pos = jnp.asarray([[0, 1, 7, 30, 999]])
  rot = lambda x: np.asarray(rotary.apply_rotary(jnp.asarray(x), pos, 10000.0,
                                                 interleaved=interleaved))
  for h in range(2):
    np.testing.assert_allclose(rot(q @ p[h]), rot(q) @ p[h], atol=1e-5)  # float32 rotary
    assert not np.allclose(rot(q @ g[h]), rot(q) @ g[h], atol=1e-3)
  r = analysis.off_commutant_residual(g, interleaved)
  want = np.linalg.norm(g - p, axis=(-2, -1)) / np.linalg.norm(g, axis=(-2, -1))
  np.testing.assert_allclose(r, want, rtol=1e-12)
  # the commutant has dimension dk (a, b per plane): a random G keeps ~dk/dk^2 of it
  big = rng.normal(size=(200, dk, dk))
  assert np.mean(analysis.off_commutant_residual(big, interleaved) ** 2) == pytest.approx(
      1 - 1 / dk, abs=0.02)


def test_commutant_of_coinciding_frequencies_keeps_the_cross_block():
  g = np.zeros((4, 4))
  g[0:2, 2:4] = [[1.0, -2.0], [2.0, 1.0]]   # a I + b J between planes 0 and 1
  assert analysis.off_commutant_residual(g, frequencies=[1.0, 1.0]) == pytest.approx(0.0)
  assert analysis.off_commutant_residual(g, frequencies=[1.0, 0.5]) == pytest.approx(1.0)
  assert analysis.off_commutant_residual(np.eye(4)) == 0.0


def test_collapse_statistics_of_a_rank_one_identical_rows_tensor():
  rng = np.random.default_rng(4)
  row = rng.normal(size=8)
  a = np.broadcast_to(np.tile(row, (8, 1)), (3, 2, 4, 8, 8))  # [N, L, H, dk, dk]
  g = rng.normal(size=(3, 2, 4, 8, 8))
  st = analysis.collapse_statistics({"A": a, "G_LM": g}, suffixed={"G_LM": g})
  assert st["A"]["rank"]["median"] == 1 and st["A"]["sigma2_over_sigma1"]["max"] < 1e-12
  assert st["A"]["row_variance_ratio"]["max"] < 1e-12
  assert st["A"]["cross_head_spread"]["max"] < 1e-12
  assert st["G_LM"]["suffix_relative_change"]["max"] == 0.0
  assert 0.5 < st["G_LM"]["off_commutant_residual"]["median"] < 1.0
  assert len(st["G_LM"]["rank"]["per_layer_median"]) == 2


def test_published_g_lm_collapse_and_off_commutant_residual(published_data):
  path = published_data / "g_lm_pldrv51_110m_1.npy"
  if not path.is_file():
    pytest.skip(f"{path} not found")
  g = np.load(path)  # [5, 14, 64, 64], the authors' interleaved RoPE layout
  st = analysis.collapse_statistics({"G_LM": g})["G_LM"]
  res = st["off_commutant_residual"]
  assert 0.0 < res["min"] <= res["median"] <= res["max"] <= 1.0
  assert st["rank"]["per_layer_median"][:2] == [1.0, 1.0]   # nearly rank one early on


# ----------------------------------------------------------------- from a model

CONFIG = config_lib.tiny(max_len=24)
PROMPTS = np.random.default_rng(5).integers(4, 64, size=(3, 10)).astype(np.int32)


@pytest.mark.slow
def test_fixed_g_model_gives_exactly_zero_on_g_lm():
  """A fixed G (here 'random') is the same constant in every run: order parameter and
  audit statistics exactly 0 on G_LM, the only tensor the model has."""
  config = CONFIG.replace(g_mode="random")
  params = params_lib.init_params(config, jax.random.key(0))
  g = g_modes.make_fixed_g(config, jax.random.key(1))
  out = crit.criticality(params, config, PROMPTS, max_new_tokens=6, audit_tokens=6,
                             g_lm=g, batch_size=3)
  assert set(out["paper"]) == {"G_LM"}
  p = out["paper"]["G_LM"]
  assert p["order_parameter"] == 0.0 and p["rmse_12"] == 0.0 and p["rmse_2c"] == 0.0
  assert p["mean_c"] == pytest.approx(float(np.mean(np.asarray(g, np.float64))), rel=1e-6)
  assert out["audit"]["G_LM"]["audit_rms"]["max"] == 0.0
  assert out["collapse"]["G_LM"]["suffix_relative_change"]["max"] == 0.0


@pytest.mark.slow
def test_learned_g_runs_the_paper_protocol_and_different_prompts_differ():
  params = params_lib.init_params(CONFIG, jax.random.key(0))
  key = jax.random.key(7)
  toks = crit.sample_uncached(params, CONFIG, PROMPTS, 6, key)
  assert toks.shape == (3, 16) and np.array_equal(toks[:, :10], PROMPTS)
  assert np.array_equal(toks, crit.sample_uncached(params, CONFIG, PROMPTS, 6, key))
  cached = crit.cached_tensors(params, CONFIG, PROMPTS)
  direct = crit.deductive_tensors(params, CONFIG, PROMPTS)
  assert set(cached) == set(analysis.DEDUCTIVE_TENSORS)
  for k in cached:  # the G-cache holds the prompt's own tensors
    assert cached[k].shape == (3, CONFIG.num_layers, CONFIG.num_heads, 8, 8)
    np.testing.assert_allclose(cached[k], direct[k], rtol=1e-5, atol=1e-7)
  # two "runs" over different prompts: a clearly non-zero order parameter
  other = crit.deductive_tensors(params, CONFIG, (PROMPTS[::-1] + 1) % 60 + 4)
  op = analysis.order_parameter(direct, direct, other)
  assert op["G_LM"]["order_parameter"] > 1e-3 and op["A_LM"]["order_parameter"] > 1e-3
  assert analysis.order_parameter(direct, direct, cached)["G_LM"]["order_parameter"] < 1e-5
  out = crit.criticality(params, CONFIG, PROMPTS, max_new_tokens=6, audit_tokens=6,
                             batch_size=3)
  assert out["paper"]["G_LM"]["order_parameter"] > 0
  assert out["audit"]["G_LM"]["audit_rms"]["max"] <= 2.0
  assert set(out["collapse"]) == {"A", "A_LM", "G_LM"}


def test_sampling_refuses_a_sequence_beyond_the_context_or_vocabulary():
  params = params_lib.init_params(CONFIG, jax.random.key(0))
  with pytest.raises(errors.InputError, match="outside the vocabulary"):
    crit.deductive_tensors(params, CONFIG, PROMPTS + 60)
  with pytest.raises(errors.InputError, match="context length 24"):
    crit.sample_uncached(params, CONFIG, PROMPTS, 20, jax.random.key(0))


# ----------------------------------------------------------------- the scripts

def _script(name: str):
  """experiments/<name>.py as a module (its main runs in this process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"{name}_under_test",
                                                REPO / "experiments" / f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_criticality_script_bad_input_is_one_line(capsys):
  from pldr_jax import cli
  mod = _script("criticality")
  for argv, what in ((["--checkpoint", "/nonexistent/run"], "/nonexistent/run"),):
    assert cli.run(mod.main, argv) != 0
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and what in lines[0], lines


def test_sweep_spearman_and_ranks_without_scipy():
  mod = _script("criticality_sweep")
  np.testing.assert_array_equal(mod.ranks([3.0, 1.0, 3.0, 2.0]), [3.5, 1.0, 3.5, 2.0])
  s = mod.spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7])
  from scipy.stats import spearmanr
  assert s["rho"] == pytest.approx(spearmanr([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]).statistic)
  rx, ry = mod.ranks([1, 2, 3, 4, 5]), mod.ranks([5, 6, 7, 8, 7])
  assert np.corrcoef(rx, ry)[0, 1] == pytest.approx(s["rho"])
  assert mod.spearman([1, np.nan], [2, 3])["rho"] is None
  with pytest.raises(mod.errors.ConfigError, match="--lrs"):
    mod.parse_list("1e-3,x", float, "--lrs")


@pytest.mark.slow
def test_sweep_two_runs_few_steps_end_to_end(tmp_path):
  out = tmp_path / "sweep"
  cmd = [sys.executable, str(REPO / "experiments" / "criticality_sweep.py"),
         "--gin_file=experiments/configs/criticality_tiny.gin", f"--out={out}",
         "--lrs=1e-3", "--warmups=2,4", "--num_prompts=4", "--prompt_len=16",
         "--max_new_tokens=8", "--audit_tokens=8",
         "--gin_param=TrainConfig.num_steps=6", "--gin_param=TrainConfig.eval_every=3",
         "--gin_param=TrainConfig.checkpoint_every=6", "--gin_param=TrainConfig.log_every=3",
         "--gin_param=DataConfig.max_eval_batches=1"]
  env = {**__import__("os").environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
  assert r.returncode == 0, r.stderr[-2000:]
  doc = json.loads((out / "sweep.json").read_text())
  assert [row["run"] for row in doc["runs"]] == ["lr0.001_wu2", "lr0.001_wu4"]
  assert all(isinstance(row["op_G_LM"], float) for row in doc["runs"])
  for name in ("sweep.csv", "sweep_grid.png", "sweep_vs_loss.png", "sweep_curves.png"):
    assert (out / name).is_file()
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
  assert again.returncode == 0 and "skipped" in again.stdout and "cached" in again.stdout


def test_analyze_g_writes_the_collapse_statistics(tmp_path):
  rng = np.random.default_rng(6)
  g = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
  g[0] = analysis.commutant_projection(g[0])  # layer 0 folds into the query projection
  np.save(tmp_path / "g.npy", g)
  outs = {}
  mod = _script("analyze_g")
  for layout in ("interleaved", "half"):
    assert mod.main([str(tmp_path / "g.npy"), "--out", str(tmp_path / layout), "--no_plots",
                     "--rope_layout", layout]) == 0
    outs[layout] = json.loads((tmp_path / layout / "collapse.json").read_text())
  res = outs["interleaved"]["source"]["G_LM"]["off_commutant_residual"]["per_layer_median"]
  assert res[0] == pytest.approx(0.0, abs=1e-6) and res[1] > 0.5
  assert outs["half"]["rope_interleaved"] is False
  assert outs["half"]["source"]["G_LM"]["off_commutant_residual"]["per_layer_median"][0] > 0.1

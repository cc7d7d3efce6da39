"""pldr_jax.analysis vs plain NumPy on hand-made matrices; the published G_LM; the CLI."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pldr_jax import analysis

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "analyze_g.py"
PUBLISHED = "g_lm_pldrv51_110m_1.npy"


def test_rank_one_matrix_has_rank_one_and_zero_sigma2():
  rng = np.random.default_rng(0)
  u, v = rng.normal(size=8), rng.normal(size=8)
  m = analysis.matrix_metrics(np.outer(u, v))
  assert m["rank"] == 1
  assert m["sigma1"] == pytest.approx(np.linalg.norm(u) * np.linalg.norm(v), rel=1e-12)
  assert m["sigma2_over_sigma1"] < 1e-14
  assert m["det_sign"] == 0 or m["logabsdet"] < -60  # singular


def test_identity_has_logdet_zero_full_rank_and_rmse():
  m = analysis.matrix_metrics(np.eye(6))
  assert m["rank"] == 6 and m["logabsdet"] == 0.0 and m["det_sign"] == 1.0
  assert m["sigma2_over_sigma1"] == 1.0
  assert m["fro_norm"] == pytest.approx(np.sqrt(6))
  assert m["rmse"] == pytest.approx(np.sqrt(6 / 36))


def test_zero_matrix_has_rank_zero():
  m = analysis.matrix_metrics(np.zeros((4, 4)))
  assert m["rank"] == 0 and m["det_sign"] == 0 and m["logabsdet"] == -np.inf
  assert np.isnan(m["sigma2_over_sigma1"])


def test_rank_tolerance_is_relative_to_sigma1():
  d = np.diag([10.0, 1.0, 2e-2, 1e-5])
  assert analysis.matrix_metrics(d)["rank"] == 3                 # 1e-5 <= 1e-3 * 10
  assert analysis.matrix_metrics(d, tol=1e-7)["rank"] == 4
  assert analysis.matrix_metrics(d, tol=0.5)["rank"] == 1
  assert analysis.matrix_metrics(-d)["det_sign"] == 1.0          # (-1)^4
  assert analysis.matrix_metrics(np.diag([-2.0, 3.0]))["det_sign"] == -1.0


def test_batched_metrics_match_plain_numpy():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(3, 4, 5, 5)).astype(np.float32)
  x[1, 2] = np.outer(rng.normal(size=5), rng.normal(size=5))  # one rank-1 head
  r = analysis.analyze({"G_LM": x, "A_LM": 2 * x, "A": x})
  assert list(r) == ["G_LM", "A_LM"]
  m = r["G_LM"]
  for l in range(3):
    for h in range(4):
      a = x[l, h].astype(np.float64)
      s = np.linalg.svd(a, compute_uv=False)
      sign, ld = np.linalg.slogdet(a)
      np.testing.assert_allclose(m["singular_values"][l, h], s, rtol=1e-12)
      assert m["rank"][l, h] == np.sum(s > 1e-3 * s[0])
      assert m["sigma2_over_sigma1"][l, h] == pytest.approx(s[1] / s[0], rel=1e-12)
      assert m["fro_norm"][l, h] == pytest.approx(np.linalg.norm(a, "fro"), rel=1e-12)
      assert m["rmse"][l, h] == pytest.approx(np.sqrt(np.mean(a ** 2)), rel=1e-12)
      if sign != 0:
        assert m["logabsdet"][l, h] == pytest.approx(ld, rel=1e-12, abs=1e-12)
        assert m["det_sign"][l, h] == sign
  assert m["rank"][1, 2] == 1
  # A_LM = 2 G: logdet shifts by n log 2, RMSE doubles
  np.testing.assert_allclose(r["A_LM"]["rmse"], 2 * m["rmse"], rtol=1e-12)
  ok = m["det_sign"] != 0
  np.testing.assert_allclose(r["A_LM"]["logabsdet"][ok], m["logabsdet"][ok] + 5 * np.log(2),
                             rtol=1e-10)
  table = analysis.rows(r)
  assert len(table) == 2 * 3 * 4 and set(analysis.METRIC_FIELDS) <= set(table[0])
  cmp = analysis.compare(r, {"G_LM": r["A_LM"]})
  assert len(cmp) == 12
  assert cmp[0]["rmse_diff"] == pytest.approx(m["rmse"][0, 0])


def test_shapes_are_checked():
  with pytest.raises(ValueError, match="square"):
    analysis.matrix_metrics(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="none of"):
    analysis.analyze({"A": np.eye(2)})


def test_published_g_lm_median_sigma_ratio_per_layer(published_data):
  path = published_data / PUBLISHED
  if not path.is_file():
    pytest.skip(f"{path} not found")
  g = np.load(path)
  assert g.shape == (5, 14, 64, 64)
  m = analysis.analyze({"G_LM": g})["G_LM"]
  medians = analysis.per_layer_summary(m)["median_sigma2_over_sigma1"]
  readme = [4.7e-4, 1.3e-4, 0.74, 0.71, 0.96]
  for got, want in zip(medians, readme):
    assert float(f"{got:.2g}") == want, (medians, readme)
  # nearly rank one in the first layers, high rank in the last
  ranks = analysis.per_layer_summary(m)["median_rank"]
  assert ranks[0] == ranks[1] == 1 and ranks[4] > 32


def _run_cli(*args):
  out = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  return out.stdout


@pytest.mark.slow  # runs experiments/analyze_g.py
def test_cli_writes_table_json_plots_and_compares(tmp_path):
  rng = np.random.default_rng(2)
  a = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)
  np.save(tmp_path / "a.npy", a)
  np.savez(tmp_path / "b.npz", G_LM=a * np.float32(2), A_LM=a)
  out = tmp_path / "out"
  stdout = _run_cli(tmp_path / "a.npy", "--out", out, "--compare", tmp_path / "b.npz")
  for f in ("g_metrics.csv", "g_metrics.json", "spectra_G_LM.png", "rank_G_LM.png",
            "compare.csv"):
    assert (out / f).is_file() and (out / f).stat().st_size > 0, f
  with open(out / "g_metrics.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 6 and table[0]["tensor"] == "G_LM"
  doc = json.loads((out / "g_metrics.json").read_text())
  assert doc["rank_tol"] == analysis.DEFAULT_RANK_TOL
  assert np.asarray(doc["tensors"]["G_LM"]["singular_values"]).shape == (2, 3, 8)
  # 15 decimals; log|det| of 1.5 a differs by 8 log 2 in every head
  want = f"{8 * np.log(2):.15f}"
  lines = [l for l in stdout.splitlines() if l.startswith("G_LM layer")]
  assert len(lines) == 6 and all(f"diff {want[:-3]}" in l for l in lines), lines[:2]

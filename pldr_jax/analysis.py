"""Spectral and size metrics of the deductive tensors G_LM (and A_LM), per layer and head.

Pure NumPy (float64 throughout): every function takes arrays whose last two
axes are square matrices, e.g. G_LM [L, H, dk, dk] as a pretraining run stores
it (checkpoint item 'g_lm': {'G_LM', 'A', 'A_LM'}) or as the authors publish it
(g_lm_pldrv51_110m_1.npy, [5, 14, 64, 64]).

Metrics per matrix M (dk x dk):
  singular_values   sigma_1 >= ... >= sigma_dk (np.linalg.svd)
  rank              numerical rank: #{i : sigma_i > tol * sigma_1}
  sigma2_over_sigma1
  logabsdet, sign   np.linalg.slogdet (log|det M| and the sign of det M;
                    -inf and 0 for a singular matrix)
  fro_norm          ||M||_F
  rmse              sqrt(mean(M_ij^2)) = ||M||_F / dk

The rank tolerance is relative to the largest singular value of the same
matrix, default `DEFAULT_RANK_TOL` = 1e-3. Why not NumPy's matrix_rank default
(sigma_1 * dk * eps, ~1e-5 for float32 at dk = 64)? The tensors are computed
in float32 (or bf16) and averaged over many positions; directions a thousand
times weaker than the dominant one carry no usable signal at that precision,
so 1e-3 counts only directions that matter. With it the published
PLDRv51-110M G_LM (median sigma2/sigma1 per layer 4.7e-4, 1.3e-4, 0.74, 0.71,
0.96) has median rank per layer 1, 1, 5.5, 21, 46 of 64: rank one in most heads
of the first two layers, high rank in the last ones (the spectra decay
gradually there, so the count depends on `tol`). Pass `tol` to change it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

__all__ = [
    "DEFAULT_RANK_TOL", "METRIC_FIELDS", "singular_values", "numerical_rank",
    "matrix_metrics", "analyze_tensor", "analyze", "per_layer_summary", "rows",
    "compare", "load_tensors",
]

DEFAULT_RANK_TOL = 1e-3
ANALYZED = ("G_LM", "A_LM")  # tensors looked at when present, in this order
METRIC_FIELDS = ("rank", "sigma1", "sigma2", "sigma_min", "sigma2_over_sigma1",
                 "logabsdet", "det_sign", "fro_norm", "rmse")


def _square(x) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
    raise ValueError(f"expected [..., n, n] square matrices, got shape {x.shape}")
  return x


def singular_values(x) -> np.ndarray:
  """[..., n] singular values of [..., n, n], descending."""
  return np.linalg.svd(_square(x), compute_uv=False)


def numerical_rank(s, tol: float = DEFAULT_RANK_TOL) -> np.ndarray:
  """Number of singular values > tol * sigma_1 (s: [..., n] descending); 0 for M = 0."""
  s = np.asarray(s, np.float64)
  return np.sum(s > tol * s[..., :1], axis=-1).astype(np.int64)


def matrix_metrics(x, tol: float = DEFAULT_RANK_TOL) -> dict[str, np.ndarray]:
  """Metrics of [..., n, n] matrices: a dict of [...] arrays plus 'singular_values' [..., n]."""
  x = _square(x)
  n = x.shape[-1]
  s = singular_values(x)
  sign, logabsdet = np.linalg.slogdet(x)
  s1 = s[..., 0]
  s2 = s[..., 1] if n > 1 else np.zeros_like(s1)
  with np.errstate(divide="ignore", invalid="ignore"):
    ratio = np.where(s1 > 0, s2 / np.where(s1 > 0, s1, 1.0), np.nan)
  fro = np.sqrt(np.sum(x * x, axis=(-2, -1)))
  return {
      "singular_values": s,
      "rank": numerical_rank(s, tol),
      "sigma1": s1,
      "sigma2": s2,
      "sigma_min": s[..., -1],
      "sigma2_over_sigma1": ratio,
      "logabsdet": logabsdet,
      "det_sign": sign,
      "fro_norm": fro,
      "rmse": fro / n,
  }


def analyze_tensor(x, tol: float = DEFAULT_RANK_TOL) -> dict[str, np.ndarray]:
  """matrix_metrics of a [L, H, n, n] tensor ([H, n, n] or [n, n] are promoted to it)."""
  x = _square(x)
  while x.ndim < 4:
    x = x[None]
  if x.ndim != 4:
    raise ValueError(f"expected [layers, heads, n, n], got shape {x.shape}")
  return matrix_metrics(x, tol)


def analyze(tensors: Mapping[str, Any], tol: float = DEFAULT_RANK_TOL,
            names=ANALYZED) -> dict[str, dict[str, np.ndarray]]:
  """{name: analyze_tensor(...)} for each of `names` present in `tensors`."""
  out = {k: analyze_tensor(tensors[k], tol) for k in names if k in tensors}
  if not out:
    raise ValueError(f"none of {list(names)} found; tensors given: {sorted(tensors)}")
  return out


def per_layer_summary(m: Mapping[str, np.ndarray]) -> dict[str, list]:
  """Per layer, over heads: median sigma2/sigma1, median/min/max rank, mean RMSE, median logdet."""
  return {
      "median_sigma2_over_sigma1": np.nanmedian(m["sigma2_over_sigma1"], axis=1).tolist(),
      "median_rank": np.median(m["rank"], axis=1).tolist(),
      "min_rank": np.min(m["rank"], axis=1).tolist(),
      "max_rank": np.max(m["rank"], axis=1).tolist(),
      "mean_rmse": np.mean(m["rmse"], axis=1).tolist(),
      "median_logabsdet": np.median(m["logabsdet"], axis=1).tolist(),
  }


def rows(results: Mapping[str, Mapping[str, np.ndarray]]) -> list[dict]:
  """Flat table: one dict per (tensor, layer, head) with METRIC_FIELDS."""
  out = []
  for name, m in results.items():
    n_layers, n_heads = m["rank"].shape
    for l in range(n_layers):
      for h in range(n_heads):
        row = {"tensor": name, "layer": l, "head": h}
        for f in METRIC_FIELDS:
          v = m[f][l, h]
          row[f] = int(v) if f == "rank" else float(v)
        out.append(row)
  return out


def compare(a: Mapping[str, Mapping[str, np.ndarray]], b: Mapping[str, Mapping[str, np.ndarray]],
            fields=("rmse", "logabsdet")) -> list[dict]:
  """Per (tensor, layer, head) present in both: each field of a, of b and b - a."""
  out = []
  for name in a:
    if name not in b:
      continue
    ma, mb = a[name], b[name]
    if ma["rank"].shape != mb["rank"].shape:
      raise ValueError(f"{name}: layers x heads differ: {ma['rank'].shape} vs {mb['rank'].shape}")
    n_layers, n_heads = ma["rank"].shape
    for l in range(n_layers):
      for h in range(n_heads):
        row = {"tensor": name, "layer": l, "head": h}
        for f in fields:
          va, vb = float(ma[f][l, h]), float(mb[f][l, h])
          row[f"{f}_a"], row[f"{f}_b"] = va, vb
          row[f"{f}_diff"] = vb - va if np.isfinite(va) and np.isfinite(vb) else (
              0.0 if va == vb else float("nan"))
        out.append(row)
  return out


def load_tensors(source: str | os.PathLike, step: int | None = None) -> dict[str, np.ndarray]:
  """G_LM (and A, A_LM) from a .npy ([L, H, n, n] -> {'G_LM'}), a .npz, a checkpoint
  directory (its 'g_lm' item; latest finished step unless `step`), or a run workdir
  holding `checkpoints/`. Checkpoints are read with pldr_jax.checkpoint.load_g_lm
  (imported only then: reading .npy files needs NumPy alone)."""
  src = Path(source)
  if not src.exists():
    raise FileNotFoundError(f"G_LM source not found: {src}")
  if src.is_file():
    if src.suffix == ".npz":
      with np.load(src) as z:
        return {k: np.asarray(z[k]) for k in z.files}
    return {"G_LM": np.asarray(np.load(src))}
  if (src / "checkpoints").is_dir():
    src = src / "checkpoints"
  from pldr_jax.checkpoint import load_g_lm  # jax/orbax: only for checkpoints
  item = load_g_lm(src, step)
  return {k: np.asarray(v) for k, v in item.items()}

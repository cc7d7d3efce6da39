"""Spectral and size metrics of the deductive tensors G_LM (and A_LM), per layer and head;
the self-organized-criticality order parameter and the rank-one collapse statistics.

Second part (below the `Self-organized criticality` banner): the order
parameter of Gokden, "PLDR-LLMs Reason At Self-Organized Criticality" (arXiv
2603.23539) in the paper's form (`order_parameter`: RMSE between an uncached
and a cached run over the mean magnitude of the cached one) and the authors'
later audit form (`audit_statistics`: two sampled continuations per prompt,
per (prompt, layer), RMS- and mean-normalised), the collapse statistics
(`collapse_statistics`: sigma2/sigma1, numerical rank, row-variance ratio,
cross-head spread, G_LM's off-commutant residual w.r.t. the RoPE planes and its
change with a suffix), and `criticality`, which runs the whole protocol on a
model (JAX imported only then). experiments/criticality.py is its command.

The first part is pure NumPy (float64 throughout): every function takes arrays whose last two
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

__all__ = ["DEFAULT_RANK_TOL", "METRIC_FIELDS", "singular_values", "numerical_rank",
    "matrix_metrics", "analyze_tensor", "analyze", "per_layer_summary", "rows", "compare",
    "load_tensors", "DEDUCTIVE_TENSORS", "order_parameter", "audit_statistics",
    "summarize_audit", "row_variance_ratio", "cross_head_spread", "rope_planes",
    "rope_frequencies", "commutant_projection", "off_commutant_residual",
    "relative_difference", "collapse_statistics"]

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
  holding `checkpoints/`. Checkpoints are read with pldr_jax.training.checkpoint.load_g_lm
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
  from pldr_jax.training.checkpoint import load_g_lm  # jax/orbax: only for checkpoints
  item = load_g_lm(src, step)
  return {k: np.asarray(v) for k, v in item.items()}


# =============================================================================
# Self-organized criticality (Gokden, "PLDR-LLMs Reason At Self-Organized
# Criticality", arXiv 2603.23539): the order parameter and the rank-one
# collapse statistics. The statistics below are pure NumPy (float64); the
# functions that run a model (`held_out_prompts`, `sample_uncached`,
# `deductive_tensors`, `cached_tensors`, `criticality`) import JAX when called.
#
# Layout of the deductive tensors of N prompts: [N, L, H, dk, dk]
# (prompt, layer, head, dk, dk).
# =============================================================================

DEDUCTIVE_TENSORS = ("A", "A_LM", "A_P", "G_LM")
ORDER_FIELDS = ("mean_1", "std_1", "mean_2", "std_2", "mean_c", "std_c", "rmse_12", "rmse_1c",
                "rmse_2c", "order_parameter", "relative_rmse_1c")


def _f64(x) -> np.ndarray:
  return np.asarray(x, np.float64)


def _ratio(num, den):
  """num / |den|, with 0/0 = 0 and x/0 = inf (x > 0): a constant tensor that does not
  change between runs has order parameter 0 whatever its mean."""
  num, den = _f64(num), np.abs(_f64(den))
  with np.errstate(divide="ignore", invalid="ignore"):
    out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(num > 0, np.inf, 0.0))
  return out


def _order_stats(x1, x2, xc, axes) -> dict[str, np.ndarray]:
  rm = lambda a, b: np.sqrt(np.mean((a - b) ** 2, axis=axes))
  out = {"mean_1": x1.mean(axis=axes), "std_1": x1.std(axis=axes),
         "mean_2": x2.mean(axis=axes), "std_2": x2.std(axis=axes),
         "mean_c": xc.mean(axis=axes), "std_c": xc.std(axis=axes),
         "rmse_12": rm(x1, x2), "rmse_1c": rm(x1, xc), "rmse_2c": rm(x2, xc)}
  out["order_parameter"] = _ratio(out["rmse_1c"], out["mean_c"])
  out["relative_rmse_1c"] = _ratio(out["rmse_1c"], np.sqrt(np.mean(xc * xc, axis=axes)))
  return out


def order_parameter(run1: Mapping[str, Any], run2: Mapping[str, Any], cached: Mapping[str, Any],
                    names=DEDUCTIVE_TENSORS) -> dict[str, dict]:
  """The SOC paper's order parameter (its section 3, Tables 5-6), per tensor.

  run1, run2, cached: {name: [N, L, H, dk, dk]} deductive tensors of the same N
  prompts: runs 1 and 2 sampled without KV- or G-cache and taken after the final
  generated token, the cached run taken after the last prompt token (what the
  G-cache holds). For each name present in all three, over the whole model
  (every prompt, layer, head and entry):
    mean_r, std_r      of each run r in {1, 2, c}
    rmse_12, rmse_1c, rmse_2c   sqrt(mean((x_r - x_s)^2))
    order_parameter    rmse_1c / |mean_c|   (RMSE_1C / |mu_C| of the paper)
    relative_rmse_1c   rmse_1c / rms_c = rmse_1c / sqrt(mean_c^2 + std_c^2): not the
                       paper's; the same distance relative to the tensor's size,
                       which stays finite when the mean is near 0 (|mu_C| << std_C
                       makes the paper's ratio large whatever the distance)
  and the same per layer under 'per_layer' (lists of L values). 0/0 counts as 0.
  """
  out = {}
  for name in names:
    if not all(name in r for r in (run1, run2, cached)):
      continue
    x1, x2, xc = _f64(run1[name]), _f64(run2[name]), _f64(cached[name])
    if not x1.shape == x2.shape == xc.shape or x1.ndim != 5:
      raise ValueError(f"{name}: expected three [prompts, layers, heads, dk, dk] arrays of one "
                       f"shape, got {x1.shape}, {x2.shape}, {xc.shape}")
    whole = _order_stats(x1, x2, xc, None)
    layer = _order_stats(x1, x2, xc, (0, 2, 3, 4))
    out[name] = {**{k: float(v) for k, v in whole.items()},
                 "per_layer": {k: v.tolist() for k, v in layer.items()}}
  if not out:
    raise ValueError(f"none of {list(names)} is in all three runs: run1 {sorted(run1)}, "
                     f"run2 {sorted(run2)}, cached {sorted(cached)}")
  return out


AUDIT_FIELDS = ("rmse", "audit_rms", "audit_mu")


def audit_statistics(x1, x2) -> dict[str, np.ndarray]:
  """The authors' later audit variant: two sampled continuations of the same prompts.

  x1, x2: [N, L, H, dk, dk], a deductive tensor after continuation 1 and 2 of
  each of N prompts. Compared per (prompt, layer) on its [H, dk, dk] block:
    rmse       d = sqrt(mean((x1 - x2)^2))
    audit_rms  d / (0.5 (rms(x1) + rms(x2)))   RMS-normalised; by the triangle
               inequality at most 2 (reached when x2 = -x1), so it is a bounded
               relative distance, not comparable unchanged with the paper's or
               the mean-normalised value
    audit_mu   d / mu, mu = 0.5 (|mean x1| + |mean x2|)   mean-normalised, the
               paper's normalisation (unbounded when the mean is near 0)
  Returns {field: [N, L]} (0/0 = 0, d/0 = inf).
  """
  x1, x2 = _f64(x1), _f64(x2)
  if x1.shape != x2.shape or x1.ndim != 5:
    raise ValueError(f"expected two [prompts, layers, heads, dk, dk] arrays of one shape, got "
                     f"{x1.shape} and {x2.shape}")
  ax = (2, 3, 4)
  d = np.sqrt(np.mean((x1 - x2) ** 2, axis=ax))
  rms = 0.5 * (np.sqrt(np.mean(x1 ** 2, axis=ax)) + np.sqrt(np.mean(x2 ** 2, axis=ax)))
  mu = 0.5 * (np.abs(x1.mean(axis=ax)) + np.abs(x2.mean(axis=ax)))
  return {"rmse": d, "audit_rms": _ratio(d, rms), "audit_mu": _ratio(d, mu)}


def summarize_audit(stats: Mapping[str, np.ndarray]) -> dict:
  """Median, mean and max over (prompt, layer) of each audit field, and per-layer medians."""
  out = {}
  for k in AUDIT_FIELDS:
    v = _f64(stats[k])
    out[k] = {"median": float(np.median(v)), "mean": float(np.mean(v)), "max": float(np.max(v)),
              "per_layer_median": np.median(v, axis=0).tolist()}
  return out


# ----------------------------------------------------------------- rank-one collapse

def row_variance_ratio(x) -> np.ndarray:
  """||M - 1 r^T||_F^2 / ||M - mean(M)||_F^2 per [..., n, n] matrix, r the mean row:
  the share of the entries' variance that lies between rows. 0 when every row is
  the same (the 'identical rows' of a collapsed A), about 1 - 1/n for i.i.d.
  entries; NaN for a constant matrix."""
  x = _square(x)
  between = np.sum((x - x.mean(axis=-2, keepdims=True)) ** 2, axis=(-2, -1))
  total = np.sum((x - x.mean(axis=(-2, -1), keepdims=True)) ** 2, axis=(-2, -1))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(total > 0, between / np.where(total > 0, total, 1.0), np.nan)


def cross_head_spread(x) -> np.ndarray:
  """sqrt(mean_h ||M_h - Mbar||_F^2) / ||Mbar||_F for [..., H, n, n], Mbar the mean over
  heads: 0 when every head holds the same matrix. Returns [...]."""
  x = _square(x)
  if x.ndim < 3:
    raise ValueError(f"expected [..., heads, n, n], got shape {x.shape}")
  mean = x.mean(axis=-3, keepdims=True)
  spread = np.sqrt(np.mean(np.sum((x - mean) ** 2, axis=(-2, -1)), axis=-1))
  return _ratio(spread, np.sqrt(np.sum(mean[..., 0, :, :] ** 2, axis=(-2, -1))))


def rope_planes(dk: int, interleaved: bool = True) -> np.ndarray:
  """[dk/2, 2] the head-axis indices of each rotary plane i (frequency base^(-2i/dk)):
  (2i, 2i+1) interleaved (the authors' layout), (i, i + dk/2) half rotation."""
  if dk % 2:
    raise ValueError(f"dk must be even, got {dk}")
  i = np.arange(dk // 2)
  return np.stack([2 * i, 2 * i + 1] if interleaved else [i, i + dk // 2], axis=-1)


def rope_frequencies(dk: int, base: float = 10000.0) -> np.ndarray:
  """[dk/2] rotary frequencies theta_i = base^(-2i/dk) (pldr_jax.rotary)."""
  return float(base) ** (-np.arange(0, dk, 2, dtype=np.float64) / dk)


def commutant_projection(g, interleaved: bool = True, base: float = 10000.0,
                         frequencies=None) -> np.ndarray:
  """Orthogonal (Frobenius) projection of [..., dk, dk] onto the commutant of every
  RoPE rotation, i.e. onto {G : R(p) G = G R(p) for all positions p}.

  R(p) is block-diagonal over the rotary planes, plane i rotated by p*theta_i.
  Write G in plane blocks G_ij (2x2, rows of plane i, columns of plane j). The
  condition is R(p theta_i) G_ij = G_ij R(p theta_j) for every p:
    * i = j: G_ii commutes with every 2-D rotation, so G_ii = a I + b J with
      J = [[0, -1], [1, 0]] (a scaled rotation); its projection is
      a = (g00 + g11)/2, b = (g10 - g01)/2 (I and J are orthogonal, |I|^2 = |J|^2 = 2);
    * i != j with theta_i != theta_j: the only G_ij with R(p theta_i) G_ij =
      G_ij R(p theta_j) for all p is 0 (compare the two sides' dependence on p:
      e^{+-i p theta_i} against e^{+-i p theta_j}), so the projection is 0;
    * i != j with theta_i = theta_j (coinciding frequencies, not the case for
      base^(-2i/dk), kept for generality): G_ij = a I + b J as on the diagonal.
  The commutant is the same whichever way a rotation is oriented (R or R^T), so
  it does not depend on whether queries are row or column vectors. A G in it
  folds into the query projection exactly: (q R(p)) G = (q G) R(p).
  interleaved: the plane layout (`rope_planes`, PLDRConfig.rope_interleaved);
  frequencies: [dk/2] theta_i (default `rope_frequencies(dk, base)`).
  """
  g = _square(g)
  dk = g.shape[-1]
  idx = rope_planes(dk, interleaved).reshape(-1)   # plane-major order: p0a p0b p1a p1b ...
  theta = rope_frequencies(dk, base) if frequencies is None else _f64(frequencies)
  if theta.shape != (dk // 2,):
    raise ValueError(f"frequencies must be [dk/2] = [{dk // 2}], got shape {theta.shape}")
  n = dk // 2
  blocks = g[..., idx, :][..., :, idx].reshape(*g.shape[:-2], n, 2, n, 2)
  a = 0.5 * (blocks[..., :, 0, :, 0] + blocks[..., :, 1, :, 1])   # [..., n, n]
  b = 0.5 * (blocks[..., :, 1, :, 0] - blocks[..., :, 0, :, 1])
  same = np.isclose(theta[:, None], theta[None, :], rtol=1e-12, atol=0.0)
  a, b = a * same, b * same
  # [..., n (row plane), 2 (row), n (column plane), 2 (column)]: blocks [[a, -b], [b, a]]
  proj = np.stack([np.stack([a, -b], axis=-1), np.stack([b, a], axis=-1)], axis=-3)
  proj = proj.reshape(g.shape)
  inv = np.argsort(idx)  # back from plane-major to the head axis' own order
  return proj[..., inv, :][..., :, inv]


def off_commutant_residual(g, interleaved: bool = True, base: float = 10000.0,
                           frequencies=None) -> np.ndarray:
  """||G - Pi_comm G||_F / ||G||_F per [..., dk, dk] matrix (`commutant_projection`):
  0 when G folds exactly into the query projection, 1 when it has no component in
  the commutant; NaN for G = 0."""
  g = _square(g)
  r = np.sqrt(np.sum((g - commutant_projection(g, interleaved, base, frequencies)) ** 2,
                     axis=(-2, -1)))
  n = np.sqrt(np.sum(g * g, axis=(-2, -1)))
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(n > 0, r / np.where(n > 0, n, 1.0), np.nan)


def relative_difference(x, y) -> np.ndarray:
  """||x - y||_F / ||y||_F per [..., n, n] matrix (y the reference)."""
  x, y = _square(x), _square(y)
  return _ratio(np.sqrt(np.sum((x - y) ** 2, axis=(-2, -1))),
                np.sqrt(np.sum(y * y, axis=(-2, -1))))


def collapse_statistics(tensors: Mapping[str, Any], tol: float = DEFAULT_RANK_TOL, *,
                        interleaved: bool = True, base: float = 10000.0,
                        suffixed: Mapping[str, Any] | None = None) -> dict:
  """Rank-one collapse statistics of deductive tensors [..., L, H, dk, dk] (a leading
  prompt axis, or none: e.g. the checkpoint's [L, H, dk, dk] item).

  For A and A_LM (when present): sigma2/sigma1 and the numerical rank of every
  (prompt, layer, head) matrix, its row-variance ratio (`row_variance_ratio`),
  and the cross-head spread per (prompt, layer) (`cross_head_spread`). For
  G_LM: the same plus the off-commutant residual w.r.t. the RoPE planes of the
  given layout (`off_commutant_residual`). With `suffixed` (the same prompts
  with a continuation appended): G_LM's relative change ||G_suffixed - G||/||G||
  per matrix (0: G_LM invariant to the suffix).
  Returns {tensor: {statistic: {"median", "min", "max", "per_layer_median"}}}.
  """
  def summary(v, layer_axis):
    v = _f64(v)
    finite = v[np.isfinite(v)]
    if finite.size == 0:
      return {"median": float("nan"), "min": float("nan"), "max": float("nan"),
              "per_layer_median": [float("nan")] * v.shape[layer_axis]}
    per_layer = np.moveaxis(v, layer_axis, 0).reshape(v.shape[layer_axis], -1)
    return {"median": float(np.median(finite)), "min": float(finite.min()),
            "max": float(finite.max()),
            "per_layer_median": [float(np.nanmedian(r)) if np.isfinite(r).any() else float("nan")
                                 for r in per_layer]}

  out = {}
  for name in ("A", "A_LM", "G_LM"):
    if name not in tensors:
      continue
    x = _square(tensors[name])
    if x.ndim < 4:
      raise ValueError(f"{name}: expected [..., layers, heads, n, n], got shape {x.shape}")
    lax = x.ndim - 4  # the layer axis of [..., L, H, n, n]
    m = matrix_metrics(x, tol)
    stats = {"sigma2_over_sigma1": summary(m["sigma2_over_sigma1"], lax),
             "rank": summary(m["rank"], lax),
             "row_variance_ratio": summary(row_variance_ratio(x), lax),
             "cross_head_spread": summary(cross_head_spread(x), lax)}
    if name == "G_LM":
      stats["off_commutant_residual"] = summary(off_commutant_residual(x, interleaved, base), lax)
      if suffixed is not None and "G_LM" in suffixed:
        stats["suffix_relative_change"] = summary(relative_difference(suffixed["G_LM"], x), lax)
    out[name] = stats
  if not out:
    raise ValueError(f"none of A, A_LM, G_LM found; tensors given: {sorted(tensors)}")
  return out

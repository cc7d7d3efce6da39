"""Plain NumPy float64 reference of sparse policies and LESS.

Written from docs/less.md, independently of `less_jax`: one sequence
and one head at a time, Python sets and loops, every array in float64. Nothing
here is fast.

Policies are plain tuples:
    ("h2o", heavy, recent)      ("lambda", sink, recent)      ("window", recent)
The cache holds at most budget = heavy + recent (sink + recent, recent) past
tokens; query t attends to the cache plus itself; afterwards token t joins the
cache and, if that makes it exceed the budget, one token leaves:
    h2o:    among tokens that are not the `recent` newest, the smallest
            accumulated score (ties: the oldest);
    lambda: the oldest token that is not one of the first `sink`;
    window: the oldest token.
Scores: each key accumulates the softmax attention (over the kept set, sparse
part only) it receives from every query, its own included; a leaving key's
score is dropped.

Kernels are a dict of float arrays with the KernelParams names:
    wq1 [Hk, D, R'] wq2 [Hk, R', R] wk1 [Hk, D, R'] wk2 [Hk, R', R]
    wk3 [Hk, R, R]  d1 [Hk, R]      d2 [Hk, R]      (Hk = H or 1)
"""

from __future__ import annotations

import math

import numpy as np

FLOOR = 1e-6


def gelu(x):
  """Exact GELU: x * Phi(x) with the error function."""
  x = np.asarray(x, np.float64)
  erf = np.vectorize(math.erf)
  return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def _head(params, name, h):
  w = np.asarray(params[name], np.float64)
  return w[0] if w.shape[0] == 1 else w[h]


def ref_phi(params, q, h):
  """phi(q) for one query vector q [D] of head h -> [R]."""
  x = gelu(np.asarray(q, np.float64) @ _head(params, "wq1", h))
  return np.abs(gelu(x @ _head(params, "wq2", h)))


def ref_psi(params, k, h):
  """psi(k) for one key vector k [D] of head h -> [R]."""
  x = gelu(np.asarray(k, np.float64) @ _head(params, "wk1", h))
  kt = np.abs(_head(params, "d1", h)) * gelu(x @ _head(params, "wk2", h))
  return np.abs(kt + (kt @ _head(params, "wk3", h)) * _head(params, "d2", h))


def budget_of(policy):
  kind = policy[0]
  if kind == "h2o":
    return policy[1] + policy[2]
  if kind == "lambda":
    return policy[1] + policy[2]
  if kind == "window":
    return policy[1]
  raise ValueError(kind)


def choose_victim(policy, members, scores):
  """The token (position) leaving a set `members` of budget + 1 positions."""
  kind = policy[0]
  ordered = sorted(members)
  if kind == "h2o":
    recent = policy[2]
    newest = set(ordered[-recent:])
    candidates = [j for j in ordered if j not in newest]
    return min(candidates, key=lambda j: (scores[j], j))
  if kind == "lambda":
    sink = policy[1]
    return min(j for j in ordered if j >= sink)
  if kind == "window":
    return ordered[0]
  raise ValueError(kind)


def ref_sequence_head(q, k, v, policy, kernels=None, h=0, scale=None):
  """One sequence, one head.

  Args:
    q, k, v: [L, D] arrays (the real tokens only).
    policy: policy tuple.
    kernels: kernel dict or None.
    h: head index (selects the kernel of that head).
    scale: score scale, default 1/sqrt(D).

  Returns:
    dict with out [L, D], kept (sorted positions in the final cache),
    scores {position: score} of the kept tokens, evicted (positions, in
    eviction order), H [R, D], z [R] (R = 0 without kernels), and
    kept_sets: list of the sets C_t each query attended to.
  """
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  v = np.asarray(v, np.float64)
  length, d = q.shape
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  budget = budget_of(policy)
  rank = 0 if kernels is None else np.asarray(kernels["wq2"]).shape[-1]
  big_h = np.zeros((rank, d))
  z = np.zeros(rank)
  cache = []
  scores = {}
  evicted = []
  kept_sets = []
  out = np.zeros((length, d))
  for t in range(length):
    members = cache + [t]
    kept_sets.append(sorted(members))
    s = np.array([q[t] @ k[j] * scale for j in members])
    m = s.max()
    lse = m + math.log(np.exp(s - m).sum())
    p = np.exp(s - lse)
    sparse = sum(p[i] * v[j] for i, j in enumerate(members))
    if kernels is None:
      out[t] = sparse
    else:
      ph = ref_phi(kernels, q[t], h)
      lr_den = float(ph @ z)
      norm = np.logaddexp(math.log(max(lr_den, FLOOR)), lse)
      w = np.array([math.exp(math.log(x) - norm) if x > 0 else 0.0 for x in ph])
      out[t] = w @ big_h + sparse * math.exp(lse - norm)
    scores[t] = 0.0
    for i, j in enumerate(members):
      scores[j] += p[i]
    if len(members) > budget:
      gone = choose_victim(policy, members, scores)
      members.remove(gone)
      del scores[gone]
      evicted.append(gone)
      if kernels is not None:
        ps = ref_psi(kernels, k[gone], h)
        big_h += np.outer(ps, v[gone])
        z += ps
    cache = members
  return dict(out=out, kept=sorted(cache), scores=scores, evicted=evicted,
              H=big_h, z=z, kept_sets=kept_sets)


def ref_batch(q, k, v, lengths, policy, kernels=None, scale=None):
  """Batched driver. q, k, v [B, S, H, D]; returns out [B, S, H, D] (0 past
  each length) and results[b][h] (the dicts of ref_sequence_head)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  v = np.asarray(v, np.float64)
  b_size, s, n_heads, d = q.shape
  out = np.zeros((b_size, s, n_heads, d))
  results = []
  for b in range(b_size):
    length = int(lengths[b])
    row = []
    for h in range(n_heads):
      r = ref_sequence_head(q[b, :length, h], k[b, :length, h], v[b, :length, h],
                            policy, kernels, h, scale)
      out[b, :length, h] = r["out"]
      row.append(r)
    results.append(row)
  return out, results


def ref_full_attention(q, k, v, lengths, scale=None):
  """Dense causal softmax attention, [B, S, H, D], float64 (0 past lengths)."""
  q = np.asarray(q, np.float64)
  k = np.asarray(k, np.float64)
  v = np.asarray(v, np.float64)
  b_size, s, n_heads, d = q.shape
  scale = 1.0 / math.sqrt(d) if scale is None else scale
  out = np.zeros_like(q)
  for b in range(b_size):
    for h in range(n_heads):
      for t in range(int(lengths[b])):
        sc = np.array([q[b, t, h] @ k[b, j, h] * scale for j in range(t + 1)])
        p = np.exp(sc - sc.max())
        p /= p.sum()
        out[b, t, h] = p @ v[b, :t + 1, h]
  return out

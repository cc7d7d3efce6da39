"""Plain NumPy float64 reference of the PLDR-LLM forward pass.

Written directly from docs/pldr.md, independently of `pldr_jax.model`,
so that the tests can compare the two. Nothing here is fast or clever: one
sequence and one head at a time, explicit loops where a loop is the clearest
statement of the formula, and every array converted to float64 first.

Parameter layout (kernels are [in, out], y = x @ kernel + bias):

    params['embed']                [V, d]
    params['ln_embed']             {'scale': [d], 'bias': [d]}
    params['layers'][l]['wq'|'wk'|'wv'|'wo']  {'kernel': [d, d], 'bias': [d]}
    params['layers'][l]['ln_a']    {'scale': [dk], 'bias': [dk]}    (learned g only)
    params['layers'][l]['res_units'][u]  {'glu1': GLU, 'glu2': GLU, 'ln': LN[dk]}
    params['layers'][l]['plga']    {'W','b','P','a','b_a'}: [H, dk, dk]
    params['layers'][l]['ffn']     GLU d -> d_ff -> d
    params['layers'][l]['ln1'|'ln2']  LN[d]
    params['head']                 {'kernel': [d, V], 'bias': [V]}
    GLU = {'w1', 'w2': dense in -> hidden, 'w3': dense hidden -> in}
"""

from __future__ import annotations

import math

import numpy as np

POWER_LAW_FLOOR = 1e-9   # A_LM = iSwiGLU(W A + b) + 1e-9
MASK_VALUE = -1e9        # additive mask of the scores


# ----------------------------------------------------------------- primitives

def to_f64(tree):
  """Converts a nested dict/list of arrays to NumPy float64 arrays."""
  if isinstance(tree, dict):
    return {k: to_f64(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_f64(v) for v in tree]
  return np.asarray(tree, dtype=np.float64)


def sigmoid(x):
  x = np.asarray(x, dtype=np.float64)
  # 1 / (1 + exp(-x)) written as exp(-log(1 + exp(-x))): no overflow warnings.
  return np.exp(-np.logaddexp(0.0, -x))


def silu(x):
  return x * sigmoid(x)


def iswiglu(x):
  """iSwiGLU(x) = x * silu(x) = x^2 sigmoid(x) (>= 0)."""
  return x * silu(x)


def layer_norm(x, p, eps):
  """LayerNorm over the last axis, biased variance, eps inside the sqrt."""
  mean = x.mean(axis=-1, keepdims=True)
  var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def glu(x, p):
  """GLU(x) = W3(silu(W1 x + b1) * (W2 x + b2)) + b3 on the last axis."""
  return dense(silu(dense(x, p["w1"])) * dense(x, p["w2"]), p["w3"])


def softmax(x):
  m = x.max(axis=-1, keepdims=True)
  e = np.exp(x - m)
  return e / e.sum(axis=-1, keepdims=True)


def rotary(x, positions, base):
  """GPT-J interleaved rotary embedding of x [S, dk] at integer positions [S].

  Pair i is (x[2i], x[2i+1]), rotated by angle pos * base**(-2i/dk).
  """
  x = np.asarray(x, dtype=np.float64)
  dk = x.shape[-1]
  out = np.empty_like(x)
  for i in range(dk // 2):
    theta = np.asarray(positions, dtype=np.float64) * base ** (-2.0 * i / dk)
    c, s = np.cos(theta), np.sin(theta)
    x0, x1 = x[:, 2 * i], x[:, 2 * i + 1]
    out[:, 2 * i] = x0 * c - x1 * s
    out[:, 2 * i + 1] = x1 * c + x0 * s
  return out


# ------------------------------------------------------------ PLGA pieces

def metric_input_raw(q, n):
  """sum_{s < n} q_s q_s^T for q [S, dk]: the un-normalised A (= Q^T Q)."""
  dk = q.shape[-1]
  a = np.zeros((dk, dk))
  for s in range(n):
    a += np.outer(q[s], q[s])
  return a


def metric_learner(a_in, layer, eps):
  """Residual metric learner: A <- LN(A + GLU2(GLU1(A))) per unit."""
  a = a_in
  for unit in layer["res_units"]:
    a = layer_norm(a + glu(glu(a, unit["glu1"]), unit["glu2"]), unit["ln"], eps)
  return a


def power_law(a, plga, h):
  """Power-law step for head h on the metric learner output A [dk, dk]."""
  a_lm = iswiglu(plga["W"][h] @ a + plga["b"][h]) + POWER_LAW_FLOOR
  a_p = a_lm ** plga["P"][h]
  g = plga["a"][h] @ a_p + plga["b_a"][h]
  return a_lm, a_p, g


def learned_g(q_h, n, layer, h, eps):
  """All metric tensors of one head of one sequence (non-causal metric)."""
  a_in = layer_norm(metric_input_raw(q_h, n), layer["ln_a"], eps)
  a = metric_learner(a_in, layer, eps)
  a_lm, a_p, g = power_law(a, layer["plga"], h)
  return dict(A_in=a_in, A=a, A_LM=a_lm, A_P=a_p, G_LM=g)


# ------------------------------------------------------------ the forward

def _index(tree, i):
  """Layer i of a nested dict/list of stacked arrays."""
  if isinstance(tree, dict):
    return {k: _index(v, i) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [_index(v, i) for v in tree]
  return tree[i]


def per_layer(params):
  """params with stacked layers ({'layers': tree of [L, ...]}) -> a list of L layer trees."""
  layers = params["layers"]
  if isinstance(layers, dict):
    first = layers["wq"]["kernel"]
    layers = [_index(layers, i) for i in range(first.shape[0])]
  return {**params, "layers": layers}


def forward(params, tokens, lengths, config, *, g_lm=None, causal_metric=None,
            skip_g=False):
  """Reference forward pass.

  Args:
    params: parameter pytree (any float dtype; converted to float64).
    tokens: [B, S] integer tokens.
    lengths: [B] valid lengths (right padding) or None for all S.
    config: a PLDRConfig (uses its shape fields, g_mode, ln_eps, rope_base and
      causal_metric unless `causal_metric` is given).
    g_lm: optional G_LM to use instead of the computed one, [L, H, dk, dk] or
      [L, B, H, dk, dk], or with a causal metric [L, B, S, H, dk, dk] (one per
      query position). In g_mode 'identity' None means the identity.
    causal_metric: overrides config.causal_metric.
    skip_g: plain scaled dot-product attention: scores = q k^T / sqrt(dk), no
      G_LM matmul at all (an independent path for the G = I check).

  Returns:
    (logits [B, S, V], deductive): deductive is one dict per layer with
    'logits' [B, H, S, S] (pre-mask scores), 'G_LM', and for a computed G_LM
    'A_in', 'A', 'A_LM', 'A_P' ([B, H, dk, dk], or [B, S, H, dk, dk] with a
    causal metric) and 'P', 'a', 'b_a' [H, dk, dk].
  """
  p = to_f64(per_layer(params))
  tokens = np.asarray(tokens)
  bsz, seq = tokens.shape
  if lengths is None:
    lengths = np.full((bsz,), seq)
  lengths = [int(n) for n in np.asarray(lengths)]
  if causal_metric is None:
    causal_metric = config.causal_metric
  nh, dk, d = config.num_heads, config.head_dim, config.d_model
  eps, base = config.ln_eps, config.rope_base
  nl = len(p["layers"])
  if g_lm is not None:
    g_lm = np.asarray(g_lm, dtype=np.float64)
  compute_g = (not skip_g) and g_lm is None and config.g_mode == "learned"
  if (not skip_g and g_lm is None and config.g_mode != "learned"
      and config.g_mode != "identity"):
    raise ValueError(f"g_mode {config.g_mode!r} needs g_lm")

  pos = np.arange(seq)
  logits_out = np.zeros((bsz, seq, config.vocab_size))
  g_shape = (bsz, seq, nh, dk, dk) if causal_metric else (bsz, nh, dk, dk)
  deductive = []
  for _ in range(nl):
    ded = {"logits": np.zeros((bsz, nh, seq, seq))}
    if not skip_g:
      ded["G_LM"] = np.zeros(g_shape)
    if compute_g:
      for k in ("A_in", "A", "A_LM", "A_P"):
        ded[k] = np.zeros(g_shape)
    deductive.append(ded)

  for b in range(bsz):
    n = lengths[b]
    x = layer_norm(p["embed"][tokens[b]] * math.sqrt(d), p["ln_embed"], eps)
    for l, layer in enumerate(p["layers"]):
      ded = deductive[l]
      q = dense(x, layer["wq"]).reshape(seq, nh, dk)
      k = dense(x, layer["wk"]).reshape(seq, nh, dk)
      v = dense(x, layer["wv"]).reshape(seq, nh, dk)
      heads_out = np.zeros((seq, nh, dk))
      for h in range(nh):
        qh = rotary(q[:, h, :], pos, base)
        kh = rotary(k[:, h, :], pos, base)
        vh = v[:, h, :]
        # G for every query position t: g_t[t] is [dk, dk].
        if skip_g:
          g_t = None
        elif compute_g and not causal_metric:
          mats = learned_g(qh, n, layer, h, eps)
          for key, val in mats.items():
            ded[key][b, h] = val
          g_t = [mats["G_LM"]] * seq
        elif compute_g and causal_metric:
          g_t = []
          for t in range(seq):
            mats = learned_g(qh, min(t + 1, n), layer, h, eps)
            for key, val in mats.items():
              ded[key][b, t, h] = val
            g_t.append(mats["G_LM"])
        else:
          if g_lm is None:                      # identity mode
            g_t = [np.eye(dk)] * seq
          elif g_lm.ndim == 4:                  # [L, H, dk, dk]
            g_t = [g_lm[l, h]] * seq
          elif g_lm.ndim == 5:                  # [L, B, H, dk, dk]
            g_t = [g_lm[l, b, h]] * seq
          else:                                 # [L, B, S, H, dk, dk], per query
            if not causal_metric:
              raise ValueError("a per-position g_lm needs causal_metric")
            g_t = [g_lm[l, b, t, h] for t in range(seq)]
          if causal_metric:
            for t in range(seq):
              ded["G_LM"][b, t, h] = g_t[t]
          else:
            ded["G_LM"][b, h] = g_t[0]
        scores = np.zeros((seq, seq))
        for t in range(seq):
          qg = qh[t] if skip_g else qh[t] @ g_t[t]
          scores[t] = (kh @ qg) / math.sqrt(dk)
        ded["logits"][b, h] = scores
        visible = (pos[None, :] <= pos[:, None]) & (pos[None, :] < n)
        e = softmax(scores + np.where(visible, 0.0, MASK_VALUE))
        heads_out[:, h, :] = e @ vh
      attn = dense(heads_out.reshape(seq, d), layer["wo"])
      h1 = layer_norm(x + attn, layer["ln1"], eps)
      x = layer_norm(h1 + glu(h1, layer["ffn"]), layer["ln2"], eps)
    logits_out[b] = dense(x, p["head"])

  if compute_g:
    for l, layer in enumerate(p["layers"]):
      for key in ("P", "a", "b_a"):
        deductive[l][key] = layer["plga"][key].copy()
  return logits_out, deductive

"""The metric input A and the residual metric learner of PLGA.

A = LN_dk(sum_s q_s q_s^T) summarises a sequence's queries (after rotary) as a
[dk, dk] matrix per head; the residual metric learner refines it with
`num_res_units` units of A <- LN(A + GLU2(GLU1(A))) acting on A's last axis,
weights shared by all heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pldr_jax import nn


def query_gram(q: jax.Array, valid: jax.Array, causal: bool) -> jax.Array:
  """Raw sum of outer products q_s q_s^T over valid positions, in >= fp32.

  q: [B, S, H, dk]; valid: bool [B, S] (False for padding).
  Returns [B, H, dk, dk], or with causal=True the running prefix sums
  [B, S, H, dk, dk] (entry t sums positions s <= t).
  """
  qf = jnp.where(valid[:, :, None, None], q, 0).astype(nn.upcast(q.dtype))
  if not causal:
    return jnp.einsum("bshi,bshj->bhij", qf, qf)
  outer = jnp.einsum("bshi,bshj->bshij", qf, qf)
  return jnp.cumsum(outer, axis=1)


def metric_input(ln_p: dict, gram: jax.Array, eps: float) -> jax.Array:
  """A_in = LN_dk(gram): rows normalised over the last axis. [..., dk, dk]."""
  return nn.layer_norm(ln_p, gram, eps)


def metric_learner(units: list, a: jax.Array, eps: float) -> jax.Array:
  """Residual metric learner. units: list of {'glu1','glu2','ln'}; a: [..., dk, dk]."""
  for unit in units:
    a = nn.layer_norm(unit["ln"], a + nn.glu(unit["glu2"], nn.glu(unit["glu1"], a)), eps)
  return a


def deductive_a(layer_p: dict, q: jax.Array, valid: jax.Array, *, causal: bool,
                eps: float, compute_dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """From queries to the metric learner's output.

  Returns (gram, A_in, A): gram is the raw sum (fp32+) that decode can extend;
  A_in = LN(gram) and A = metric_learner(A_in), both [B, H, dk, dk]
  (causal: [B, S, H, dk, dk]) in compute_dtype.
  """
  gram = query_gram(q, valid, causal)
  a_in = metric_input(layer_p["ln_a"], gram, eps).astype(compute_dtype)
  return gram, a_in, metric_learner(layer_p["res_units"], a_in, eps)

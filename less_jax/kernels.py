"""LESS kernel feature maps phi (queries) and psi (keys).

Exactly the spec (docs/less.md), no biases:

    phi(q)  = | GELU( GELU(q W_q1) W_q2 ) |            W_q1 [D, R'], W_q2 [R', R]
    k~      = |d1| * GELU( GELU(k W_k1) W_k2 )          d1, d2 [R], init 1e-4
    psi(k)  = | k~ + (k~ W_k3) * d2 |                   W_k3 [R, R]

Choices (documented for the lead):
  * Per head: every parameter has a leading head axis Hk, applied to the head
    axis of q/k. Hk = H (the default, as the released LESS code: one kernel per
    layer and head) or Hk = 1 (`share_heads=True`: one kernel per layer,
    applied to every head). The state H, z is always per head.
  * GELU is the exact (erf) GELU, as torch.nn.functional.gelu's default used by
    the paper's code.
  * Dropout (rate 0.3 by default) is applied to the pre-activation of the first
    GELU (q W_q1 and k W_k1, independent masks) when `deterministic=False`;
    it needs `dropout_rng`. Inference: `deterministic=True` (the default).
  * Everything is computed in float32 whatever the input dtype.
  * Initialisation: Xavier uniform, as the LESS authors' kernel-training code
    (their inference class uses other ranges; the trained kernels are what it
    loads): W_*1 U(+-sqrt(6/(D+R'))), W_*2 U(+-sqrt(6/(R'+R))),
    W_k3 U(+-sqrt(6/(R+R))); d1 = d2 = 1e-4.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from less_jax.config import DEFAULT_DROPOUT, DEFAULT_HIDDEN, DEFAULT_RANK
from less_jax.errors import KernelError
from pldr_jax.config import check_int

__all__ = [
    "KernelParams",
    "init_kernels",
    "phi",
    "psi",
    "kernel_rank",
    "check_kernels",
]

D_INIT = 1e-4


class KernelParams(NamedTuple):
  """phi/psi parameters of one layer (a pytree; Hk = H, or 1 if shared).

  wq1: [Hk, D, R']   wq2: [Hk, R', R]
  wk1: [Hk, D, R']   wk2: [Hk, R', R]   wk3: [Hk, R, R]
  d1:  [Hk, R]       d2:  [Hk, R]
  """

  wq1: jax.Array
  wq2: jax.Array
  wk1: jax.Array
  wk2: jax.Array
  wk3: jax.Array
  d1: jax.Array
  d2: jax.Array

  @property
  def rank(self) -> int:
    return int(self.wq2.shape[-1])

  @property
  def hidden(self) -> int:
    return int(self.wq1.shape[-1])

  @property
  def head_dim(self) -> int:
    return int(self.wq1.shape[-2])

  @property
  def num_heads(self) -> int:
    return int(self.wq1.shape[0])


def init_kernels(key: jax.Array, head_dim: int, num_heads: int,
                 rank: int = DEFAULT_RANK, hidden: int = DEFAULT_HIDDEN, *,
                 share_heads: bool = False,
                 dtype=jnp.float32) -> KernelParams:
  """Fresh kernel parameters for one layer.

  Args:
    key: PRNG key.
    head_dim: D.
    num_heads: H (ignored for the shapes if share_heads).
    rank: R (default 8).
    hidden: R' (default 512).
    share_heads: one kernel shared by all heads of the layer (Hk = 1).
    dtype: parameter dtype.
  """
  for name, value in (("head_dim", head_dim), ("num_heads", num_heads),
                      ("rank", rank), ("hidden", hidden)):
    check_int(f"init_kernels: {name}", value, 1)
  hk = 1 if share_heads else int(num_heads)
  d, r, rh = int(head_dim), int(rank), int(hidden)
  ks = jax.random.split(key, 5)

  def unif(k, shape, bound):
    return jax.random.uniform(k, shape, dtype, -bound, bound)

  b1 = float(np.sqrt(6.0 / (d + rh)))   # Xavier uniform of [D, R']
  b2 = float(np.sqrt(6.0 / (rh + r)))   # [R', R]
  b3 = float(np.sqrt(6.0 / (r + r)))    # [R, R]
  return KernelParams(
      wq1=unif(ks[0], (hk, d, rh), b1),
      wq2=unif(ks[1], (hk, rh, r), b2),
      wk1=unif(ks[2], (hk, d, rh), b1),
      wk2=unif(ks[3], (hk, rh, r), b2),
      wk3=unif(ks[4], (hk, r, r), b3),
      d1=jnp.full((hk, r), D_INIT, dtype),
      d2=jnp.full((hk, r), D_INIT, dtype),
  )


def kernel_rank(kernels: KernelParams | None) -> int:
  """R of the kernels, 0 for None (no low-rank state)."""
  return 0 if kernels is None else kernels.rank


def check_kernels(kernels: KernelParams | None, num_heads: int,
                  head_dim: int) -> None:
  """Raises ValueError if kernels do not fit heads of shape [H, D]."""
  if kernels is None:
    return
  if not isinstance(kernels, KernelParams):
    raise KernelError(f"kernels must be a KernelParams or None, got {type(kernels)}")
  hk, d, rh = kernels.wq1.shape
  r = kernels.rank
  want = {
      "wq1": (hk, d, rh), "wq2": (hk, rh, r), "wk1": (hk, d, rh),
      "wk2": (hk, rh, r), "wk3": (hk, r, r), "d1": (hk, r), "d2": (hk, r)}
  for name, shape in want.items():
    got = tuple(getattr(kernels, name).shape)
    if got != shape:
      raise KernelError(f"kernels.{name} has shape {got}, expected {shape}")
  if d != head_dim:
    raise KernelError(f"kernels are for head width {d}, the attention has {head_dim}")
  if hk not in (1, num_heads):
    raise KernelError(
        f"kernels have {hk} heads; the attention has {num_heads} (need 1 or {num_heads})")


def _head_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., H, a] @ w [Hk, a, b] per head -> [..., H, b] (Hk broadcast)."""
  return jnp.matmul(x[..., None, :], w.astype(jnp.float32))[..., 0, :]


def _dropout(x, rng, rate):
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _first_layer(x, w, rng, rate, deterministic):
  h = _head_matmul(x.astype(jnp.float32), w)
  if not deterministic and rate > 0.0:
    if rng is None:
      raise KernelError("kernel dropout needs dropout_rng when deterministic=False")
    h = _dropout(h, rng, rate)
  return jax.nn.gelu(h, approximate=False)


def phi(kernels: KernelParams, q: jax.Array, *, dropout_rng=None,
        rate: float = DEFAULT_DROPOUT, deterministic: bool = True) -> jax.Array:
  """Query feature map. q [..., H, D] -> phi(q) [..., H, R] float32, >= 0."""
  h = _first_layer(q, kernels.wq1, dropout_rng, rate, deterministic)
  return jnp.abs(jax.nn.gelu(_head_matmul(h, kernels.wq2), approximate=False))


def psi(kernels: KernelParams, k: jax.Array, *, dropout_rng=None,
        rate: float = DEFAULT_DROPOUT, deterministic: bool = True) -> jax.Array:
  """Key feature map. k [..., H, D] -> psi(k) [..., H, R] float32, >= 0."""
  h = _first_layer(k, kernels.wk1, dropout_rng, rate, deterministic)
  kt = jnp.abs(kernels.d1.astype(jnp.float32)) * jax.nn.gelu(
      _head_matmul(h, kernels.wk2), approximate=False)
  return jnp.abs(kt + _head_matmul(kt, kernels.wk3) * kernels.d2.astype(jnp.float32))

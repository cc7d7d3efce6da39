"""PLDRConfig.attention='flash': PLGA through the Pallas TPU flash-attention kernel.

The kernel itself runs on a TPU only; here its own reference
(`mha_reference_no_custom_vjp`, the same contract: [B, H, S, D], segment ids,
causal, sm_scale) stands in for it, so
what is tested on the CPU is everything pldr-jax wraps around the kernel: the
query q G_LM, the padding to the kernel's block, the segment ids that carry the
lengths, the layout, and the gradients through all of it. tests/test_tpu_aot.py
compiles the real kernel inside the train step for a TPU topology.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pldr_jax import plga

fa = pytest.importorskip("jax.experimental.pallas.ops.tpu.flash_attention")


def _inputs(b=2, s=37, h=3, d=8, dtype=jnp.float32):
  key = jax.random.key(0)
  q, k, v = (jax.random.normal(jax.random.fold_in(key, i), (b, s, h, d), dtype)
             for i in range(3))
  g = (0.3 * jax.random.normal(jax.random.fold_in(key, 9), (b, h, d, d))).astype(dtype)
  return q, k, v, g, jnp.array([s, 20][:b], jnp.int32)


def _plain(q, k, v, g, lengths):
  pos = jnp.broadcast_to(jnp.arange(q.shape[1]), q.shape[:2])
  return plga.plga_attention(q, k, v, g, plga.causal_mask(pos, pos, lengths))[0]


@pytest.mark.slow
def test_flash_equals_plga_on_real_positions_values_and_gradients():
  q, k, v, g, lengths = _inputs()
  valid = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[..., None, None]
  flash = lambda *a: plga.flash_attention(*a, lengths, kernel=fa.mha_reference_no_custom_vjp)
  plain = lambda *a: _plain(*a, lengths)
  np.testing.assert_allclose(np.where(valid, flash(q, k, v, g), 0),
                             np.where(valid, plain(q, k, v, g), 0), atol=2e-6)
  # Gradients of a loss over the real positions (what training differentiates).
  loss = lambda f: lambda *a: jnp.sum(jnp.where(valid, f(*a), 0.0) ** 2)
  gf = jax.grad(loss(flash), argnums=(0, 1, 2, 3))(q, k, v, g)
  gp = jax.grad(loss(plain), argnums=(0, 1, 2, 3))(q, k, v, g)
  for a, b in zip(gf, gp):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_flash_pads_to_the_kernel_block_and_keeps_bf16():
  q, k, v, g, lengths = _inputs(s=130, dtype=jnp.bfloat16)
  seen = {}

  def kernel(qb, kb, vb, ab, seg, *, causal, sm_scale):
    seen.update(shape=qb.shape, dtype=qb.dtype, seg=np.asarray(seg.q), causal=causal,
                scale=sm_scale)
    return fa.mha_reference_no_custom_vjp(qb, kb, vb, ab, seg, causal=causal,
                                            sm_scale=sm_scale)

  out = plga.flash_attention(q, k, v, g, lengths, kernel=kernel)
  assert out.shape == q.shape and out.dtype == jnp.bfloat16
  assert seen["shape"] == (2, 3, 256, 8) and seen["dtype"] == jnp.bfloat16
  assert seen["causal"] and seen["scale"] == pytest.approx(1 / np.sqrt(8))
  np.testing.assert_array_equal(seen["seg"].sum(axis=1), [130, 20])  # 1 = real, 0 = padding

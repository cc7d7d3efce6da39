"""The one decoder core and its typed caches.

`pldr_jax.model.decoder` runs the stacked layers with `lax.scan`, unrolled over
static slices, or over per-layer trees (decode); all three must give the same
numbers. The caches (KVCache, GCache, less_jax SparseState) are registered
pytree dataclasses whose `abstract()` declares exactly the shapes and dtypes
prefill produces, in every G mode.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import less_jax
from helpers import perturbed_params, random_tokens
from less_jax import model as less_model
from pldr_jax import config as cfg
from pldr_jax.inference import decode, generate as gen
from pldr_jax import g_modes, model
from pldr_jax import params as params_lib
from pldr_jax.sharding import ArrayInfo
from pldr_jax.inference.kv_cache import GCache, KVCache
from pldr_jax.sharding import zeros as zeros_like_abstract
from pldr_jax.params import init_params

F64 = dict(param_dtype="float64", compute_dtype="float64")
MODES = [dict(), dict(causal_metric=True), dict(g_mode="identity"), dict(g_mode="random")]
IDS = ["learned", "causal", "identity", "random"]


pytestmark = pytest.mark.x64  # float64 throughout: the paths agree to 1e-12


def _setup(kw):
  c = cfg.tiny(**F64, **kw)
  p = perturbed_params(c)
  g = g_modes.make_fixed_g(c, jax.random.key(3)) if c.g_mode == "random" else None
  return c, p, g


@pytest.mark.slow
@pytest.mark.parametrize("kw", MODES, ids=IDS)
def test_scan_unrolled_and_per_layer_params_agree(kw):
  c, p, g = _setup(kw)
  t = random_tokens(c, (2, 11))
  lens = jnp.array([11, 6], jnp.int32)
  scanned, ded = model.forward(p, t, lens, config=c, g_lm=g, return_deductive=True)
  unrolled, ded_u = model.forward(p, t, lens, config=c, g_lm=g, return_deductive=True,
                                  unroll=True)
  listed, _ = model.forward(params_lib.unstack_layers(p), t, lens, config=c, g_lm=g)
  chex.assert_shape(scanned, (2, 11, c.vocab_size))
  chex.assert_trees_all_close(scanned, unrolled, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(scanned, listed, rtol=1e-12, atol=1e-12)
  chex.assert_trees_all_close(ded, ded_u, rtol=1e-10, atol=1e-9)  # G entries reach ~1e2
  assert len(ded) == c.num_layers


def test_stack_and_unstack_are_inverse():
  c = cfg.tiny()
  p = init_params(c, jax.random.key(0))
  listed = params_lib.unstack_layers(p)
  assert isinstance(listed["layers"], list) and len(listed["layers"]) == c.num_layers
  chex.assert_trees_all_equal(params_lib.stack_layers(listed), p)
  specs = params_lib.param_specs(c)
  chex.assert_trees_all_equal_shapes(
      jax.tree.map(lambda s: jnp.zeros(s.shape), specs,
                   is_leaf=lambda x: isinstance(x, ArrayInfo)), p)
  assert all(s.axes[0] == "layers" for s in jax.tree.leaves(
      specs["layers"], is_leaf=lambda x: isinstance(x, ArrayInfo)))


@pytest.mark.slow
@pytest.mark.parametrize("g_cache", [True, False])
@pytest.mark.parametrize("kw", MODES, ids=IDS)
def test_cache_abstract_is_what_prefill_builds(kw, g_cache):
  c, p, g = _setup(kw)
  t = random_tokens(c, (3, 7))
  lens = jnp.array([7, 3, 5], jnp.int32)
  _, kv, gc = decode.prefill(p, t, lens, config=c, cache_len=12, g_cache=g_cache, g_lm=g)
  assert isinstance(kv, KVCache) and isinstance(gc, GCache)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      kv, zeros_like_abstract(KVCache.abstract(c, 3, 12, g_cache)))
  chex.assert_trees_all_equal_shapes_and_dtypes(
      gc, zeros_like_abstract(GCache.abstract(c, 3, g_cache)))
  # Decode keeps the cache's type and layout (what `donate` and sharding rely on).
  tok = jnp.array([5, 6, 7], jnp.int32)
  _, kv2 = decode.decode_step(p, gc, kv, tok, config=c, g_cache=g_cache)
  chex.assert_trees_all_equal_shapes_and_dtypes(kv2, kv)
  chex.assert_trees_all_equal(kv2.lengths, lens + 1)


@pytest.mark.slow
@pytest.mark.parametrize("kw", MODES, ids=IDS)
def test_decode_on_stacked_and_per_layer_params_agree(kw):
  c, p, g = _setup(kw)
  t = random_tokens(c, (2, 9))
  lens = jnp.array([5, 3], jnp.int32)
  _, kv, gc = decode.prefill(p, t[:, :5], lens, config=c, cache_len=12, g_lm=g)
  step_p = decode.decode_params(p, c)
  assert decode.decode_params(step_p, c) is not step_p  # idempotent in value:
  chex.assert_trees_all_equal(decode.decode_params(step_p, c), step_p)
  if c.learned_g:
    assert "plga" not in step_p["layers"][0]  # the G network is not read with the G-cache
  a, kv_a = decode.decode_step(p, gc, kv, t[:, 5], config=c)
  b, kv_b = decode.decode_step(step_p, gc, kv, t[:, 5], config=c)
  chex.assert_trees_all_close(a, b, rtol=1e-13, atol=1e-13)
  chex.assert_trees_all_close(kv_a, kv_b, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
@pytest.mark.parametrize("kw", MODES, ids=IDS)
def test_batch_1_decode_weights_output_major(kw):
  """decode_params(batch=1) stores the layers' kernels output-major on CPU (nn.output_major,
  faster there at batch 1): the same step to 1e-13, and back to input-major for batch 2."""
  c, p, g = _setup(kw)
  t = random_tokens(c, (1, 6))
  _, kv, gc = decode.prefill(p, t[:, :5], jnp.array([5], jnp.int32), config=c, cache_len=8,
                             g_lm=g)
  plain = decode.decode_params(p, c)
  major = decode.decode_params(p, c, batch=1)
  assert jax.default_backend() == "cpu"
  layer = major["layers"][0]
  assert set(layer["wqkv"]) == {"kernel_t", "bias"} and "kernel_t" in layer["ffn"]["w3"]
  np.testing.assert_array_equal(layer["wo"]["kernel_t"], plain["layers"][0]["wo"]["kernel"].T)
  assert "kernel" in major["head"]  # the LM head stays input-major
  chex.assert_trees_all_equal(decode.decode_params(major, c, batch=1), major)
  chex.assert_trees_all_equal(decode.decode_params(major, c, batch=2), plain)
  a, kv_a = decode.decode_step(plain, gc, kv, t[:, 5], config=c)
  b, kv_b = decode.decode_step(major, gc, kv, t[:, 5], config=c)
  chex.assert_trees_all_close(a, b, rtol=1e-13, atol=1e-13)
  chex.assert_trees_all_close(kv_a, kv_b, rtol=1e-13, atol=1e-13)


@pytest.mark.slow
def test_sparse_state_abstract_is_what_less_prefill_builds():
  c, p, _ = _setup({})
  t = random_tokens(c, (2, 10))
  lens = jnp.array([10, 4], jnp.int32)
  kern = [less_jax.init_kernels(jax.random.key(1), c.head_dim, c.num_heads, rank=3, hidden=8),
          None]  # per-layer kernels: LESS on layer 0 only
  policy = less_jax.h2o(3, 3)
  _, st, gc = less_model.less_prefill_jit(p, t, lens, kern, config=c, policy=policy)
  assert isinstance(st, less_jax.SparseState) and isinstance(gc, GCache)
  want, _ = less_jax.SparseCache(policy, kern).abstract(config=c, batch=2, cache_len=None)
  chex.assert_trees_all_equal_shapes_and_dtypes(st, zeros_like_abstract(want))
  assert [layer.rank for layer in st.layers] == [3, 0]
  want_shapes = jax.tree.map(lambda a: (a.shape, a.dtype), st)
  _, st2 = less_model.less_decode_step_jit(decode.decode_params(p, c), gc, st,
                                           jnp.array([4, 5], jnp.int32), kern, config=c,
                                           policy=policy)
  assert jax.tree.map(lambda a: (a.shape, a.dtype), st2) == want_shapes


@pytest.mark.slow
def test_decode_step_checks_its_inputs():
  c, p, _ = _setup({})
  t = random_tokens(c, (2, 6))
  _, kv, gc = decode.prefill(p, t, jnp.array([6, 6], jnp.int32), config=c, cache_len=8)
  with pytest.raises(AssertionError, match="shape"):
    decode.decode_step(p, gc, kv, jnp.array([1, 2, 3], jnp.int32), config=c)

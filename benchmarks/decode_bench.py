"""Decode benchmarks: prefill time and per-token latency / throughput per mode.

Modes (each on the same weights; `sdpa` is the same-size model with G = I):

  recompute  no cache: every new token runs the full forward over the prefix
             (per-token latency = one forward over `length` tokens);
  kv         KV-cache, G_LM recomputed from the cached A each step (power-law
             step per layer per token; pldr_jax.inference.decode g_cache=False);
  kv+g       KV-cache + G-cache (G_LM read from the cache);
  sdpa       the same-size SDPA model (g_mode identity), KV-cache;
  h2o        H2O sparse cache (heavy = recent = budget / 2), no kernels;
  lambda     Λ-masking (sink 4 + recent), no kernels;
  less       H2O + LESS kernels (rank R, hidden R'; random weights: the cost
             does not depend on their values).

The decode position is `length`: the full-cache modes hold a cache of
`length` slots (their step reads all of it), the sparse modes hold `budget`
slots whatever the position. The decode state is built by prefilling a short
prompt and then moving the position to `length - steps - 5` (3 warm-up steps,
then the timed ones, end just below `length`): step costs are
fixed by shapes, not by cache contents, so this times decoding at `length`
tokens without paying a full prefill of `length` tokens for every mode.
Prefill itself is timed separately (`prefill_time`).

Bytes per token (the memory-bandwidth floor): the parameters the step reads
(all but the embedding table, of which it reads B rows; with a G-cache or G = I
the metric learner and power-law tensors are not read) + the decode state
(every slot of every layer) + the G-cache tensors it reads (G_LM).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from less_jax import kernels as kernels_lib
from less_jax import model as less_model
from less_jax import policies as policies_lib
from pldr_jax.inference.kv_cache import GCache, KVCache
from pldr_jax.sharding import zeros as zeros_like_abstract
from pldr_jax import config as cfg
from pldr_jax.inference import decode
from pldr_jax import model
from pldr_jax.params import init_params, tree_bytes

MODES = ("recompute", "kv", "kv+g", "sdpa", "h2o", "lambda", "less")
FULL_MODES = ("kv", "kv+g", "sdpa")
SPARSE_MODES = ("h2o", "lambda", "less")


@dataclasses.dataclass(frozen=True)
class DecodeCase:
  preset: str
  mode: str
  batch: int
  length: int
  weights: str = "float32"  # float32 | bfloat16 (params and compute)
  budget: int = 256
  rank: int = 8
  hidden: int = 64
  steps: int = 10


CONTEXT = 8192  # every benchmark config gets at least this context (one config per preset)


def make_config(preset: str, length: int, weights: str = "float32", identity: bool = False):
  """The preset with a context of max(its own, CONTEXT, length) tokens.

  One context for all lengths keeps the (static) config the same across a
  sweep, so the sparse modes, whose state does not grow, compile once."""
  c = cfg.preset(preset)
  c = c.replace(max_len=max(c.max_len, length, CONTEXT), compute_dtype=weights)
  if identity:
    c = c.replace(g_mode="identity")
  return c


@functools.lru_cache(maxsize=4)
def _params(preset: str, weights: str, g_mode: str):
  """Parameters of a preset (their shapes do not depend on max_len)."""
  c = cfg.preset(preset).replace(compute_dtype=weights, g_mode=g_mode)
  p = jax.jit(init_params, static_argnums=0)(c, jax.random.key(0))
  if weights != "float32":
    p = jax.tree.map(lambda x: x.astype(weights), p)
  return p


def _kernels(c, rank: int, hidden: int):
  keys = jax.random.split(jax.random.key(1), c.num_layers)
  return [kernels_lib.init_kernels(k, c.head_dim, c.num_heads, rank, hidden) for k in keys]


def read_param_bytes(params: dict, c, mode: str, batch: int) -> int:
  """Bytes of the parameters a decode step reads (see the module docstring):
  pldr_jax.inference.decode.decode_params (the G network only without a G-cache), with
  B rows of the embedding table instead of all of it."""
  read = decode.decode_params(params, c, g_cache=mode not in ("kv", "recompute"))
  emb = read["embed"]
  return int(tree_bytes(read) - emb.size * emb.dtype.itemsize
             + batch * emb.shape[1] * emb.dtype.itemsize)


def _gcache_read_bytes(gcache, mode: str) -> int:
  """Bytes of the G-cache a step reads: A (kv: the rest is recomputed) or G_LM."""
  return tree_bytes(gcache.a if mode == "kv" else gcache.g_lm)


def _policy(case: DecodeCase):
  if case.mode in ("h2o", "less"):
    return policies_lib.h2o(case.budget // 2, case.budget - case.budget // 2)
  if case.mode == "lambda":
    return policies_lib.lambda_mask(4, case.budget - 4)
  return None


def full_cache_at(params: dict, prompt: jax.Array, c, length: int, position: jax.Array,
                  g_cache: bool = True) -> tuple[KVCache, GCache]:
  """(KVCache of `length` zero slots at `position` [B], GCache) from prefilling `prompt`
  [B, P]: a step's cost is fixed by shapes, so this stands for a cache filled to there."""
  b, p = prompt.shape
  _, small, gcache = decode.prefill_jit(params, prompt, jnp.full((b,), p, jnp.int32), config=c,
                                        cache_len=p, g_cache=g_cache)
  full = KVCache.abstract(c, b, length, g_cache)
  return small.replace(k=zeros_like_abstract(full.k), v=zeros_like_abstract(full.v),
                       lengths=jnp.array(position, jnp.int32)), gcache  # a copy: donated


_COMPILED: dict = {}  # (compiled decode step, compile seconds) per (config, mode, shapes)


def run_case(case: DecodeCase, _build_only: bool = False) -> dict:
  """Times one decode case; returns a result row. With _build_only (for
  `paired`): returns (row without timings, step function, state) untimed."""
  c = make_config(case.preset, case.length, case.weights, identity=case.mode == "sdpa")
  params = _params(case.preset, c.compute_dtype, c.g_mode)
  rng = np.random.default_rng(0)
  b = case.batch
  row = dataclasses.asdict(case)
  row.update(d_model=c.d_model, num_layers=c.num_layers, num_heads=c.num_heads,
             head_dim=c.head_dim, vocab_size=c.vocab_size, g_mode=c.g_mode)
  tok = jnp.asarray(rng.integers(4, c.vocab_size, (b,)), jnp.int32)

  if case.mode == "recompute":
    toks = jnp.asarray(rng.integers(4, c.vocab_size, (b, case.length)), jnp.int32)
    lens = jnp.full((b,), case.length, jnp.int32)
    fwd = jax.jit(lambda p, t, l: model.forward(p, t, l, config=c)[0][:, -1])
    t0 = time.perf_counter()
    common.block(fwd(params, toks, lens))
    row["compile_s"] = time.perf_counter() - t0
    times = common.time_calls(lambda: fwd(params, toks, lens), max(2, case.steps // 4), 0)
    row.update(_latency(times, b))
    row["state_bytes"] = 0
    row["gcache_bytes"] = 0
    row["bytes_per_token"] = read_param_bytes(params, c, case.mode, b)  # a lower bound
    return row

  # A 16-token prefill gives the G-cache (its shapes do not depend on the length) and,
  # for the sparse modes, the whole state; the full cache is allocated at `length` slots.
  prompt = 16
  toks = jnp.asarray(rng.integers(4, c.vocab_size, (b, prompt)), jnp.int32)
  lens = jnp.full((b,), prompt, jnp.int32)
  start = jnp.full((b,), case.length - case.steps - 5, jnp.int32)
  if case.mode in FULL_MODES:
    g_cache = case.mode != "kv"
    state, gcache = full_cache_at(params, toks, c, case.length, start, g_cache)
    step_params = decode.decode_params(params, c, g_cache, batch=b)  # as generate lays them out
    lowered = decode.decode_step_jit.lower(step_params, gcache, state, tok, config=c,
                                           g_cache=g_cache)
  else:
    policy = _policy(case)
    kernels = _kernels(c, case.rank, case.hidden) if case.mode == "less" else None
    _, state, gcache = less_model.less_prefill_jit(params, toks, lens, kernels, None, config=c,
                                                   policy=policy)
    state = state.replace(lengths=start)
    step_params = decode.decode_params(params, c, batch=b)
    lowered = less_model.less_decode_step_jit.lower(step_params, gcache, state, tok, kernels,
                                                    None, config=c, policy=policy)
  key = (c, case.mode, b, case.budget, case.rank, case.hidden,
         str(jax.tree.map(lambda x: (x.shape, x.dtype), state)))
  if key not in _COMPILED:
    t0 = time.perf_counter()
    _COMPILED[key] = (lowered.compile(), time.perf_counter() - t0)
  compiled, row["compile_s"] = _COMPILED[key]
  extra = (kernels, None) if case.mode not in FULL_MODES else ()  # kernels, active
  step = lambda state: compiled(step_params, gcache, state, tok, *extra)
  row["state_bytes"] = tree_bytes(state)
  row["gcache_bytes"] = tree_bytes(gcache)
  row["bytes_per_token"] = (read_param_bytes(params, c, case.mode, b) + row["state_bytes"]
                            + _gcache_read_bytes(gcache, case.mode))
  if _build_only:
    return row, step, state
  steps = case.steps
  if case.weights != "float32" and jax.devices()[0].platform == "cpu":
    steps = min(steps, 4)  # XLA:CPU bf16 dots are ~10x slower than fp32: keep it short
  for _ in range(3):  # warm-up: first touches of the buffers
    logits, state = step(state)
  common.block(logits)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    logits, state = step(state)
    common.block(logits)
    times.append(time.perf_counter() - t0)
  row.update(_latency(times, b))
  return row


def paired(cases: list[DecodeCase], rounds: int = 30) -> list[dict]:
  """Times several decode cases step by step in alternation (a, b, c, a, b, c, ...),
  so that drift of a shared machine hits all of them alike; for A-vs-B ratios
  such as the G-cache overhead over SDPA. Returns one row per case."""
  built = [run_case(c, _build_only=True) for c in cases]
  rows = [r for r, _, _ in built]
  steps = [s for _, s, _ in built]
  states = [st for _, _, st in built]
  times = [[] for _ in cases]
  for r in range(rounds + 3):
    for i, step in enumerate(steps):
      t0 = time.perf_counter()
      logits, states[i] = step(states[i])
      common.block(logits)
      if r >= 3:
        times[i].append(time.perf_counter() - t0)
  for row, t, c in zip(rows, times, cases):
    row.update(_latency(t, c.batch))
    row["paired_with"] = [x.mode for x in cases]
  return rows


def _latency(times, batch) -> dict:
  med = float(np.median(times))
  return {"latency_ms": 1e3 * med, "latency_min_ms": 1e3 * float(np.min(times)),
          "tokens_per_s": batch / med, "timed_calls": len(times)}


def prefill_time(preset: str, mode: str, batch: int, length: int, weights: str = "float32",
                 budget: int = 256, repeats: int = 2) -> dict:
  """Seconds of a jitted prefill of `length` tokens (KV+G, SDPA or a sparse policy), as
  generate runs it: the LM head at the last token only (all_logits=False)."""
  case = DecodeCase(preset, mode, batch, length, weights, budget)
  c = make_config(preset, length, weights, identity=mode == "sdpa")
  params = _params(preset, c.compute_dtype, c.g_mode)
  toks = jnp.asarray(np.random.default_rng(0).integers(4, c.vocab_size, (batch, length)),
                     jnp.int32)
  lens = jnp.full((batch,), length, jnp.int32)
  if mode in SPARSE_MODES:
    policy = _policy(case)
    kernels = _kernels(c, case.rank, case.hidden) if mode == "less" else None
    fn = lambda: less_model.less_prefill_jit(params, toks, lens, kernels, None, config=c,
                                             policy=policy, all_logits=False)[0]
  else:
    fn = lambda: decode.prefill_jit(params, toks, lens, config=c, cache_len=length,
                                    g_cache=mode != "kv", all_logits=False)[0]
  t0 = time.perf_counter()
  common.block(fn())
  first = time.perf_counter() - t0
  t = min(common.time_calls(fn, repeats, 0))
  return {"preset": preset, "mode": mode, "batch": batch, "length": length, "weights": weights,
          "prefill_s": t, "prefill_tokens_per_s": batch * length / t, "first_call_s": first}


def state_memory(preset: str, mode: str, batch: int, length: int, weights: str = "float32",
                 budget: int = 256, rank: int = 8, hidden: int = 64) -> dict:
  """Bytes of the decode state and G-cache at `length` tokens (shapes only, no compute)."""
  case = DecodeCase(preset, mode, batch, length, weights, budget, rank, hidden)
  c = make_config(preset, length, weights, identity=mode == "sdpa")
  params = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))
  toks = jax.ShapeDtypeStruct((batch, 16), jnp.int32)
  lens = jax.ShapeDtypeStruct((batch,), jnp.int32)
  if mode in SPARSE_MODES:
    policy = _policy(case)
    kernels = None
    if mode == "less":
      kernels = [jax.eval_shape(lambda k: kernels_lib.init_kernels(
          k, c.head_dim, c.num_heads, rank, hidden), jax.random.key(0))] * c.num_layers
    _, state, gcache = jax.eval_shape(
        lambda p, t, l, k: less_model.less_prefill(p, t, l, config=c, policy=policy, kernels=k),
        params, toks, lens, kernels)
  else:
    _, state, gcache = jax.eval_shape(
        lambda p, t, l: decode.prefill(p, t, l, config=c, cache_len=length,
                                       g_cache=mode != "kv"), params, toks, lens)
  sb, gb = tree_bytes(state), tree_bytes(gcache)
  return {"preset": preset, "mode": mode, "batch": batch, "length": length,
          "weights": weights, "budget": budget if mode in SPARSE_MODES else None,
          "state_bytes": sb, "gcache_bytes": gb, "total_bytes": sb + gb,
          "param_bytes": tree_bytes(params)}

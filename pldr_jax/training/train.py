"""Loss, optimizer and the sharded, jitted train step.

The published recipe: AdamW (0.9, 0.95), eps 1e-5, weight decay 0.1, linear
warmup then cosine to 0.1x, gradients clipped by value at 1.0, an optional DAG
loss term on A_LM, A_P and G_LM. One `jax.jit` step over a
`jax.sharding.Mesh` with ('data', 'fsdp') axes: the batch is split over both,
weights are sharded over 'fsdp' along their embed dimension (ZeRO-3 style) and
gathered by XLA where needed. Data parallelism is fsdp=1; pure FSDP is data=1.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pldr_jax import model, params as params_lib
from pldr_jax import sharding as sharding_lib
from pldr_jax.config import PLDRConfig, TrainConfig
from pldr_jax.errors import ConfigError

P = jax.sharding.PartitionSpec


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
  """Linear warmup to learning_rate, then cosine to learning_rate * end_lr_ratio."""
  decay_steps = max(tc.num_steps - tc.warmup_steps, 1)
  cosine = optax.cosine_decay_schedule(tc.learning_rate, decay_steps, alpha=tc.end_lr_ratio)
  if tc.warmup_steps == 0:
    return cosine
  warmup = optax.linear_schedule(0.0, tc.learning_rate, tc.warmup_steps)
  return optax.join_schedules([warmup, cosine], [tc.warmup_steps])


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
  decay_mask = None if tc.decay_all_params else (
      lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree))
  adamw = optax.adamw(lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
                      weight_decay=tc.weight_decay, mask=decay_mask)
  if tc.clip_value > 0:
    return optax.chain(optax.clip(tc.clip_value), adamw)
  return adamw


_MAX_SQUARINGS = 48


def _log_trace_expm(m: jax.Array) -> jax.Array:
  """log tr(expm(M)) for a non-negative [dk, dk] M without overflow.

  Scaling and squaring in log space: E = expm(M / 2^s) with |M / 2^s| <= 1/2,
  then s squarings, each renormalised by its largest entry whose log is
  accumulated, so entries of size exp(1e6) never materialise.
  """
  norm = jax.lax.stop_gradient(jnp.max(jnp.sum(jnp.abs(m), axis=-1)))
  s = jnp.clip(jnp.ceil(jnp.log2(jnp.maximum(norm, 1.0))) + 1, 0, _MAX_SQUARINGS)
  e = jax.scipy.linalg.expm(m / 2.0 ** s)

  def body(i, carry):
    e, log_scale = carry
    sq = e @ e
    top = jnp.max(sq)
    use = i < s
    return (jnp.where(use, sq / top, e), jnp.where(use, 2.0 * log_scale + jnp.log(top), log_scale))

  e, log_scale = jax.lax.fori_loop(0, _MAX_SQUARINGS, body, (e, jnp.zeros((), m.dtype)))
  return log_scale + jnp.log(jnp.trace(e))


def dag_term(x: jax.Array) -> jax.Array:
  """mean |log(tr(expm(X o X)) / dk)| over the leading axes. x: [..., dk, dk] -> scalar."""
  x = x.astype(jnp.float32)
  dk = x.shape[-1]
  flat = (x * x).reshape(-1, dk, dk)
  return jnp.mean(jnp.abs(jax.vmap(_log_trace_expm)(flat) - jnp.log(dk)))


def model_inputs(tokens: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """What the model reads of a batch, as the authors' code: tokens[:, :-1].

  tokens, mask: [B, S] right-padded (mask 0 at [PAD]). A sequence of n real
  tokens runs n - 1 of them, so A (the sum over queries) never holds the query
  of the last target. Returns (inputs [B, S-1], lengths int32 [B]).
  """
  inputs = tokens[:, :-1]
  lengths = jnp.clip(jnp.sum(mask, axis=-1) - 1, 1, inputs.shape[1]).astype(jnp.int32)
  return inputs, lengths


def log_probs(logits: jax.Array) -> jax.Array:
  """Log-softmax over the vocabulary in >= fp32 (bf16 logits are upcast): [..., V]."""
  return jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)),
                            axis=-1)


def token_logprobs(logp: jax.Array, targets: jax.Array) -> jax.Array:
  """The entry of each target: logp [..., V], targets int [...] -> [...] (log p of each
  target when logp comes from `log_probs`)."""
  return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def cross_entropy(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token cross-entropy and top-1 hit: logits [..., V] (computed in >= fp32: bf16
  logits are upcast), targets int [...].

  Returns (ce [...], hit bool [...]); hit: the target's logit is the largest
  (a target tied for the largest counts). One max over the vocabulary serves
  both the stable log-sum-exp and the hit, where an argmax would be a second,
  slow pass over [..., V] (~70 ms of the 110M train step on 2 CPU cores).
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  peak = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
  lse = jnp.log(jnp.sum(jnp.exp(logits - peak[..., None]), axis=-1)) + peak
  target = token_logprobs(logits, targets)  # the target's logit
  return lse - target, target >= peak


def chunked_cross_entropy(params: dict, x: jax.Array, targets: jax.Array,
                          chunk: int) -> tuple[jax.Array, jax.Array]:
  """`cross_entropy` of the LM head's logits, `chunk` positions at a time.

  x: [B, T, d] the last layer's output (`model.forward(..., head=False)`);
  targets: int [B, T]. Returns (ce [B, T] >= fp32, hit bool [B, T]), equal to
  `cross_entropy(lm_head(params, x), targets)`. The head and the log-sum-exp run
  per chunk under `jax.checkpoint`, so only one chunk's [B, chunk, V] logits live
  at a time, in the forward and the backward pass (which recomputes them): the
  whole [B, T, V] logits and their gradient are never stored. T is padded up to a
  multiple of `chunk` (the padding's outputs are dropped).
  """
  b, t, d = x.shape
  n = -(-t // chunk)
  pad = n * chunk - t
  xs = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, n, chunk, d).swapaxes(0, 1)
  ts = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, n, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(xc, tc):  # [B, chunk, d], [B, chunk] -> [B, chunk] each
    return cross_entropy(model.lm_head(params, xc), tc)

  ce, hit = jax.lax.map(lambda a: one(*a), (xs, ts))  # [n, B, chunk]
  unchunk = lambda y: y.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(ce), unchunk(hit)


def target_weights(mask: jax.Array, first_target=0, dtype=jnp.float32) -> jax.Array:
  """Which next-token targets count: 1/0 weights [B, S-1] of the targets tokens[:, 1:].

  mask: [B, S] (0 at [PAD]); first_target: a scalar or [B]. [PAD] targets and
  those at index < first_target (the prompt, when scoring a continuation) get 0.
  """
  after = jnp.arange(1, mask.shape[1])[None, :] >= jnp.reshape(first_target, (-1, 1))
  return mask[:, 1:].astype(dtype) * after


def target_nll(logits: jax.Array, tokens: jax.Array, mask: jax.Array,
               first_target=0) -> tuple[jax.Array, jax.Array]:
  """(sum of next-token NLL, number of counted targets), in >= fp32.

  logits: [B, S-1, V] of `model_inputs`; tokens, mask: [B, S]. Targets are
  tokens[:, 1:]; [PAD] targets and those at index < first_target (the prompt,
  when scoring a continuation) do not count (`target_weights`).
  """
  logp = log_probs(logits)
  tgt = token_logprobs(logp, tokens[:, 1:])
  w = target_weights(mask, first_target, logp.dtype)
  return -jnp.sum(tgt * w), jnp.sum(w)


def loss_fn(params, batch: dict, *, config: PLDRConfig, g_lm=None, dag_coeff: float = 0.0):
  """Next-token cross-entropy (fp32) ignoring [PAD], plus the optional DAG term.

  batch: {'tokens': int32 [B, S], 'mask': int32 [B, S]} (mask 0 at [PAD],
  right-padded). The model reads tokens[:, :-1] (`model_inputs`) and predicts
  tokens[:, 1:]. Returns (loss, metrics) with metrics: loss, ce, accuracy,
  tokens (counted).
  """
  tokens, mask = batch["tokens"], batch["mask"]
  inputs, lengths = model_inputs(tokens, mask)
  chunk = config.loss_chunk
  out, ded = model.forward(params, inputs, lengths, config=config, g_lm=g_lm,
                           return_deductive=dag_coeff > 0, head=not chunk)
  targets = tokens[:, 1:]
  if chunk:
    ce, hit = chunked_cross_entropy(params, out, targets, chunk)
  else:
    ce, hit = cross_entropy(out, targets)
  weights = mask[:, 1:].astype(ce.dtype)
  n = jnp.maximum(jnp.sum(weights), 1.0)
  ce_mean = jnp.sum(ce * weights) / n
  correct = hit.astype(weights.dtype)
  metrics = {"ce": ce_mean, "accuracy": jnp.sum(correct * weights) / n, "tokens": jnp.sum(weights)}
  loss = ce_mean
  if dag_coeff > 0:
    dag = sum(dag_term(layer[key]) for layer in ded for key in ("A_LM", "A_P", "G_LM")
              if key in layer)
    metrics["dag"] = dag
    loss = loss + dag_coeff * dag
  metrics["loss"] = loss
  return loss, metrics


# ----------------------------------------------------------------------------- sharding


def make_mesh(tc: TrainConfig, devices=None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh; -1 in either size takes the remaining devices."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  data, fsdp = tc.mesh_data, tc.mesh_fsdp
  if data == -1 and fsdp == -1:
    raise ConfigError("at most one of TrainConfig.mesh_data / mesh_fsdp may be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ConfigError(f"mesh data={tc.mesh_data} x fsdp={tc.mesh_fsdp} does not fit "
                      f"{n} device(s)")
  auto = jax.sharding.AxisType.Auto
  return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(auto, auto),
                       devices=devices)


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  return jax.sharding.NamedSharding(mesh, P(("data", "fsdp")))


def check_batch_fits(global_batch: int, mesh: jax.sharding.Mesh) -> None:
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % ways:
    raise ConfigError(f"batch size {global_batch} is not divisible by the {ways} data-parallel "
                      f"ways of the mesh (data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")


def state_shardings(config: PLDRConfig, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh) -> dict:
  """Shardings of {'params', 'opt_state', 'step'}: optimizer moments follow their params."""
  replicated = jax.sharding.NamedSharding(mesh, P())
  p_shard = params_lib.param_shardings(config, mesh)
  abstract = jax.eval_shape(lambda: params_lib.init_params(config, jax.random.key(0)))
  opt_abstract = jax.eval_shape(tx.init, abstract)
  opt_shard = optax.tree_map_params(tx, lambda _, s: s, opt_abstract, p_shard,
                                    transform_non_params=lambda _: replicated)
  return {"params": p_shard, "opt_state": opt_shard, "step": replicated}


def _fresh_state(config: PLDRConfig, tx, key) -> dict:
  p = params_lib.init_params(config, key)
  return {"params": p, "opt_state": tx.init(p), "step": jnp.zeros((), jnp.int32)}


def init_train_state(config: PLDRConfig, tc: TrainConfig, tx, mesh) -> dict:
  """Parameters drawn directly into their shardings (a jitted init with out_shardings)."""
  init = functools.partial(_fresh_state, config, tx)
  return jax.jit(init, out_shardings=state_shardings(config, tx, mesh))(jax.random.key(tc.seed))


def abstract_train_state(config: PLDRConfig, tx, mesh) -> dict:
  """ShapeDtypeStructs with shardings, for restoring a checkpoint in place."""
  shardings = state_shardings(config, tx, mesh)
  shapes = jax.eval_shape(functools.partial(_fresh_state, config, tx), jax.random.key(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def kernel_mesh(config: PLDRConfig, mesh: jax.sharding.Mesh):
  """`sharding.kernel_mesh` for this config's attention."""
  return sharding_lib.kernel_mesh(config.attention, mesh)


@dataclasses.dataclass(frozen=True)
class BoundStep:
  """A jitted step with its trailing constant arguments (the fixed G_LM) bound:
  `step(state, batch)` runs it, `step.lower(state, batch)` lowers it (compile
  times, HLO dumps)."""
  jitted: Any
  bound: tuple = ()

  def __call__(self, *args):
    return self.jitted(*args, *self.bound)

  def lower(self, *args):
    return self.jitted.lower(*args, *self.bound)


def make_train_step(config: PLDRConfig, tc: TrainConfig, tx, mesh, g_lm=None):
  """A jitted (state, batch) -> (state, metrics) over the mesh; the state is donated."""
  shardings = state_shardings(config, tx, mesh)
  bs = batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, P())
  schedule = lr_schedule(tc)

  def step(state, batch, g):
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, config=config, g_lm=g, dag_coeff=tc.dag_coeff), has_aux=True)
    with kernel_mesh(config, mesh):
      (_, metrics), grads = grad_fn(state["params"], batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {**metrics, "grad_norm": optax.tree.norm(grads),
               "learning_rate": schedule(state["step"])}
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, metrics

  jitted = jax.jit(step, in_shardings=(shardings, {"tokens": bs, "mask": bs}, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))

  return BoundStep(jitted, (g_lm,))


def make_eval_step(config: PLDRConfig, mesh, g_lm=None):
  """Jitted batch -> summed (ce * tokens, correct, tokens) for exact averaging over batches."""
  bs = batch_sharding(mesh)
  replicated = jax.sharding.NamedSharding(mesh, P())

  def step(params, batch, g):
    with kernel_mesh(config, mesh):
      _, m = loss_fn(params, batch, config=config, g_lm=g)
    return {"ce_sum": m["ce"] * m["tokens"], "correct": m["accuracy"] * m["tokens"],
            "tokens": m["tokens"]}

  jitted = jax.jit(step, in_shardings=(None, {"tokens": bs, "mask": bs}, replicated),
                   out_shardings=replicated)
  return BoundStep(jitted, (g_lm,))


def global_batch(local: dict, mesh: jax.sharding.Mesh) -> dict:
  """Assemble each host's rows into global arrays sharded over the batch axis."""
  bs = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(bs, np.asarray(v)) for k, v in local.items()}


def batch_totals(fn, batches) -> dict[str, float]:
  """{name: sum over the batches} of fn(batch)'s scalars, added on the host in batch
  order (sums and counts, for exact token-weighted means): the one evaluation loop
  (`evaluate`, experiments/perplexity.py, experiments/less_eval.py)."""
  tot: dict[str, float] = {}
  for b in batches:
    for k, v in fn(b).items():
      tot[k] = tot.get(k, 0.0) + float(v)
  return tot


def evaluate(eval_step, params, batches, mesh) -> dict[str, float]:
  """Token-weighted loss, perplexity and accuracy over a list of batches."""
  tot = {"ce_sum": 0.0, "correct": 0.0, "tokens": 0.0}
  tot.update(batch_totals(lambda b: eval_step(params, global_batch(b, mesh)), batches))
  n = max(tot["tokens"], 1.0)
  loss = tot["ce_sum"] / n
  return {"loss": loss, "perplexity": float(np.exp(min(loss, 50.0))),
          "accuracy": tot["correct"] / n, "tokens": tot["tokens"]}


def flops_per_token(config: PLDRConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), from the config.

  Counts the matmuls of the dense layers, attention scores/values, the q G_LM
  product, the LM head, and the per-sequence metric learner and power-law
  step (amortised over seq_len tokens).
  """
  c = config
  d, h, dk, s = c.d_model, c.num_heads, c.head_dim, seq_len
  per_layer = 2 * (4 * d * d + 3 * d * c.d_ff)            # qkv, out, GLU FFN
  per_layer += 2 * 2 * s * d                               # scores and values (full S x S)
  if c.g_mode != "identity":
    per_layer += 2 * h * dk * dk                           # q G_LM
  if c.learned_g:
    seq = 2 * s * h * dk * dk                              # Q^T Q
    seq += c.num_res_units * 2 * 3 * 2 * h * dk * dk * c.a_dff  # 2 GLUs x 3 matmuls per unit
    seq += 2 * 2 * h * dk ** 3                             # W @ A and a @ A_P
    per_layer += seq / s
  return 3.0 * (c.num_layers * per_layer + 2 * d * c.vocab_size)

"""Training the LESS kernels phi/psi on a frozen pldr_jax model (docs/less.md).

The base model is frozen. For each batch of training text the jitted step runs
the dense model once (`less_jax.model.collect_layer_io`: per layer q_eff, k, v
after rotary and the true attention output O), builds each layer's sparse
kept-set mask of the policy (`parallel.sparse_mask`, a function of the frozen
q_eff, k only) and trains that layer's phi/psi so that

    LESS(q_eff, k, v; mask, kernels) @ W_o   matches   O @ W_o

in mean squared error (mean over the d_model features and over the positions
`parallel.loss_positions` keeps: positions before heavy + recent, where the
kept set is the whole prefix, and padding are ignored). The output bias of
W_o cancels in the difference. Layers are independent: their kernels are
stacked on a leading layer axis [L, ...] and the per-layer losses are vmapped
and summed (disjoint parameters, so each layer gets exactly its own gradient).

Optimiser: Adam, lr 1e-3 halved every `lr_halve_epochs` (10) epochs of
`epoch_steps` batches; kernel dropout 0.3 in training only. After each epoch
the kernels are scored on held-out batches of the eval split; the best
validation kernels are kept *per layer* (layers are independent, so this is the
best validation checkpoint of each layer's own training).

Storage: `<model workdir>/less_kernels/<policy kind>_<budget>/` holds
  kernels/    Orbax StandardCheckpointer: {wq1, wq2, wk1, wk2, wk3, d1, d2},
              each stacked [L, Hk, ...] float32
  meta.json   model shape (layers, heads, head_dim, d_model), rank R, hidden
              R', share_heads, the policy and the training config/results.
`load_kernels(path, config, policy, rank)` returns the list of per-layer
`KernelParams` that `less_jax.model.less_forward` / `less_prefill` take, and
raises `KernelLoadError` (a ValueError) naming the mismatch when the kernels
were trained for another model shape, rank or policy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from pldr_jax import errors
from pldr_jax import params as params_lib
from less_jax import kernels as kernels_lib
from less_jax import model as less_model
from less_jax import parallel as parallel_lib
from less_jax import policies as policies_lib
from less_jax.config import LessTrainConfig
from less_jax.errors import KernelError, KernelLoadError
from pldr_jax.config import PLDRConfig

__all__ = [
    "init_stacked_kernels",
    "stack_kernels",
    "unstack_kernels",
    "layer_loss_terms",
    "kernel_loss",
    "make_optimizer",
    "make_train_step",
    "make_eval_step",
    "train_kernels",
    "kernels_dir",
    "save_kernels",
    "load_kernels",
    "load_kernels_meta",
    "load_frozen_model",
    "TrainResult",
]

KERNEL_FIELDS = kernels_lib.KernelParams._fields
_FORMAT = "less_jax.kernels/1"
_META_FILE = "meta.json"
_KERNELS_ITEM = "kernels"




# ----------------------------------------------------------------------------
# Config.

def _policy_json(policy: policies_lib.Policy) -> dict:
  return {"kind": policy.kind, "budget": int(policy.budget),
          **{f.name: getattr(policy, f.name) for f in dataclasses.fields(policy)}}


# ----------------------------------------------------------------------------
# Stacked kernels [L, ...].

def init_stacked_kernels(key: jax.Array, config: PLDRConfig, rank: int, hidden: int, *,
                         share_heads: bool = False) -> kernels_lib.KernelParams:
  """Fresh kernels for every layer, stacked on a leading layer axis (float32)."""
  keys = jax.random.split(key, config.num_layers)
  per_layer = [kernels_lib.init_kernels(k, config.head_dim, config.num_heads, rank, hidden,
                                        share_heads=share_heads, dtype=jnp.float32)
               for k in keys]
  return stack_kernels(per_layer)


def stack_kernels(kernels: list[kernels_lib.KernelParams]) -> kernels_lib.KernelParams:
  return params_lib.stack_trees(kernels)


def unstack_kernels(stacked: kernels_lib.KernelParams) -> list[kernels_lib.KernelParams]:
  n = stacked.wq1.shape[0]
  return [jax.tree.map(lambda x: x[i], stacked) for i in range(n)]


# ----------------------------------------------------------------------------
# Loss.

def layer_loss_terms(kernels: kernels_lib.KernelParams, q_eff, k, v, out_true, wo_kernel,
                     lengths, mask, policy: policies_lib.Policy, *, dropout_rng=None,
                     deterministic: bool = True, dropout_rate: float = 0.0):
  """(sum of squared errors, number of counted positions) of one layer.

  q_eff, k, v, out_true: [B, S, H, D]; wo_kernel: [H * D, d_model]; lengths [B];
  mask: the policy's kept-set mask [B, H, S, S]. The error at a position is
  mean over d_model of ((LESS - O) @ W_o)^2; positions outside
  `parallel.loss_positions` (before heavy + recent, padding) count zero.
  """
  b, s, h, d = q_eff.shape
  pred = parallel_lib.less_attention_parallel(
      q_eff, k, v, lengths, policy, kernels, mask=mask, dropout_rng=dropout_rng,
      deterministic=deterministic, dropout_rate=dropout_rate)
  diff = (pred.astype(jnp.float32) - out_true.astype(jnp.float32)).reshape(b, s, h * d)
  proj = jnp.einsum("bsi,io->bso", diff, wo_kernel.astype(jnp.float32))
  per_pos = jnp.mean(jnp.square(proj), axis=-1)  # [B, S]
  keep = parallel_lib.loss_positions(lengths, policy, s)
  sse = jnp.sum(jnp.where(keep, per_pos, 0.0))
  return sse, jnp.sum(keep).astype(jnp.float32)


def kernel_loss(kernels: kernels_lib.KernelParams, q_eff, k, v, out_true, wo_kernel, lengths,
                mask, policy, **kw):
  """Mean squared error of one layer (see `layer_loss_terms`); 0 if nothing counts."""
  sse, n = layer_loss_terms(kernels, q_eff, k, v, out_true, wo_kernel, lengths, mask,
                            policy, **kw)
  return sse / jnp.maximum(n, 1.0)


def _batch_lengths(batch: dict) -> jax.Array:
  mask = jnp.asarray(batch["mask"])
  return jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(jnp.int32)


def _collect(params, tokens, lengths, config: PLDRConfig, policy, g_lm):
  """Frozen per-layer io stacked on a leading layer axis, plus the sparse masks."""
  recs = less_model.collect_layer_io(params, tokens, lengths, config=config, g_lm=g_lm)
  io = {name: jnp.stack([r[name] for r in recs]) for name in ("q_eff", "k", "v", "out")}
  io["wo"] = jnp.stack([r["wo"]["kernel"] for r in recs])
  io = jax.lax.stop_gradient(io)
  io["mask"] = jax.vmap(lambda q, k: parallel_lib.sparse_mask(q, k, lengths, policy))(
      io["q_eff"], io["k"])
  return io


def _layers_terms(stacked, io, lengths, policy, rng, deterministic, rate):
  """Per-layer (sse [L], count [L]), layers vmapped."""
  n_layers = io["q_eff"].shape[0]
  rngs = (jax.random.split(rng, n_layers) if rng is not None
          else jnp.zeros((n_layers,), jnp.uint32))

  def one(kern, q, k, v, o, wo, mask, r):
    return layer_loss_terms(kern, q, k, v, o, wo, lengths, mask, policy,
                            dropout_rng=None if rng is None else r,
                            deterministic=deterministic, dropout_rate=rate)

  return jax.vmap(one)(stacked, io["q_eff"], io["k"], io["v"], io["out"], io["wo"],
                       io["mask"], rngs)


# ----------------------------------------------------------------------------
# Steps.

def make_optimizer(tc: LessTrainConfig) -> optax.GradientTransformation:
  """Adam, lr halved every lr_halve_epochs * epoch_steps steps (staircase)."""
  schedule = optax.exponential_decay(init_value=float(tc.lr),
                                     transition_steps=tc.lr_halve_epochs * tc.epoch_steps,
                                     decay_rate=0.5, staircase=True)
  return optax.adam(schedule)


def _jit(fn, mesh):
  """jax.jit; with a mesh every output is replicated over it (readable on every process)."""
  if mesh is None:
    return jax.jit(fn)
  return jax.jit(fn, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def make_train_step(config: PLDRConfig, policy: policies_lib.Policy,
                    tx: optax.GradientTransformation, *, dropout: float, g_lm=None, mesh=None):
  """Jitted (kernels [L,...], opt_state, params, tokens, lengths, rng) ->
  (kernels, opt_state, per-layer MSE [L]). The frozen params are not differentiated.
  mesh: see `train_kernels`."""

  def loss(stacked, io, lengths, rng):
    sse, n = _layers_terms(stacked, io, lengths, policy, rng, dropout <= 0.0, dropout)
    per_layer = sse / jnp.maximum(n, 1.0)
    return jnp.sum(per_layer), per_layer

  def step(stacked, opt_state, params, tokens, lengths, rng):
    io = _collect(params, tokens, lengths, config, policy, g_lm)
    grads, per_layer = jax.grad(loss, has_aux=True)(stacked, io, lengths, rng)
    updates, opt_state = tx.update(grads, opt_state, stacked)
    return optax.apply_updates(stacked, updates), opt_state, per_layer

  return _jit(step, mesh)


def make_eval_step(config: PLDRConfig, policy: policies_lib.Policy, g_lm=None, mesh=None):
  """Jitted (kernels, params, tokens, lengths) -> (sse [L], count [L]), no dropout.

  kernels None: the sparse policy alone (the reference LESS must beat)."""

  def step(stacked, params, tokens, lengths):
    io = _collect(params, tokens, lengths, config, policy, g_lm)
    return _layers_terms(stacked, io, lengths, policy, None, True, 0.0)

  return _jit(step, mesh)


class Placement:
  """Where arrays go: one default device (mesh None), or a data-parallel mesh over all
  devices of all processes (batch rows split over every mesh axis, the rest replicated)."""

  def __init__(self, mesh=None):
    self.mesh = mesh

  def replicate(self, tree):
    """Every leaf as an array replicated over the mesh (the same value on every process)."""
    if self.mesh is None:
      return tree
    rep = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    def one(x):
      if x is None:
        return None
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(one(jax.random.key_data(x)))
      host = np.asarray(x)
      return jax.make_array_from_callback(host.shape, rep, lambda idx: host[idx])

    return jax.tree.map(one, tree)

  def batch(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(tokens int32 [B, S], lengths int32 [B]) of this process's rows, on the devices."""
    if self.mesh is None:
      return jnp.asarray(batch["tokens"], jnp.int32), _batch_lengths(batch)
    rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.mesh.axis_names))
    tokens = np.asarray(batch["tokens"], np.int32)
    lengths = np.maximum(np.sum(np.asarray(batch["mask"]), axis=-1), 1).astype(np.int32)
    return (jax.make_array_from_process_local_data(rows, tokens),
            jax.make_array_from_process_local_data(rows, lengths))


def evaluate(eval_step, stacked, params, batches: Iterable[dict],
             placement: Placement | None = None) -> np.ndarray:
  """Per-layer MSE [L] over all counted positions of `batches` (nan if none)."""
  placement = placement or Placement()
  tot, cnt = None, None
  for batch in batches:
    sse, n = eval_step(stacked, params, *placement.batch(batch))
    sse, n = np.asarray(sse, np.float64), np.asarray(n, np.float64)
    tot, cnt = (sse, n) if tot is None else (tot + sse, cnt + n)
  if tot is None:
    return np.full((0,), np.nan)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(cnt > 0, tot / cnt, np.nan)


@dataclasses.dataclass
class TrainResult:
  kernels: list  # per-layer KernelParams (the best-validation ones)
  history: list  # per epoch {"epoch", "train", "val", "lr"} (per-layer lists)
  best_val: list | None  # per layer
  best_epoch: list | None  # per layer
  path: str | None = None


def train_kernels(params, config: PLDRConfig, tc: LessTrainConfig,
                  train_batches: Iterator[dict], val_batches: list[dict], *, g_lm=None,
                  log=print, mesh=None) -> TrainResult:
  """Trains every layer's kernels; returns the best-validation kernels per layer.

  train_batches: an iterator of {'tokens' [B, S] int, 'mask' [B, S]} (e.g. the
  pretraining data pipeline), consumed `epochs * epoch_steps` times.
  val_batches: held-out batches (same format); empty: the last kernels are kept.
  mesh: None (one device), or a mesh over all devices of all processes: data
  parallel, each process passing its own rows (the same number of batches on
  every process, and the same `log` gating); the kernels come back replicated.
  """
  place = Placement(mesh)
  policy = tc.make_policy(max_len=config.max_len)
  tx = make_optimizer(tc)
  key = jax.random.key(tc.seed)
  key, init_key = jax.random.split(key)
  stacked = init_stacked_kernels(init_key, config, tc.rank, tc.hidden,
                                 share_heads=tc.share_heads)
  opt_state = tx.init(stacked)
  key, stacked, opt_state, params = place.replicate((key, stacked, opt_state, params))
  train_step = make_train_step(config, policy, tx, dropout=float(tc.dropout), g_lm=g_lm,
                               mesh=mesh)
  eval_step = make_eval_step(config, policy, g_lm, mesh)
  schedule_lr = lambda step: tc.lr * 0.5 ** (step // (tc.lr_halve_epochs * tc.epoch_steps))

  if val_batches and log is not None:
    sparse = evaluate(eval_step, None, params, val_batches, place)
    log(f"sparse policy alone (no kernels): val loss {float(np.mean(sparse)):.6g} "
        f"(per layer {_fmt(sparse)})")
  best = stacked
  best_val = np.full((config.num_layers,), np.inf)
  best_epoch = [-1] * config.num_layers
  history = []
  step = 0
  for epoch in range(tc.epochs):
    t0 = time.perf_counter()
    losses = []
    for _ in range(tc.epoch_steps):
      try:
        batch = next(train_batches)
      except StopIteration as e:
        raise errors.TrainingError(
            f"the training data ran out at step {step} (epoch {epoch + 1}); use a repeating "
            "iterator or fewer epochs/epoch_steps") from e
      key, rng = jax.random.split(key)
      lr_now = schedule_lr(step)
      stacked, opt_state, per_layer = train_step(stacked, opt_state, params,
                                                 *place.batch(batch), rng)
      losses.append(per_layer)
      step += 1
    train_loss = np.mean(np.stack([np.asarray(l) for l in losses]), axis=0)
    if not np.all(np.isfinite(train_loss)):
      raise errors.TrainingError(
          f"kernel training diverged at epoch {epoch + 1}: train loss {train_loss}")
    if val_batches:
      val = evaluate(eval_step, stacked, params, val_batches, place)
      better = val < best_val
      best_val = np.where(better, val, best_val)
      for i in np.flatnonzero(better):
        best_epoch[i] = epoch
      sel = place.replicate(jnp.asarray(better))
      best = jax.tree.map(
          lambda new, old: jnp.where(sel.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
          stacked, best)
    else:
      val = np.full_like(train_loss, np.nan)
      best = stacked
    history.append({"epoch": epoch, "train": train_loss.tolist(), "val": val.tolist(),
                    "lr": lr_now})
    if log is not None:
      log(f"epoch {epoch + 1}/{tc.epochs}: train loss {float(np.mean(train_loss)):.6g} "
          f"val loss {float(np.mean(val)):.6g}  (per layer train "
          f"{_fmt(train_loss)} val {_fmt(val)})  lr {lr_now:.3g}  "
          f"{time.perf_counter() - t0:.1f}s")
  has_val = bool(val_batches)
  return TrainResult(kernels=unstack_kernels(best), history=history,
                     best_val=best_val.tolist() if has_val else None,
                     best_epoch=best_epoch if has_val else None)


def _fmt(x) -> str:
  return "[" + ", ".join(f"{float(v):.4g}" for v in np.asarray(x)) + "]"


# ----------------------------------------------------------------------------
# Save / load.

def kernels_dir(model_workdir, tc: LessTrainConfig) -> str:
  """<model workdir>/less_kernels/<policy kind>_<budget>."""
  return os.path.join(os.path.abspath(os.fspath(model_workdir)), "less_kernels", tc.run_name())


def _model_shape(config: PLDRConfig) -> dict:
  return {"num_layers": int(config.num_layers), "num_heads": int(config.num_heads),
          "head_dim": int(config.head_dim), "d_model": int(config.d_model),
          "g_mode": config.g_mode}


def save_kernels(path, kernels: list[kernels_lib.KernelParams], config: PLDRConfig,
                 policy: policies_lib.Policy, *, extra_meta: dict | None = None) -> str:
  """Writes per-layer kernels (Orbax, stacked [L, ...]) and meta.json to `path`.

  An existing save at `path` is replaced. Returns the absolute path.
  """
  path = os.path.abspath(os.fspath(path))
  kernels = less_model.check_kernels_list(kernels, config)
  if any(k is None for k in kernels):
    raise KernelError("save_kernels needs kernels for every layer (got None entries)")
  ranks = {k.rank for k in kernels}
  hiddens = {k.hidden for k in kernels}
  hks = {k.num_heads for k in kernels}
  if len(ranks) != 1 or len(hiddens) != 1 or len(hks) != 1:
    raise KernelError(f"all layers' kernels must share rank/hidden/heads, got ranks {ranks}, "
                     f"hidden {hiddens}, heads {hks}")
  stacked = stack_kernels([jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), k)
                           for k in kernels])
  tree = {name: getattr(stacked, name) for name in KERNEL_FIELDS}
  meta = {"format": _FORMAT, "model": _model_shape(config),
          "head_dim": int(config.head_dim), "num_heads": int(config.num_heads),
          "num_layers": int(config.num_layers), "rank": ranks.pop(),
          "hidden": hiddens.pop(), "kernel_heads": hks.pop(),
          "share_heads": kernels[0].num_heads == 1 and config.num_heads != 1,
          "policy": _policy_json(policy), **(extra_meta or {})}
  primary = jax.process_index() == 0  # several processes: all save the arrays, one the meta
  os.makedirs(path, exist_ok=True)
  meta_file = os.path.join(path, _META_FILE)
  if primary and os.path.exists(meta_file):
    os.remove(meta_file)  # a half-replaced save must not look complete
  ckptr = ocp.StandardCheckpointer()
  try:
    ckptr.save(os.path.join(path, _KERNELS_ITEM), tree, force=True)
    ckptr.wait_until_finished()
  finally:
    ckptr.close()
  if primary:
    tmp = meta_file + ".tmp"
    with open(tmp, "w") as f:
      json.dump(meta, f, indent=2, default=_json_default)
    os.replace(tmp, meta_file)
  return path


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x)}")


def load_kernels_meta(path) -> dict:
  """The meta.json of a kernel save (KernelLoadError if missing or unreadable)."""
  path = os.path.abspath(os.fspath(path))
  meta_file = os.path.join(path, _META_FILE)
  if not os.path.isfile(meta_file):
    raise KernelLoadError(f"no LESS kernels at {path}: {_META_FILE} is missing "
                          "(not a kernel directory, or the save did not finish)")
  try:
    with open(meta_file) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise KernelLoadError(f"cannot read {meta_file}: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise KernelLoadError(f"{meta_file} is not a {_FORMAT} kernel meta file")
  return meta


def load_kernels(path, config: PLDRConfig, policy: policies_lib.Policy | None = None,
                 rank: int | None = None) -> list[kernels_lib.KernelParams]:
  """Restores kernels saved by `save_kernels`: a list of per-layer KernelParams.

  Raises KernelLoadError (a ValueError) naming the mismatch if the kernels were
  trained for a model with another number of layers, heads or head width, for
  another rank R than `rank` (when given), or for another policy than `policy`
  (when given: kind and budgets must match).
  """
  path = os.path.abspath(os.fspath(path))
  meta = load_kernels_meta(path)
  want = _model_shape(config)
  for name in ("head_dim", "num_heads", "num_layers"):
    if int(meta["model"][name]) != want[name]:
      raise KernelLoadError(
          f"LESS kernels at {path} were trained for a model with {name}="
          f"{meta['model'][name]}, but this model has {name}={want[name]} "
          f"(kernels: {meta['model']['num_layers']} layers x {meta['model']['num_heads']} heads "
          f"of width {meta['model']['head_dim']}; model: {want['num_layers']} x "
          f"{want['num_heads']} of width {want['head_dim']}); train kernels for this model")
  if rank is not None and int(meta["rank"]) != int(rank):
    raise KernelLoadError(f"LESS kernels at {path} have rank R={meta['rank']}, but R={rank} "
                          "was asked for; load them with their own rank or train new ones")
  if policy is not None:
    got = _policy_json(policy)
    if got != meta["policy"]:
      raise KernelLoadError(f"LESS kernels at {path} were trained for policy "
                            f"{meta['policy']}, not {got}")
  L, hk, d = want["num_layers"], int(meta["kernel_heads"]), want["head_dim"]
  r, rh = int(meta["rank"]), int(meta["hidden"])
  shapes = {"wq1": (L, hk, d, rh), "wq2": (L, hk, rh, r), "wk1": (L, hk, d, rh),
            "wk2": (L, hk, rh, r), "wk3": (L, hk, r, r), "d1": (L, hk, r), "d2": (L, hk, r)}
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=sharding)
              for k, s in shapes.items()}
  item = os.path.join(path, _KERNELS_ITEM)
  if not os.path.isdir(item):
    raise KernelLoadError(f"LESS kernels at {path}: the '{_KERNELS_ITEM}' item is missing")
  ckptr = ocp.StandardCheckpointer()
  try:
    tree = ckptr.restore(item, abstract)
  except Exception as e:  # noqa: BLE001 - Orbax errors become a clear KernelLoadError
    raise KernelLoadError(f"LESS kernels at {path} do not match their meta.json or are "
                          f"corrupt: {type(e).__name__}: {e}") from e
  finally:
    ckptr.close()
  stacked = kernels_lib.KernelParams(**{k: tree[k] for k in KERNEL_FIELDS})
  kernels = unstack_kernels(stacked)
  less_model.check_kernels_list(kernels, config)
  return kernels


# ----------------------------------------------------------------------------
# The frozen model.

def load_frozen_model(model_workdir, step: int | None = None):
  """(params, PLDRConfig, DataConfig, g_lm or None, step) of a pretraining workdir
  (`pldr_jax.load`: the configs from the checkpoint meta, then only the parameters,
  and the fixed G_LM of 'random'/'transferred' runs)."""
  import pldr_jax
  m = pldr_jax.load(model_workdir, step=step)
  if m.data is None:
    raise KernelLoadError(f"{model_workdir} is not a pldr-jax run directory with a data config")
  return m.params, m.config, m.data, m.g_lm, m.step

"""The pretraining loop: data -> sharded train steps -> eval -> Orbax checkpoints.

`run_pretraining` is what `experiments/pretrain.py` calls once gin has built
the three frozen configs. It resumes from the newest checkpoint in
`<workdir>/checkpoints` (params, optimizer state, step, data position), stops
on a NaN/inf loss without touching what is saved, and stores the frozen G_LM
as its own checkpoint item (learned models: G_LM of a fixed probe prompt;
fixed-G runs: the G they used).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import checkpoint as ckpt_lib
from pldr_jax import g_modes, model, train
from pldr_jax import params as params_lib
from pldr_jax.config import ConfigError, PLDRConfig
from pldr_jax.data import DataConfig, load_tokenizer, make_eval_batches, make_train_iterator

PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was "
              "the worst of times.")


class TrainingError(RuntimeError):
  """The run cannot go on (NaN/inf loss, ...); saved checkpoints are left as they were."""


def validate(config: PLDRConfig, tc: train.TrainConfig, data: DataConfig, mesh) -> None:
  """Reject configurations that cannot work, before anything is compiled."""
  if data.seq_len > config.max_len:
    raise ConfigError(f"DataConfig.seq_len={data.seq_len} is longer than the model's context "
                      f"PLDRConfig.max_len={config.max_len}")
  train.check_batch_fits(data.batch_size * jax.process_count(), mesh)
  eval_bs = data.eval_batch_size or data.batch_size
  train.check_batch_fits(eval_bs * jax.process_count(), mesh)
  if data.tokenizer_path is None or not Path(data.tokenizer_path).is_file():
    raise ConfigError(f"tokenizer file not found: {data.tokenizer_path}")


def fixed_g(config: PLDRConfig, tc: train.TrainConfig, g_source: str | None):
  """The constant G_LM of a fixed-G run (None for learned/identity).

  g_source for 'transferred': a .npy file [L, H, dk, dk] or a checkpoint
  directory whose G_LM item is loaded alone.
  """
  if config.g_mode == "random":
    return g_modes.make_fixed_g(config, jax.random.fold_in(jax.random.key(tc.seed), 7))
  if config.g_mode == "transferred":
    if g_source is None:
      raise ConfigError("g_mode='transferred' needs g_source: a .npy file or a checkpoint dir")
    src = Path(g_source)
    if src.is_dir():
      item = ckpt_lib.load_g_lm(src)
      return g_modes.load_transferred_g(config, np.asarray(item["G_LM"]))
    return g_modes.load_transferred_g(config, src)
  return None


def stored_fixed_g(config: PLDRConfig, ckdir, step: int | None):
  """The constant G_LM a fixed-G run saved with its checkpoint (None otherwise)."""
  if config.g_mode not in ("random", "transferred"):
    return None
  return g_modes.check_g(config, np.asarray(ckpt_lib.load_g_lm(ckdir, step)["G_LM"]))


def restore_for_inference(ckdir, config: PLDRConfig, step: int | None = None):
  """(params on the default device, constant G_LM or None, step) from a checkpoint dir."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = jax.eval_shape(lambda k: params_lib.init_params(config, k), jax.random.key(0))
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes)
  with ckpt_lib.Checkpointer(ckdir, async_save=False) as ck:
    step = ck.latest_step() if step is None else step
    params = ck.restore_params(step, abstract_params=abstract)
  return params, stored_fixed_g(config, ckdir, step), step


def probe_g_lm(params, config: PLDRConfig, probe_tokens: np.ndarray, g_lm=None) -> dict:
  """G_LM (and A, A_LM) per layer from the probe prompt: arrays [L, H, dk, dk]."""
  if g_lm is not None:
    return {"G_LM": np.asarray(g_lm, np.float32)}
  if not config.learned_g:
    return {}
  _, ded = _probe_forward(params, jnp.asarray(probe_tokens[None]), config=config)
  # causal metric: the probe's summary is its last position
  last = (lambda x: x[0, -1]) if config.causal_metric else (lambda x: x[0])
  return {k: np.stack([np.asarray(last(d[k]), np.float32) for d in ded])
          for k in ("A", "A_LM", "G_LM")}


_probe_forward = jax.jit(lambda p, t, config: model.forward(p, t, config=config,
                                                             return_deductive=True),
                         static_argnames=("config",))


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  train_loss: float | None
  eval: dict
  tokens_per_second: float | None
  losses: dict


def _host_metrics(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_pretraining(config: PLDRConfig, tc: train.TrainConfig, data: DataConfig,
                    workdir: str | os.PathLike, *, g_source: str | None = None,
                    progress: bool = True, stop_after: int | None = None) -> RunResult:
  """Train (or resume) and checkpoint under `workdir`.

  stop_after: leave the loop after this many steps in this call (testing a
  resume without a kill); checkpoints and logs are as if the run was stopped.
  """
  workdir = Path(workdir)
  mesh = train.make_mesh(tc)
  validate(config, tc, data, mesh)
  tokenizer = load_tokenizer(data.tokenizer_path)
  if tokenizer.vocab_size > config.vocab_size:
    raise ConfigError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's "
                      f"vocab_size is {config.vocab_size}")
  workdir.mkdir(parents=True, exist_ok=True)
  tx = train.make_optimizer(tc)
  g_lm = fixed_g(config, tc, g_source)
  checkpointer = ckpt_lib.Checkpointer(workdir / "checkpoints", keep=tc.keep_checkpoints)
  meta = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tc),
          "data": dataclasses.asdict(data)}

  with jax.set_mesh(mesh):
    start = checkpointer.latest_step()
    if start is None:
      state = train.init_train_state(config, tc, tx, mesh)
      data_state, start = None, 0
    else:
      abstract = train.abstract_train_state(config, tx, mesh)
      restored = checkpointer.restore(start, abstract_params=abstract["params"],
                                      abstract_opt_state=abstract["opt_state"])
      state = {"params": restored["params"], "opt_state": restored["opt_state"],
               "step": jax.device_put(jnp.int32(start), abstract["step"].sharding)}
      data_state = restored["data_state"]
      g_lm = stored_fixed_g(config, workdir / "checkpoints", start)
      print(f"resumed from {workdir / 'checkpoints'} at step {start}")
    it = make_train_iterator(data, tokenizer, shard_index=jax.process_index(),
                             shard_count=jax.process_count(), state=data_state)
    eval_batches = make_eval_batches(data.replace(max_eval_batches=tc.max_eval_batches)
                                     if tc.max_eval_batches else data, tokenizer,
                                     shard_index=jax.process_index(),
                                     shard_count=jax.process_count())
    train_step = train.make_train_step(config, tc, tx, mesh, g_lm)
    eval_step = train.make_eval_step(config, mesh, g_lm)
    probe = np.asarray([2] + tokenizer.encode(PROBE_TEXT), np.int32)[:config.max_len]

    writer = _summary_writer(workdir / "tensorboard")
    metrics_file = open(workdir / "metrics.jsonl", "a")
    bar = _progress(progress, start, tc.num_steps)
    losses: dict[int, float] = {}
    last: dict[str, float] | None = None
    eval_metrics: dict = {}
    tokens_per_step = data.batch_size * jax.process_count() * data.seq_len
    t_first, n_timed = None, 0

    def save(step: int, force: bool = False):
      g_item = probe_g_lm(state["params"], config, probe, g_lm)
      checkpointer.save(step, params=state["params"], opt_state=state["opt_state"],
                        data_state=it.get_state(), meta={**meta, "step": step},
                        g_lm=g_item or None, force=force)

    try:
      step = start
      while step < tc.num_steps:
        batch = train.global_batch(next(it), mesh)
        state, metrics = train_step(state, batch)
        step += 1
        if t_first is None:
          jax.block_until_ready(metrics)
          t_first = time.perf_counter()
        else:
          n_timed += 1
        is_log = step % tc.log_every == 0 or step == tc.num_steps
        is_ckpt = step % tc.checkpoint_every == 0 or step == tc.num_steps
        is_eval = step % tc.eval_every == 0 or step == tc.num_steps
        if is_log or is_ckpt:
          last = _host_metrics(metrics)
          if not (math.isfinite(last["loss"]) and math.isfinite(last["grad_norm"])):
            checkpointer.wait_until_finished()
            kept = checkpointer.latest_step()
            raise TrainingError(
                f"loss is {last['loss']} (grad norm {last['grad_norm']}) at step {step}; "
                f"stopping. The last good checkpoint (step {kept}) in "
                f"{workdir / 'checkpoints'} is untouched.")
          losses[step] = last["loss"]
          elapsed = time.perf_counter() - t_first if t_first else 0.0
          tps = n_timed * tokens_per_step / elapsed if elapsed > 0 and n_timed else float("nan")
          record = {"step": step, **last, "tokens_per_second": tps}
          metrics_file.write(json.dumps(record) + "\n")
          metrics_file.flush()
          for k in ("loss", "ce", "accuracy", "grad_norm", "learning_rate", "dag"):
            if k in last:
              writer.add_scalar(f"train/{k}", last[k], step)
          writer.add_scalar("train/perplexity", math.exp(min(last["ce"], 50.0)), step)
          writer.add_scalar("train/tokens_per_second", tps, step)
          bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{tps:,.0f}")
        if is_eval and eval_batches:
          eval_metrics = train.evaluate(eval_step, state["params"], eval_batches, mesh)
          for k in ("loss", "perplexity", "accuracy"):
            writer.add_scalar(f"eval/{k}", eval_metrics[k], step)
          metrics_file.write(json.dumps({"step": step, "eval": eval_metrics}) + "\n")
          metrics_file.flush()
          bar.write(f"step {step}: eval loss {eval_metrics['loss']:.4f} "
                    f"ppl {eval_metrics['perplexity']:.2f} acc {eval_metrics['accuracy']:.4f}")
        if is_ckpt:
          save(step, force=step == tc.num_steps)
        bar.update(1)
        if stop_after is not None and step - start >= stop_after:
          break
    finally:
      checkpointer.wait_until_finished()
      checkpointer.close()
      bar.close()
      metrics_file.close()
      writer.close()

  elapsed = time.perf_counter() - t_first if t_first else 0.0
  tps = n_timed * tokens_per_step / elapsed if n_timed and elapsed > 0 else None
  return RunResult(str(workdir), step, last["loss"] if last else None, eval_metrics, tps, losses)


def _progress(enabled: bool, start: int, total: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, disable=not enabled or jax.process_index() != 0,
              desc="pretrain", dynamic_ncols=True)


def _summary_writer(logdir: Path):
  from tensorboardX import SummaryWriter
  return SummaryWriter(str(logdir))

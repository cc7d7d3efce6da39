"""The pretraining loop: data -> sharded train steps -> eval -> Orbax checkpoints.

`run_pretraining` is what `experiments/pretrain.py` calls once gin has built
the three frozen configs. The same code runs on 1 device, N local devices and
N processes (every process calls it; see `pldr_jax.training.distributed`). It

* resumes from the newest checkpoint in `<workdir>/checkpoints` that restores
  (params, optimizer state, step, each process's data position); a corrupt or
  partial newer one is reported, renamed `<step>.corrupt` and skipped, and
  `restore_step` picks one (newer ones are renamed `<step>.replaced`);
* keeps `metrics.jsonl` free of duplicate steps after a resume;
* on SIGINT or SIGTERM says so at once, saves a checkpoint at the end of the
  current step and returns (`RunResult.interrupted`), so the caller can exit 0;
  a second signal aborts without saving (`StopSignals`);
* stops on a NaN/inf loss without touching what is saved, and stores the
  frozen G_LM as its own checkpoint item (learned models: G_LM of a fixed
  probe prompt; fixed-G runs: the G they used).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import cli, errors
from pldr_jax.training import checkpoint as ckpt_lib
from pldr_jax.training import distributed, train
from pldr_jax import g_modes, model, paths
from pldr_jax.training.metrics_file import open_metrics, trim_metrics
from pldr_jax import params as params_lib
from pldr_jax.config import DataConfig, PLDRConfig, TrainConfig
from pldr_jax.data import load_tokenizer, make_eval_batches, make_train_iterator
from pldr_jax.errors import ConfigError, TrainingError

PROBE_TEXT = ("The quick brown fox jumps over the lazy dog. It was the best of times, it was "
              "the worst of times.")


def validate(config: PLDRConfig, tc: TrainConfig, data: DataConfig, mesh) -> None:
  """Reject configurations that cannot work, before anything is compiled."""
  if data.seq_len > config.max_len:
    raise ConfigError(f"DataConfig.seq_len={data.seq_len} is longer than the model's context "
                      f"PLDRConfig.max_len={config.max_len}")
  train.check_batch_fits(data.batch_size * jax.process_count(), mesh)
  eval_bs = data.eval_batch_size or data.batch_size
  train.check_batch_fits(eval_bs * jax.process_count(), mesh)
  if data.tokenizer_path is None or not paths.as_path(data.tokenizer_path).is_file():
    raise ConfigError(f"tokenizer file not found: {data.tokenizer_path}")


def fixed_g(config: PLDRConfig, tc: TrainConfig, g_source: str | None):
  """The constant G_LM of a fixed-G run (None for learned/identity).

  g_source for 'transferred': a .npy file [L, H, dk, dk] or a checkpoint
  directory whose G_LM item is loaded alone.
  """
  if config.g_mode == "random":
    return g_modes.make_fixed_g(config, jax.random.fold_in(jax.random.key(tc.seed), 7))
  if config.g_mode == "transferred":
    if g_source is None:
      raise ConfigError("g_mode='transferred' needs g_source: a .npy file or a checkpoint dir")
    src = paths.as_path(g_source)
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


def probe_g_lm(params, config: PLDRConfig, probe_tokens: np.ndarray, g_lm=None,
               mesh=None) -> dict:
  """G_LM (and A, A_LM) per layer from the probe prompt: arrays [L, H, dk, dk].

  mesh: the params' mesh (the outputs come back replicated on it, so every
  process can read them); None for params on one device.
  """
  if g_lm is not None:
    return {"G_LM": np.asarray(g_lm, np.float32)}
  if not config.learned_g:
    return {}
  out = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  _, ded = _probe_forward(out)(params, np.asarray(probe_tokens[None], np.int32), config=config)
  # causal metric: the probe's summary is its last position
  last = (lambda x: x[0, -1]) if config.causal_metric else (lambda x: x[0])
  return {k: np.stack([np.asarray(last(d[k]), np.float32) for d in ded])
          for k in ("A", "A_LM", "G_LM")}


@functools.lru_cache(maxsize=8)
def _probe_forward(out_sharding):
  return jax.jit(lambda p, t, config: model.forward(p, t, config=config, return_deductive=True),
                 static_argnames=("config",), out_shardings=out_sharding)


@dataclasses.dataclass
class RunResult:
  workdir: str
  final_step: int
  train_loss: float | None
  eval: dict
  tokens_per_second: float | None
  losses: dict
  interrupted: str | None = None  # the signal's name when SIGINT/SIGTERM stopped the run


def _host_metrics(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


# ---------------------------------------------------------------- resuming

def restore_newest_good(checkpointer: ckpt_lib.Checkpointer, abstract: dict,
                        restore_step: int | None = None, warn: Callable[[str], None] = print
                        ) -> tuple[dict | None, list[int]]:
  """(restored state or None for a fresh start, the newer steps that failed to restore).

  restore_step: restore exactly this step (an error if it fails). Otherwise the
  newest finished step that restores; a corrupt or partial newer one is reported
  through `warn`, naming both steps. Raises CheckpointError if checkpoints exist
  but none restores (rather than silently training from scratch).
  """
  def restore(step):
    return checkpointer.restore(step, abstract_params=abstract["params"],
                                abstract_opt_state=abstract["opt_state"])

  if restore_step is not None:
    saved = checkpointer.all_steps()
    if restore_step not in saved:
      raise errors.CheckpointError(
          checkpointer.directory,
          f"no checkpoint of step {restore_step} to resume from (saved steps: "
          f"{', '.join(map(str, saved)) or 'none'}); give one of them to --restore_step, "
          "or leave it out to resume from the newest good one")
    return restore(restore_step), []
  failed: list[tuple[int, str]] = []
  for step in reversed(checkpointer.all_steps()):
    try:
      restored = restore(step)
    except errors.CheckpointCorrupt as e:  # damaged; a CheckpointMismatch (another
      failed.append((step, e.reason))  # model config, say) is no reason to skip: it propagates
      continue
    for bad, reason in failed:
      warn(f"WARNING: checkpoint step {bad} in {checkpointer.directory} cannot be restored "
           f"({reason}); falling back to step {step}")
    return restored, [bad for bad, _ in failed]
  if failed:
    raise errors.CheckpointError(
        checkpointer.directory, "no checkpoint can be restored: " +
        "; ".join(f"step {st}: {reason}" for st, reason in failed))
  return None, []


def set_aside(directory: Path, steps, suffix: str) -> list[Path]:
  """Rename step directories to `<step>.<suffix>[.N]` (Orbax then ignores them); process 0."""
  moved = []
  for step in steps:
    src = paths.as_path(directory) / str(step)
    dst, n = src.with_name(f"{step}.{suffix}"), 1
    while dst.exists():
      dst, n = src.with_name(f"{step}.{suffix}.{n}"), n + 1
    if paths.is_remote(src):  # object storage renames a folder object by object: copy, delete
      paths.sync_tree(src, dst)
      src.rmtree()
    else:
      src.rename(dst)
    moved.append(dst)
  return moved


# ---------------------------------------------------------------- stopping on a signal

class StopSignals:
  """Context manager: SIGINT/SIGTERM set `received` instead of killing the process.

  The first signal is acknowledged on stderr at once, even while the main thread
  sits in a compile or an eval (a watcher thread reads the signal numbers from the
  wake-up fd that Python's C-level handler writes to): during training the run
  saves a checkpoint at the end of the current step and stops; during start-up
  it stops before the first step. A second signal aborts at once without saving
  (`os._exit(130)`, from the watcher): checkpoints already written stay intact,
  since Orbax renames a step's folder only once it is complete. Installed only
  in the main thread; the previous handlers and wake-up fd come back on exit.

  ckdir: the checkpoint folder the abort message names (with its newest step).
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)
  ABORT_STATUS = 130

  def __init__(self, ckdir=None):
    self.received: str | None = None
    self.phase = "start-up"  # then "training" (training()), then "finishing"
    self.ckdir = ckdir
    self._old = {}
    self._old_fd = None
    self._pipe = None
    self._watcher = None
    self._count = 0

  def _handle(self, signum, frame):
    if self.received is None:
      self.received = signal.Signals(signum).name
    elif self._watcher is None:  # no watcher thread: the hard stop happens here
      raise KeyboardInterrupt

  def first_message(self, name: str) -> str:
    key = "Ctrl-C" if name == "SIGINT" else name
    name = "Ctrl-C (SIGINT)" if name == "SIGINT" else name
    if self.phase == "start-up":
      now = "stopping before the first step (nothing new to save)"
    elif self.phase == "training":
      now = "the run will save a checkpoint at the end of the current step, then stop"
    else:
      now = "the run is finishing its last save, then stops"
    return f"\n{name}: {now}. Press {key} again to abort at once without saving.\n"

  def abort_message(self, name: str) -> str:
    name = "Ctrl-C (SIGINT)" if name == "SIGINT" else name
    newest = newest_step(self.ckdir) if self.ckdir is not None else None
    kept = (f"the newest checkpoint (step {newest} in {self.ckdir}) is intact"
            if newest is not None else "no checkpoint had been saved")
    return f"\n{name} again: aborted without saving; {kept}.\n"

  def _watch(self, sock):
    while True:
      try:
        data = sock.recv(64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum not in self.SIGNALS:
          continue
        self._count += 1
        name = signal.Signals(signum).name
        if self._count == 1:
          _write_now(self.first_message(name))
        else:
          _write_now(self.abort_message(name))
          os._exit(self.ABORT_STATUS)

  @contextlib.contextmanager
  def training(self):
    """The training loop: a first signal now means 'save at the end of this step'."""
    self.phase = "training"
    try:
      yield self
    finally:
      self.phase = "finishing"

  def __enter__(self):
    import socket
    import threading
    if threading.current_thread() is not threading.main_thread():
      return self
    self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
    try:
      r, w = socket.socketpair()
      w.setblocking(False)
      self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
    except (OSError, ValueError):  # no wake-up fd: the handler raises on a second signal
      return self
    self._pipe = (r, w)
    self._watcher = threading.Thread(target=self._watch, args=(r,), daemon=True,
                                     name="pldr_jax.StopSignals")
    self._watcher.start()
    return self

  def __exit__(self, *exc):
    if self._pipe is not None:
      signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
      r, w = self._pipe
      w.close()  # the watcher's recv returns b"": it ends
      self._watcher.join(timeout=5)
      r.close()
      self._pipe = self._watcher = None
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}


def _write_now(text: str) -> None:
  """stderr without Python's buffers or locks (the main thread may be in a compile)."""
  try:
    os.write(2, text.encode())
  except OSError:
    pass


def newest_step(ckdir) -> int | None:
  """The newest finished checkpoint step in `ckdir` (a listing, no Orbax; local or
  object storage); None if none. Orbax gives a step its plain number only once every
  process's part of it is written, so the step this names restores."""
  try:
    steps = [int(p.name) for p in paths.as_path(ckdir).iterdir() if p.name.isdigit()]
  except (OSError, ValueError):
    return None
  return max(steps) if steps else None


disk_full_message = cli.disk_full_message  # one line for a full disk (pldr_jax.cli)


def _agree_on_batches(batches: list) -> list:
  """Every process evaluates the same number of batches (the fewest any process has)."""
  n = min(distributed.gather_json(len(batches)))
  return batches[:n]


def run_pretraining(config: PLDRConfig, tc: TrainConfig, data: DataConfig,
                    workdir: str | os.PathLike, *, g_source: str | None = None,
                    progress: bool = True, stop_after: int | None = None,
                    restore_step: int | None = None) -> RunResult:
  """Train (or resume) and checkpoint under `workdir` (see the module docstring).

  stop_after: leave the loop after this many steps in this call (testing a
  resume without a kill); checkpoints and logs are as if the run was stopped.
  restore_step: resume from this checkpoint step instead of the newest good one.
  """
  with StopSignals(Path(os.fspath(workdir)) / "checkpoints") as stop:  # start-up included
    return _pretrain(config, tc, data, workdir, stop, g_source=g_source, progress=progress,
                     stop_after=stop_after, restore_step=restore_step)


def _pretrain(config: PLDRConfig, tc: TrainConfig, data: DataConfig,
              workdir: str | os.PathLike, stop: StopSignals, *, g_source: str | None,
              progress: bool, stop_after: int | None, restore_step: int | None) -> RunResult:
  workdir = paths.as_path(workdir)  # local or object storage (gs://...)
  ckdir = workdir / "checkpoints"
  main = jax.process_index() == 0
  mesh = train.make_mesh(tc)
  validate(config, tc, data, mesh)
  tokenizer = load_tokenizer(data.tokenizer_path)
  if tokenizer.vocab_size > config.vocab_size:
    raise ConfigError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's "
                      f"vocab_size is {config.vocab_size}")
  workdir.mkdir(parents=True, exist_ok=True)
  tx = train.make_optimizer(tc)
  g_lm = fixed_g(config, tc, g_source)
  meta = {"model": dataclasses.asdict(config), "train": dataclasses.asdict(tc),
          "data": dataclasses.asdict(paths.record_data(data, workdir))}  # relocatable

  with jax.set_mesh(mesh):
    abstract = train.abstract_train_state(config, tx, mesh)
    with ckpt_lib.Checkpointer(ckdir, keep=None) as reader:
      restored, failed = restore_newest_good(reader, abstract, restore_step,
                                             warn=print if main else lambda _: None)
      start = 0 if restored is None else restored["step"]
      newer = [st for st in reader.all_steps() if st > start and st not in failed]
    distributed.barrier("pldr_jax.training.trainer.restored")  # nobody reads what is renamed next
    if main:
      for path in set_aside(ckdir, failed, "corrupt") + set_aside(ckdir, newer, "replaced"):
        print(f"set aside {path.name}: the run continues from step {start}")
      trim_metrics(workdir / "metrics.jsonl", start)
    distributed.barrier("pldr_jax.training.trainer.resume")
    if restored is None:
      state = train.init_train_state(config, tc, tx, mesh)
      data_state = None
    else:
      state = {"params": restored["params"], "opt_state": restored["opt_state"],
               "step": jax.device_put(jnp.int32(start), abstract["step"].sharding)}
      data_state = restored["data_state"]
      g_lm = stored_fixed_g(config, ckdir, start)
      print(f"resumed from {ckdir} at step {start}")
    checkpointer = ckpt_lib.Checkpointer(ckdir, keep=tc.keep_checkpoints)
    it = make_train_iterator(data, tokenizer, shard_index=jax.process_index(),
                             shard_count=jax.process_count(), state=data_state)
    eval_batches = _agree_on_batches(make_eval_batches(
        data, tokenizer, shard_index=jax.process_index(), shard_count=jax.process_count()))
    train_step = train.make_train_step(config, tc, tx, mesh, g_lm)
    eval_step = train.make_eval_step(config, mesh, g_lm)
    probe = np.asarray([2] + tokenizer.encode(PROBE_TEXT), np.int32)[:config.max_len]

    writer = _summary_writer(workdir / "tensorboard") if main else _NoWriter()
    metrics_file = _NoWriter()  # opened right before the loop (below)
    bar = _progress(progress, start, tc.num_steps)
    losses: dict[int, float] = {}
    last: dict[str, float] | None = None
    eval_metrics: dict = {}
    tokens_per_step = data.batch_size * jax.process_count() * data.seq_len
    t_first, n_timed = None, 0
    interrupted = None

    def save(step: int, force: bool = False):
      g_item = probe_g_lm(state["params"], config, probe, g_lm, mesh)
      checkpointer.save(step, params=state["params"], opt_state=state["opt_state"],
                        data_state=it.get_state(), meta={**meta, "step": step},
                        g_lm=g_item or None, force=force)
      metrics_file.sync()  # on object storage the log is uploaded with each checkpoint

    try:
      with stop.training():
        step = start
        if distributed.any_process(stop.received is not None):  # stopped during start-up
          interrupted = stop.received or "a signal to another process"
        # Opened now: once the log exists, a signal means "save at the end of this step".
        metrics_file = open_metrics(workdir / "metrics.jsonl") if main else _NoWriter()
        while interrupted is None and step < tc.num_steps:
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
                  f"{ckdir} is untouched.")
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
            if math.isfinite(tps):  # not yet measured at the first step
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
          if distributed.any_process(stop.received is not None):
            interrupted = stop.received or "a signal to another process"
            if not is_ckpt:
              save(step, force=True)
            break
          if stop_after is not None and step - start >= stop_after:
            break
        checkpointer.wait_until_finished()  # a signal now still finds the save complete
    finally:
      checkpointer.close()
      bar.close()
      metrics_file.close()
      writer.close()
    distributed.barrier("pldr_jax.training.trainer.saved")  # every process's files are final

  elapsed = time.perf_counter() - t_first if t_first else 0.0
  tps = n_timed * tokens_per_step / elapsed if n_timed and elapsed > 0 else None
  return RunResult(str(workdir), step, last["loss"] if last else None, eval_metrics, tps, losses,
                   interrupted)


class _NoWriter:
  """Stands in for the metrics file and TensorBoard writer on processes other than 0."""

  def write(self, *_):
    pass

  add_scalar = flush = sync = close = write


def _progress(enabled: bool, start: int, total: int):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=start, disable=not enabled or jax.process_index() != 0,
              desc="pretrain", dynamic_ncols=True)


def _summary_writer(logdir):
  from tensorboardX import SummaryWriter
  return SummaryWriter(str(logdir))

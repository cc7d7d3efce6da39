"""Pretraining checkpoints on Orbax: one `CheckpointManager` step per `<directory>/<step>/`.

Items `params`, `opt_state`, `data_state` (JSON: each process's iterator state),
`meta` (JSON: `step`, the config, ...) and an optional `g_lm` (read alone by
`load_g_lm`), beside `checksums.json`. Saves are asynchronous and keep the newest
`keep`. Restores check the files and the abstract trees (`integrity`), give every
array the dtype and sharding asked for (`abstract_like`), and never write, rename
or delete. Errors: `CheckpointCorrupt` (a damaged step), `CheckpointMismatch` (a
sound one that does not fit the request; key paths named), `CheckpointError` (the
rest). Layout: docs/checkpoints.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pldr_jax import paths
from pldr_jax.config import check_int
from pldr_jax.errors import CheckpointCorrupt, CheckpointError, CheckpointMismatch
from pldr_jax.training import distributed, integrity

__all__ = ["Checkpointer", "abstract_like", "load_g_lm", "load_meta"]  # errors: pldr_jax.errors

PARAMS, OPT_STATE, DATA_STATE, META, G_LM = "params", "opt_state", "data_state", "meta", "g_lm"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for an unfinished save
_PER_PROCESS = "per_process"  # data_state item: {"per_process": [state of process 0, ...]}
_listed = integrity.listed
log = logging.getLogger(__name__)


def abstract_like(tree, shardings=None):
  """A tree of `jax.ShapeDtypeStruct` to restore into, from arrays or ShapeDtypeStructs
  (other leaves stay as they are). shardings: None (each leaf keeps its own, NumPy
  the default device), one `Sharding` for all, or a tree that is a prefix of `tree`
  (e.g. `params.param_shardings(config, mesh)`) with None where a leaf keeps its own."""
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x, sharding):
    if not isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray, np.generic)):
      return x
    own = getattr(x, "sharding", None)  # NumPy: none
    sharding = sharding if sharding is not None else own if own is not None else default
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  is_sharding = lambda s: s is None or isinstance(s, jax.sharding.Sharding)
  try:
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub),
                        shardings, tree, is_leaf=is_sharding)
  except ValueError as e:
    raise ValueError(f"shardings do not match the tree's structure: {e}") from e


def _to_json(x, where: str):
  """A JSON-ready copy of x (dataclasses, tuples, NumPy scalars and paths converted)."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    if bad := [k for k in x if not isinstance(k, str)]:
      raise CheckpointError(where, f"JSON keys must be strings; got {bad[0]!r} in {where}")
    return {k: _to_json(v, f"{where}/{k}") for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v, f"{where}/{i}") for i, v in enumerate(x)]
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  raise CheckpointError(where, f"{where} = {type(x).__name__} is not JSON-serialisable "
                               "(arrays belong in params/opt_state/g_lm)")


@contextlib.contextmanager
def _failing(error, path, what: str):
  """Whatever Orbax, TensorStore or the file system raise becomes `error(path, ...)`."""
  try:
    yield
  except CheckpointError:
    raise
  except Exception as e:  # noqa: BLE001
    text = (f"{type(e).__name__}: {e}".strip().splitlines() or [""])[0][:500]
    raise error(path, f"{what}: {text}") from e


def _steps(directory) -> list[int]:
  d = paths.as_path(directory)
  return sorted(map(int, ocp.utils.checkpoint_steps(d))) if d.is_dir() else []


def _step_dir(directory, step: int | None) -> tuple[int, str]:
  """(step, its directory): the latest finished step when None, else a CheckpointError."""
  d = paths.as_path(directory)
  if not d.is_dir():
    raise CheckpointError(d, "cannot restore: " + ("not a directory" if d.exists() else
                                                    "the checkpoint directory does not exist"))
  steps = _steps(d)
  tmp = sorted(p.name for p in d.iterdir() if _TMP_SUFFIX in p.name)
  tmp = f"; unfinished saves (ignored): {_listed(tmp)}" if tmp else ""
  if not steps:
    raise CheckpointError(d, f"cannot restore: no finished checkpoints in the directory{tmp}")
  if step is not None and (isinstance(step, bool) or step not in steps):
    raise CheckpointError(d, f"cannot restore: step {step!r} not found; available steps: "
                             f"{steps}{tmp}")
  step = steps[-1] if step is None else int(step)
  return step, os.fspath(d / str(step))


class Checkpointer:
  """Training checkpoints in one directory, created by the first save. keep: how many
  of the newest to keep (None: all). async_save: `save` returns once the arrays are in
  host memory; the files are complete after `wait_until_finished()` or `close()` (also
  a context manager). Every process of a run saves the same step; any number restore."""

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
    check_int("Checkpointer keep", keep, 1, optional=True)  # a ConfigError
    self.directory = os.fspath(paths.as_path(directory))  # local (absolute) or a URL
    self.keep, self.async_save, self._closed = keep, async_save, False
    self._pending = None  # (step, items, empty items) of the save in flight
    options = ocp.CheckpointManagerOptions(  # a synchronous save is an async one + wait
        max_to_keep=keep, create=False, enable_async_checkpointing=True,
        cleanup_tmp_directories=False,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._on_finalized))
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), G_LM: ocp.PyTreeCheckpointHandler(),
                OPT_STATE: ocp.StandardCheckpointHandler(),
                DATA_STATE: ocp.JsonCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    with _failing(CheckpointError, self.directory, "cannot open the checkpoint directory"):
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)

  def _on_finalized(self) -> None:
    """Orbax's post-finalisation callback (every process, before the step's final name):
    process 0 records the checksums of the finished files."""
    pending, self._pending = self._pending, None  # set by save() before Orbax's thread runs
    if pending is None or jax.process_index() != 0:
      return
    step, items, empty = pending
    step_dir = os.path.join(self.directory, f"{step}{_TMP_SUFFIX}")
    if not paths.as_path(step_dir).is_dir():  # object storage: finalised in place
      step_dir = os.path.join(self.directory, str(step))
    integrity.write_checksums(step_dir, items, empty)

  def save(self, step: int, *, params, opt_state, data_state: dict, meta: dict,
           g_lm=None, force: bool = False) -> bool:
    """Start saving `step` (False: skipped, not after the latest saved step, unless
    `force`; an existing step is never overwritten). data_state (this process's) and
    meta: JSON-ready dicts (dataclasses, tuples, NumPy scalars, paths converted);
    `meta['step']` is set. A failed background write raises in `wait_until_finished`."""
    self._check_open()
    step = check_int("step", step, 0, error=lambda why: CheckpointError(self.directory, why))
    data_json, meta_json = _to_json(data_state, DATA_STATE), _to_json(meta, META)
    for name, value in ((DATA_STATE, data_json), (META, meta_json)):
      if not isinstance(value, dict):
        raise CheckpointError(self.directory, f"{name} must be a dict, got {type(value).__name__}")
    if meta_json.setdefault("step", step) != step:
      raise CheckpointError(self.directory,
                            f"meta['step']={meta_json['step']!r} differs from step={step}")
    if not force and not self._mngr.should_save(step):
      return False  # not after the latest saved step: skip before any work
    if not jax.tree.leaves(params):
      raise CheckpointError(self.directory, "params has no arrays")
    data = {_PER_PROCESS: distributed.gather_json(data_json)}  # each process's own position
    items = {DATA_STATE: ocp.args.JsonSave(data), META: ocp.args.JsonSave(meta_json)}
    trees = {PARAMS: params, OPT_STATE: opt_state, **({} if g_lm is None else {G_LM: g_lm})}
    empty = [k for k, t in trees.items() if not jax.tree.leaves(t)]  # Orbax cannot save them
    items.update({k: (ocp.args.PyTreeSave if k == G_LM else ocp.args.StandardSave)(t)
                  for k, t in trees.items() if k not in empty})
    with _failing(CheckpointError, self.directory, f"saving step {step} failed"):
      paths.as_path(self.directory).mkdir(parents=True, exist_ok=True)
      self._mngr.wait_until_finished()  # the previous save's callback has run
      self._pending = (step, sorted(items), empty)
      started = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
    if not self.async_save:
      self.wait_until_finished()
    return started

  def wait_until_finished(self) -> None:
    """Block until the background save (if any) is on disk; raises its error if it failed."""
    if not self._closed:
      with _failing(CheckpointError, self.directory, "a background save failed"):
        self._mngr.wait_until_finished()

  def close(self) -> None:
    """Finish pending saves and deletions, then release Orbax's threads. Idempotent."""
    if not self._closed:
      try:
        self.wait_until_finished()
      finally:
        self._closed = True
        self._mngr.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _check_open(self):
    if self._closed:
      raise CheckpointError(self.directory, "this Checkpointer is closed")

  def all_steps(self) -> list[int]:
    """Finished steps on disk, ascending (another process's saves show up)."""
    return _steps(self.directory)

  def latest_step(self) -> int | None:
    return (self.all_steps() or [None])[-1]

  def _restore(self, step, abstract: dict, also=()):
    """(step, step_dir, items): verified, checked against Orbax's metadata, restored.
    An item saved without arrays is not read: it comes back as its abstract tree."""
    self._check_open()
    self.wait_until_finished()  # our own newest save must be on disk first
    step, step_dir = _step_dir(self.directory, step)
    record = integrity.read_checksums(step_dir)
    empty = set((record or {}).get("empty_items", []))
    for item, tree in abstract.items():
      if tree is None:
        raise CheckpointError(step_dir, f"abstract_{item} is required (see abstract_like)")
      if item in empty and jax.tree.leaves(tree):
        raise CheckpointMismatch(os.path.join(step_dir, item), f"the abstract '{item}' tree has "
                                 f"arrays but '{item}' was saved without arrays")
    stored = {k: v for k, v in abstract.items() if k not in empty}
    integrity.verify_files(step_dir, record, [*stored, *also])
    with _failing(CheckpointCorrupt, step_dir, "checkpoint is corrupt or unreadable: cannot "
                                               "read its metadata"):
      metadata = self._mngr.item_metadata(step)
      metadata = {k: metadata[k] for k in stored}
      if none := [k for k, m in metadata.items() if m is None]:
        raise ValueError(f"no metadata for item(s) {none}")
    for item, tree in stored.items():
      integrity.check_layout(os.path.join(step_dir, item), item, metadata[item], tree)
    args = {**{k: ocp.args.StandardRestore(v) for k, v in stored.items()},
            **{k: ocp.args.JsonRestore() for k in also}}
    with _failing(CheckpointCorrupt, step_dir, "checkpoint is corrupt or unreadable"):
      out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    return step, step_dir, {**abstract, **{k: out[k] for k in args}}

  def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state) -> dict:
    """The training state of `step` (None: the latest finished one), as
    {'params', 'opt_state', 'data_state', 'meta', 'step'}; data_state is this
    process's (None, warned, if the number of processes changed)."""
    abstract = {PARAMS: abstract_params, OPT_STATE: abstract_opt_state}
    step, step_dir, out = self._restore(step, abstract, also=(DATA_STATE, META))
    data, n = out[DATA_STATE], jax.process_count()
    if isinstance(data, dict) and set(data) == {_PER_PROCESS}:
      states, data = data[_PER_PROCESS], None
      if len(states) == n:
        data = states[jax.process_index()]
      else:
        log.warning("%s: the data position was saved by %d process(es) but %d are running: "
                    "the data iterators start from the beginning", step_dir, len(states), n)
    return {"params": out[PARAMS], "opt_state": out[OPT_STATE], "data_state": data,
            "meta": out[META], "step": step}

  def restore_params(self, step: int | None = None, *, abstract_params):
    """Only the parameters (for generation/eval: no optimizer state needed)."""
    return self._restore(step, {PARAMS: abstract_params})[2][PARAMS]


def load_meta(directory, step: int | None = None) -> dict:
  """The 'meta' JSON of a checkpoint (None: the latest finished step), with 'step':
  the config, read before building any abstract tree."""
  step, step_dir = _step_dir(directory, step)
  path = os.path.join(step_dir, META)
  with _failing(CheckpointCorrupt, path, "checkpoint is corrupt: cannot read item 'meta'"):
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      meta = c.restore(path, args=ocp.args.JsonRestore())
  if not isinstance(meta, dict):
    raise CheckpointCorrupt(path, "checkpoint is corrupt: meta is not a JSON object")
  return meta


def load_g_lm(directory, step: int | None = None):
  """The 'g_lm' item alone, as NumPy arrays in the structure it was saved in."""
  step, step_dir = _step_dir(directory, step)
  item_dir, record = os.path.join(step_dir, G_LM), integrity.read_checksums(step_dir)
  integrity.verify_files(step_dir, record, [G_LM])  # a recorded g_lm gone: CheckpointCorrupt
  if not paths.as_path(item_dir).is_dir():
    raise CheckpointMismatch(item_dir, f"step {step} was saved with a g_lm that holds no arrays"
                             if G_LM in (record or {}).get("empty_items", []) else
                             f"step {step} has no g_lm item (saved with g_lm=None)")
  with _failing(CheckpointCorrupt, item_dir, "checkpoint is corrupt: cannot read g_lm"):
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                        getattr(tree, "tree", tree))
    with ocp.PyTreeCheckpointer() as c:
      return c.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=args))

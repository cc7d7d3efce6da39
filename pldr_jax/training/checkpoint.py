"""Pretraining checkpoints: one Orbax `CheckpointManager` step per `<directory>/<step>/`.

Items (`args.Composite`): `params`, `opt_state` (StandardSave; restored into an
abstract tree of the same structure, so optax namedtuples come back as such),
`data_state` (JSON: every process's data iterator state), `meta` (JSON: `step`,
the config, anything the caller adds), optional `g_lm` (frozen G_LM, readable
alone with `load_g_lm`), and `checksums.json` (`checksums`: every file's size
and CRC-32, written by Orbax's post-finalisation callback, so a finished step has it).

Saves are asynchronous (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it
when complete; on object storage it finalises in place and writes
`commit_success.txt`) and keep the newest `keep`. Restores go into abstract
trees (`abstract_like`) with the dtype and sharding asked for, after the files
are verified and the trees checked against Orbax's item metadata. Restoring
never writes, renames or deletes anything. Errors: `CheckpointCorrupt` for a
damaged step, `CheckpointMismatch` for a sound one that does not fit the
request (key paths named), `CheckpointError` for the rest.

    ckpt = Checkpointer("runs/a/ckpt", keep=3)
    ckpt.save(step, params=params, opt_state=opt_state,
              data_state=it.get_state(), meta={"config": config})
    r = ckpt.restore(abstract_params=abstract_like(params, param_shardings(config, mesh)),
                     abstract_opt_state=abstract_like(opt_state))
    cfg = PLDRConfig(**load_meta(directory)["config"])   # before any abstract tree
    g = load_g_lm(directory)["G_LM"]                     # fixed-G runs
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pldr_jax import errors, paths
from pldr_jax.training import checksums, distributed

__all__ = ["CheckpointError", "CheckpointCorrupt", "CheckpointMismatch", "Checkpointer",
           "abstract_like", "load_g_lm", "load_meta"]

CheckpointError = errors.CheckpointError
CheckpointCorrupt = errors.CheckpointCorrupt
CheckpointMismatch = errors.CheckpointMismatch
PARAMS, OPT_STATE, DATA_STATE, META, G_LM = "params", "opt_state", "data_state", "meta", "g_lm"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for an unfinished save
_PER_PROCESS = "per_process"  # data_state item: {"per_process": [state of process 0, ...]}
_listed = checksums.listed
log = logging.getLogger(__name__)


def abstract_like(tree, shardings=None):
  """A tree of `jax.ShapeDtypeStruct` to restore into.

  tree: arrays (jax or NumPy) or ShapeDtypeStructs; other leaves stay as they are.
  shardings: None (each leaf keeps its own sharding, else the default device),
    one `jax.sharding.Sharding` for every leaf, or a tree that is a prefix of
    `tree` (e.g. `params.param_shardings(config, mesh)`), None where a leaf
    keeps its own.
  """
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


def _flat(tree) -> dict[str, Any]:
  """{'layers/wq/kernel': leaf} (dict keys, list indices and namedtuple fields)."""
  key = lambda k: str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))
  return {"/".join(map(key, p)) or "<root>": x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_json(x, where: str):
  """A JSON-ready copy of x (dataclasses, tuples, NumPy scalars, paths converted)."""
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


def _steps(directory: str) -> list[int]:
  d = paths.as_path(directory)
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(d)) if d.is_dir() else []


def _step_dir(directory: str, step: int | None) -> tuple[int, str]:
  """(step, its directory): the latest finished step when None, else a CheckpointError."""
  if not paths.as_path(directory).is_dir():
    raise CheckpointError(directory, "cannot restore: not a directory" if paths.as_path(
        directory).exists() else "cannot restore: the checkpoint directory does not exist")
  steps = _steps(directory)
  tmp = sorted(p.name for p in paths.as_path(directory).iterdir() if _TMP_SUFFIX in p.name)
  tmp = f"; unfinished saves (ignored): {_listed(tmp)}" if tmp else ""
  if not steps:
    raise CheckpointError(directory, f"cannot restore: no finished checkpoints in the "
                                     f"directory{tmp}")
  if step is not None and (isinstance(step, bool) or not isinstance(step, (int, np.integer))):
    raise CheckpointError(directory, f"step must be an integer, got {step!r}")
  if step is not None and int(step) not in steps:
    raise CheckpointError(directory, f"cannot restore: step {step} not found; available "
                                     f"steps: {steps}{tmp}")
  step = steps[-1] if step is None else int(step)
  return step, os.path.join(directory, str(step))


def _require_items(step_dir: str, names) -> None:
  try:
    present = {p.name for p in paths.as_path(step_dir).iterdir() if p.is_dir()}
  except OSError as e:
    raise CheckpointError(step_dir, f"cannot list the checkpoint: {e}") from e
  if missing := [n for n in names if n not in present]:
    raise CheckpointCorrupt(step_dir, f"checkpoint is incomplete: item(s) {missing} missing")


def _describe(e: BaseException) -> str:
  return (f"{type(e).__name__}: {e}".strip().splitlines() or [""])[0][:500]


def _check_layout(item_dir: str, item: str, metadata, abstract) -> None:
  """Structure, shapes and dtypes of `abstract` against Orbax's item metadata."""
  saved, want = _flat(getattr(metadata, "tree", metadata)), _flat(abstract)
  problems, shapes, dtypes = [], [], []
  if missing := set(want) - set(saved):
    problems.append(f"not in the checkpoint: {_listed(missing)}")
  if extra := set(saved) - set(want):
    problems.append(f"in the checkpoint but not in the abstract tree: {_listed(extra)}")
  for k in sorted(set(saved) & set(want)):
    s, w = saved[k], want[k]
    s_shape, s_dtype = getattr(s, "shape", None), getattr(s, "dtype", None)
    if not hasattr(w, "shape"):
      continue
    if s_shape is not None and tuple(s_shape) != tuple(w.shape):
      shapes.append(f"{k} saved {tuple(s_shape)} vs requested {tuple(w.shape)}")
    elif s_dtype is not None and jnp.dtype(s_dtype) != jnp.dtype(w.dtype):
      dtypes.append(f"{k} saved {jnp.dtype(s_dtype).name} vs requested {jnp.dtype(w.dtype).name}")
  if shapes:
    problems.append("shape mismatch at " + "; ".join(shapes[:8]))
  if dtypes:
    problems.append("dtype mismatch at " + "; ".join(dtypes[:8])
                    + " (restore in the saved dtype and cast afterwards)")
  if problems:
    raise CheckpointMismatch(item_dir, f"the abstract '{item}' tree does not match the "
                                       "checkpoint: " + "; ".join(problems))


class Checkpointer:
  """Saves and restores training checkpoints in one directory (see the module docstring).

  directory: created by the first save (one used only to restore creates nothing).
  keep: how many of the newest checkpoints to keep; None keeps all.
  async_save: `save` returns once the arrays are in host memory; the files are
    complete after `wait_until_finished()` or `close()` (also a context manager).
  Every process of a run saves the same step; any number may restore.
  """

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    self.directory = os.fspath(paths.as_path(directory))  # local (absolute) or a URL
    self.keep, self.async_save, self._closed = keep, async_save, False
    self._pending = None  # (step, items, empty items) of the save in flight
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=True,
        cleanup_tmp_directories=False,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._on_finalized))
    handlers = {PARAMS: ocp.StandardCheckpointHandler(), G_LM: ocp.PyTreeCheckpointHandler(),
                OPT_STATE: ocp.StandardCheckpointHandler(),
                DATA_STATE: ocp.JsonCheckpointHandler(), META: ocp.JsonCheckpointHandler()}
    try:
      self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                         item_handlers=handlers)
    except Exception as e:  # noqa: BLE001 - anything Orbax raises becomes a CheckpointError
      raise CheckpointError(self.directory,
                            f"cannot open the checkpoint directory: {_describe(e)}") from e

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
    checksums.write(step_dir, items, empty)

  def save(self, step: int, *, params, opt_state, data_state: dict, meta: dict,
           g_lm=None, force: bool = False) -> bool:
    """Save one checkpoint; returns whether a save was started.

    A step not after the latest saved one is skipped (False) unless `force`; an
    existing step is never overwritten. data_state (this process's) and meta
    must be JSON-ready dicts (dataclasses, tuples, NumPy scalars and paths are
    converted); `meta['step']` is set. g_lm: an optional pytree for `load_g_lm`.
    An error of a background write is raised by `wait_until_finished` or the next save.
    """
    self._check_open()
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise CheckpointError(self.directory, f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    for name, value in ((DATA_STATE, data_state), (META, meta)):
      if not isinstance(value, Mapping):
        raise CheckpointError(self.directory,
                              f"{name} must be a dict, got {type(value).__name__}")
    data_json, meta_json = _to_json(data_state, DATA_STATE), _to_json(meta, META)
    if meta_json.setdefault("step", step) != step:
      raise CheckpointError(self.directory,
                            f"meta['step']={meta_json['step']!r} differs from step={step}")
    if not force and not self._mngr.should_save(step):
      return False  # not after the latest saved step: skip before any work
    if not jax.tree.leaves(params):
      raise CheckpointError(self.directory, "params has no arrays")
    data = {_PER_PROCESS: distributed.gather_json(data_json)}  # each process's own position
    items = {DATA_STATE: ocp.args.JsonSave(data), META: ocp.args.JsonSave(meta_json)}
    empty = []  # e.g. optax.sgd's EmptyState(): Orbax cannot save a tree without arrays
    for name, tree, save_args in ((PARAMS, params, ocp.args.StandardSave),
                                  (OPT_STATE, opt_state, ocp.args.StandardSave),
                                  (G_LM, g_lm, ocp.args.PyTreeSave)):
      if name == G_LM and g_lm is None:
        continue
      if jax.tree.leaves(tree):
        items[name] = save_args(tree)
      else:
        empty.append(name)
    try:
      paths.as_path(self.directory).mkdir(parents=True, exist_ok=True)
      self._mngr.wait_until_finished()  # the previous save's callback has run
      self._pending = (step, sorted(items), empty)
      started = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(os.path.join(self.directory, str(step)),
                            f"step {step} already exists; not overwritten") from e
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self.directory, f"saving step {step} failed: {_describe(e)}") from e
    if not self.async_save:
      self.wait_until_finished()
    return started

  def wait_until_finished(self) -> None:
    """Block until the background save (if any) is on disk; raises its error if it failed."""
    if self._closed:
      return
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self.directory, f"a background save failed: {_describe(e)}") from e

  def close(self) -> None:
    """Finish pending saves and deletions, then release Orbax's threads. Idempotent."""
    if self._closed:
      return
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
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _restore(self, step, abstract: dict, also=()):
    """Verify the files, check the abstract trees against Orbax's metadata, restore.

    An item saved without arrays is not read: it comes back as its abstract tree.
    """
    self._check_open()
    self.wait_until_finished()  # our own newest save must be on disk first
    step, step_dir = _step_dir(self.directory, step)
    record = checksums.read(step_dir)
    empty = set((record or {}).get("empty_items", []))
    for item, tree in abstract.items():
      if tree is None:
        raise CheckpointError(step_dir, f"abstract_{item} is required (see abstract_like)")
      if item in empty and jax.tree.leaves(tree):
        raise CheckpointMismatch(os.path.join(step_dir, item), f"the abstract '{item}' tree "
                                 f"does not match the checkpoint: '{item}' was saved without "
                                 f"arrays but the abstract tree has {_listed(_flat(tree))}")
    stored = {k: v for k, v in abstract.items() if k not in empty}
    _require_items(step_dir, [*stored, *also])
    checksums.verify(step_dir, record, [*stored, *also])
    try:
      metadata = self._mngr.item_metadata(step)
      metadata = {k: metadata[k] for k in stored}
      if none := [k for k, m in metadata.items() if m is None]:
        raise ValueError(f"no metadata for item(s) {none}")
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorrupt(step_dir, f"checkpoint is corrupt or unreadable: cannot read its "
                                        f"metadata: {_describe(e)}") from e
    for item, tree in stored.items():
      _check_layout(os.path.join(step_dir, item), item, metadata[item], tree)
    args = {k: ocp.args.StandardRestore(v) for k, v in stored.items()}
    args.update({k: ocp.args.JsonRestore() for k in also})
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # noqa: BLE001
      raise CheckpointCorrupt(step_dir, f"checkpoint is corrupt or unreadable: "
                                        f"{_describe(e)}") from e
    return step, step_dir, {**abstract, **{k: out[k] for k in (*stored, *also)}}

  def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state) -> dict:
    """The whole training state of `step` (the latest finished one when None):
    {'params', 'opt_state', 'data_state', 'meta', 'step'}. data_state is this
    process's (None, warned, if the number of processes changed)."""
    abstract = {PARAMS: abstract_params, OPT_STATE: abstract_opt_state}
    step, step_dir, out = self._restore(step, abstract, also=(DATA_STATE, META))
    data = out[DATA_STATE]
    if isinstance(data, dict) and set(data) == {_PER_PROCESS}:
      states = data[_PER_PROCESS]
      if len(states) != jax.process_count():
        log.warning(
            "%s: the data position was saved by %d process(es) but %d are running; each "
            "reads another shard now, so the data iterators start from the beginning",
            step_dir, len(states), jax.process_count())
      data = states[jax.process_index()] if len(states) == jax.process_count() else None
    return {"params": out[PARAMS], "opt_state": out[OPT_STATE], "data_state": data,
            "meta": out[META], "step": step}

  def restore_params(self, step: int | None = None, *, abstract_params):
    """Only the parameters (for generation/eval: no optimizer state needed)."""
    return self._restore(step, {PARAMS: abstract_params})[2][PARAMS]


def load_meta(directory, step: int | None = None) -> dict:
  """The 'meta' JSON of a checkpoint (latest finished step when None), with 'step':
  the config, read before building any abstract tree."""
  step, step_dir = _step_dir(os.fspath(paths.as_path(directory)), step)
  _require_items(step_dir, [META])
  path = os.path.join(step_dir, META)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      meta = c.restore(path, args=ocp.args.JsonRestore())
  except Exception as e:  # noqa: BLE001
    raise CheckpointCorrupt(path, f"checkpoint is corrupt: cannot read item 'meta': "
                                  f"{_describe(e)}") from e
  if not isinstance(meta, dict):
    raise CheckpointCorrupt(path, "checkpoint is corrupt: meta is not a JSON object")
  return meta


def load_g_lm(directory, step: int | None = None):
  """The 'g_lm' item alone, as NumPy arrays in the structure it was saved in."""
  step, step_dir = _step_dir(os.fspath(paths.as_path(directory)), step)
  item_dir = os.path.join(step_dir, G_LM)
  record = checksums.read(step_dir)
  if not paths.as_path(item_dir).is_dir():
    raise CheckpointMismatch(item_dir, f"step {step} was saved with a g_lm that holds no arrays"
                             if G_LM in (record or {}).get("empty_items", []) else
                             f"step {step} has no g_lm item (saved with g_lm=None)")
  checksums.verify(step_dir, record, [G_LM])
  try:
    tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                getattr(tree, "tree", tree))
    with ocp.PyTreeCheckpointer() as c:
      return c.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001
    raise CheckpointCorrupt(item_dir,
                            f"checkpoint is corrupt: cannot read g_lm: {_describe(e)}") from e

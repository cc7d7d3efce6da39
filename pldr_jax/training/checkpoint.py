"""Pretraining checkpoints with Orbax: params, optimizer, data position, G_LM.

One checkpoint per step, `<directory>/<step>/`, written by an Orbax
`CheckpointManager` as separate items (`args.Composite`):

  params       parameter pytree (StandardSave; nested dicts and lists)
  opt_state    optax state pytree (StandardSave; namedtuples come back as such
               because restores go into an abstract tree of the same structure)
  data_state   JSON: every process's data iterator `get_state()` (each host
               reads its own shard and gets its own position back)
  meta         JSON: `step`, the config as a dict, anything else the caller adds
  g_lm         (optional) frozen G_LM tensors, e.g. {'G_LM': [L, H, dk, dk]};
               readable alone with `load_g_lm` without knowing any other structure
  checksums.json  a plain file: size and CRC-32 of every file of every item,
               and the items saved without arrays

Integrity. Structure, shapes and dtypes are checked against Orbax's own item
metadata (naming the key paths that differ). Orbax and TensorStore checksum
their indexes and OCDBT nodes but not the zstd-compressed chunks, so a flipped
byte in the data can decode to wrong values silently: the checksums cover that.
They are computed by process 0 from the files themselves, once Orbax has
finalised them (its post-finalisation callback, in the background, inside the
still temporary step directory, so a finished step always has them). No device
code and no collectives: every process verifies the same files and gets the
same answer, whatever the mesh or the number of processes, at save or restore.

Saves are asynchronous by default (the device-to-host copy blocks, the writes
run in the background) and keep the newest `keep` checkpoints. Orbax writes each
step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save
cut short by a crash leaves only that tmp directory, which `all_steps`,
`latest_step` and the restores ignore (and which Orbax replaces when the step is
saved again).

Restores go into abstract trees (`abstract_like`): every array lands with the
dtype and sharding asked for. Every failure is a `CheckpointError` naming the
path and the reason; restoring never writes, renames or deletes anything on
disk, so an older checkpoint stays usable after a newer one fails to load.

    ckpt = Checkpointer("runs/a/ckpt", keep=3)
    ckpt.save(step, params=params, opt_state=opt_state,
              data_state=it.get_state(), meta={"config": config})
    ...
    abstract_p = abstract_like(params, param_shardings(config, mesh))
    abstract_o = abstract_like(opt_state)          # from a freshly built state
    r = ckpt.restore(abstract_params=abstract_p, abstract_opt_state=abstract_o)
    params, opt_state, step = r["params"], r["opt_state"], r["step"]
    ckpt.close()

    # generation/eval: the config first, then only the parameters
    cfg = PLDRConfig(**load_meta(directory)["config"])
    params = Checkpointer(directory).restore_params(abstract_params=...)
    g = load_g_lm(directory)["G_LM"]               # fixed-G runs

Paths are local directories or object storage (`gs://bucket/run/checkpoints`;
with several hosts, a place every host sees): the step listing and the checks
go through `etils.epath`, the arrays through Orbax and TensorStore. On object
storage Orbax finalises a step in place (a `commit_success.txt` marks it
finished) instead of renaming a tmp directory; the checksums are written
before that marker.
"""

from __future__ import annotations

import dataclasses
import json
import re
import logging
import os
import threading
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from pldr_jax.training import distributed
from pldr_jax import errors, paths

__all__ = ["CheckpointError", "Checkpointer", "abstract_like", "load_g_lm", "load_meta"]

log = logging.getLogger(__name__)

PARAMS, OPT_STATE, DATA_STATE, META, G_LM = "params", "opt_state", "data_state", "meta", "g_lm"
CHECKSUMS = "checksums.json"  # a file beside the items, not an Orbax item
_FORMAT = "pldr_jax.training.checkpoint/2"
_CHECKSUM = "crc32-per-file"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of an unfinished save
_PER_PROCESS = "per_process"  # data_state item: {"per_process": [state of process 0, ...]}
_BLOCK = 1 << 24
_MAX_LISTED = 8


CheckpointError = errors.CheckpointError  # (path, reason); the one error hierarchy: pldr_jax.errors


# ---------------------------------------------------------------- abstract trees

def abstract_like(tree, shardings=None):
  """A tree of `jax.ShapeDtypeStruct` to restore into.

  tree: arrays (jax or numpy) or ShapeDtypeStructs, e.g. live params, or
    `jax.eval_shape(optimizer.init, params)`. Non-array leaves (Python scalars)
    are kept as they are; None subtrees stay None.
  shardings: None (a jax.Array or ShapeDtypeStruct leaf keeps its own
    sharding; NumPy leaves and ShapeDtypeStructs without one get the default
    device, so every array is restored as a jax.Array), one
    `jax.sharding.Sharding` for every leaf, or a tree whose structure is a
    prefix of `tree` (e.g. `params.param_shardings(config, mesh)`), with None
    where the leaf's own sharding should be kept.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct):
      shape, dtype, own = x.shape, x.dtype, x.sharding
    elif isinstance(x, jax.Array):
      shape, dtype, own = x.shape, x.dtype, x.sharding
    elif isinstance(x, (np.ndarray, np.generic)):
      shape, dtype, own = x.shape, x.dtype, None
    else:
      return x
    sharding = sharding if sharding is not None else own if own is not None else default
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  if shardings is None or isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: one(x, shardings), tree)
  is_sharding = lambda s: s is None or isinstance(s, jax.sharding.Sharding)
  try:
    return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: one(x, s), sub),
                        shardings, tree, is_leaf=is_sharding)
  except ValueError as e:
    raise ValueError(f"shardings do not match the tree's structure: {e}") from e


# ---------------------------------------------------------------- key paths

def _key_str(k) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path) -> str:
  return "/".join(_key_str(k) for k in path) or "<root>"


def _flat(tree) -> dict[str, Any]:
  """{'layers/0/wq/kernel': leaf} (dict keys, list indices and namedtuple fields)."""
  return {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listed(paths) -> str:
  paths = sorted(paths)
  more = f" ... and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
  return ", ".join(paths[:_MAX_LISTED]) + more


# ---------------------------------------------------------------- checksums

def _item_files(item_dir: str) -> list[str]:
  """Every file under an item directory, as sorted paths relative to it."""
  root = _path(item_dir)
  out, todo = [], [root]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        out.append(os.fspath(child)[len(os.fspath(root)):].lstrip("/"))
  return sorted(out)


def _file_crc32(path: str) -> tuple[int, int]:
  """(size, CRC-32) of a file, read in blocks."""
  crc, size = 0, 0
  with _path(path).open("rb") as f:
    while block := f.read(_BLOCK):
      crc = zlib.crc32(block, crc)
      size += len(block)
  return size, crc


def _item_checksums(item_dir: str) -> dict[str, list[int]]:
  """{relative path: [size, crc32]} of every file of one item."""
  return {rel: list(_file_crc32(os.path.join(item_dir, rel))) for rel in _item_files(item_dir)}


def _write_checksums(step_dir: str, items, empty_items) -> None:
  """The checksum record of a finished (not yet renamed) step directory."""
  record = {"format": _FORMAT, "checksum": _CHECKSUM, "empty_items": sorted(empty_items),
            "items": {k: _item_checksums(os.path.join(step_dir, k)) for k in sorted(items)}}
  _write_atomic(os.path.join(step_dir, CHECKSUMS), json.dumps(record))


def _read_checksums(step_dir: str) -> dict | None:
  """The checksum record, or None (with a warning) for a checkpoint written without one."""
  path = os.path.join(step_dir, CHECKSUMS)
  if not _path(path).exists():
    log.warning("%s has no %s: abstract trees are checked against Orbax's metadata but the "
                "files are not verified", step_dir, CHECKSUMS)
    return None
  try:
    record = json.loads(_path(path).read_text())
  except (OSError, ValueError) as e:
    raise CheckpointError(path, f"checkpoint is corrupt: bad checksum file: {_describe(e)}") from e
  if (not isinstance(record, dict) or record.get("format") != _FORMAT
      or record.get("checksum") != _CHECKSUM or not isinstance(record.get("items"), dict)
      or not isinstance(record.get("empty_items"), list)):
    raise CheckpointError(path, "checkpoint is corrupt or from an unknown version: "
                                "bad checksum file")
  return record


def _verify_files(step_dir: str, record: dict | None, items) -> None:
  """Every file of `items` against the record written at save time (all processes alike)."""
  if record is None:
    return
  for item in items:
    want = record["items"].get(item)
    if want is None:
      continue  # saved without arrays, or not an item of this step
    item_dir = os.path.join(step_dir, item)
    missing = [rel for rel in want if not _path(os.path.join(item_dir, rel)).is_file()]
    if missing:
      raise CheckpointError(item_dir, f"checkpoint is corrupt or unreadable: file(s) of item "
                                      f"'{item}' missing: {_listed(missing)}")
    bad = [rel for rel, (size, crc) in want.items()
           if _file_crc32(os.path.join(item_dir, rel)) != (size, crc)]
    if bad:
      raise CheckpointError(item_dir, f"checkpoint is corrupt or unreadable: file(s) of item "
                                      f"'{item}' differ from the checksums written at save "
                                      f"time: {_listed(bad)}")


# ---------------------------------------------------------------- JSON items

def _to_json(x, where: str):
  """JSON-ready copy of x; raises CheckpointError naming the key path of anything else."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    x = {f.name: getattr(x, f.name) for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    out = {}
    for k, v in x.items():
      if not isinstance(k, str):
        raise CheckpointError(where, f"JSON keys must be strings; got {k!r} in {where}")
      out[k] = _to_json(v, f"{where}/{k}")
    return out
  if isinstance(x, (list, tuple)):
    return [_to_json(v, f"{where}/{i}") for i, v in enumerate(x)]
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  if isinstance(x, os.PathLike):
    return os.fspath(x)
  raise CheckpointError(
      where, f"{where} = {type(x).__name__} is not JSON-serialisable (arrays belong in "
      "params/opt_state/g_lm)")


# ---------------------------------------------------------------- directory helpers

def _path(path) -> epath.Path:
  """A local path or a URL (`gs://...`) as an epath.Path."""
  return paths.as_path(path)


def _write_atomic(path: str, text: str) -> None:
  """A whole file at once: locally through a renamed tmp file; an object is
  replaced whole by its upload."""
  if paths.is_remote(path):
    _path(path).write_text(text)
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _steps_on_disk(directory: str) -> list[int]:
  if not _path(directory).is_dir():
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(_path(directory)))


def _unfinished(directory: str) -> list[str]:
  if not _path(directory).is_dir():
    return []
  return sorted(p.name for p in _path(directory).iterdir() if _TMP_SUFFIX in p.name)


def _resolve_step(directory: str, step: int | None) -> int:
  """The step to read (the latest finished one when None), or a CheckpointError."""
  if not _path(directory).exists():
    raise CheckpointError(directory, "cannot restore: the checkpoint directory does not exist")
  if not _path(directory).is_dir():
    raise CheckpointError(directory, "cannot restore: not a directory")
  steps = _steps_on_disk(directory)
  tmp = _unfinished(directory)
  tmp_note = (f"; unfinished saves (ignored): {_listed(tmp)}" if tmp else "")
  if not steps:
    raise CheckpointError(directory,
                          f"cannot restore: no finished checkpoints in the directory{tmp_note}")
  if step is None:
    return steps[-1]
  if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
    raise CheckpointError(directory, f"step must be an integer, got {step!r}")
  step = int(step)
  if step not in steps:
    raise CheckpointError(
        directory, f"cannot restore: step {step} not found; available steps: {steps}{tmp_note}")
  return step


def _items_present(step_dir: str) -> set[str]:
  try:
    return {p.name for p in _path(step_dir).iterdir() if p.is_dir()}
  except OSError as e:
    raise CheckpointError(step_dir, f"cannot list the checkpoint: {e}") from e


def _require_items(step_dir: str, names) -> None:
  missing = [n for n in names if n not in _items_present(step_dir)]
  if missing:
    raise CheckpointError(step_dir,
                          f"checkpoint is incomplete or corrupt: item(s) {missing} missing")


def _describe(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
  return first[:500]


def _layout_from_metadata(metadata_tree) -> dict[str, tuple]:
  """{key path: (shape, dtype)} from Orbax's own item metadata."""
  return {k: (tuple(m.shape) if getattr(m, "shape", None) is not None else None,
              getattr(m, "dtype", None)) for k, m in _flat(metadata_tree).items()}


def _check_layout(item_dir: str, item: str, saved: dict[str, tuple], abstract) -> None:
  """Structure, shape and dtype of `abstract` against what was saved; names key paths."""
  want = _flat(abstract)
  missing = set(want) - set(saved)
  extra = set(saved) - set(want)
  problems = []
  if missing:
    problems.append(f"not in the checkpoint: {_listed(missing)}")
  if extra:
    problems.append(f"in the checkpoint but not in the abstract tree: {_listed(extra)}")
  shapes, dtypes = [], []
  for k in sorted(set(saved) & set(want)):
    (s_shape, s_dtype), w = saved[k], want[k]
    if not (hasattr(w, "shape") and hasattr(w, "dtype")):
      continue
    if s_shape is not None and tuple(s_shape) != tuple(w.shape):
      shapes.append(f"{k} saved {tuple(s_shape)} vs requested {tuple(w.shape)}")
    elif s_dtype is not None and jnp.dtype(s_dtype) != jnp.dtype(w.dtype):
      dtypes.append(f"{k} saved {jnp.dtype(s_dtype).name} vs requested {jnp.dtype(w.dtype).name}")
  if shapes:
    problems.append("shape mismatch at " + "; ".join(shapes[:_MAX_LISTED]))
  if dtypes:
    problems.append("dtype mismatch at " + "; ".join(dtypes[:_MAX_LISTED])
                    + " (restore in the saved dtype and cast afterwards)")
  if problems:
    raise CheckpointError(
        item_dir,
        f"the abstract '{item}' tree does not match the checkpoint: " + "; ".join(problems))


def _legacy_layers(saved: dict[str, tuple], abstract) -> int | None:
  """L when the checkpoint holds layers as a list ('layers/0/...', written
  before layers were stacked) and `abstract` asks for stacked layers, else None."""
  idx = {int(m.group(1)) for k in saved if (m := re.search(r"(?:^|/)layers/(\d+)/", k))}
  stacked = any(re.search(r"(?:^|/)layers/[^0-9]", k) for k in _flat(abstract))
  return max(idx) + 1 if idx and stacked else None


def _per_layer_abstract(tree, n: int):
  """An abstract tree with stacked layers -> the same with a list of n per-layer
  trees (each ShapeDtypeStruct without its [L] axis, sharding likewise)."""
  def drop(x):
    sh = x.sharding
    if isinstance(sh, jax.sharding.NamedSharding):
      sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)

  from pldr_jax.params import map_layers
  return map_layers(tree, lambda v: [jax.tree.map(drop, v)] * n if isinstance(v, dict) else v)


def _as_requested(restored, read_as, abstract):
  """A tree restored per layer from an older checkpoint -> stacked, with the
  requested shardings; anything else unchanged."""
  if read_as is abstract:
    return restored
  from pldr_jax.params import stack_layers
  place = lambda a, s: (jax.device_put(a, s.sharding)
                       if getattr(s, "sharding", None) is not None else a)
  return jax.tree.map(place, stack_layers(restored), abstract)


# ---------------------------------------------------------------- Checkpointer

def _handlers() -> dict:
  return {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
          G_LM: ocp.PyTreeCheckpointHandler(), DATA_STATE: ocp.JsonCheckpointHandler(),
          META: ocp.JsonCheckpointHandler()}


def _manager_options(keep: int | None, on_finalized) -> ocp.CheckpointManagerOptions:
  """Always asynchronous (a synchronous save is save + wait): the checksums are written by
  Orbax's post-finalisation callback, inside the step's tmp directory, before its rename."""
  common = dict(create=False, enable_async_checkpointing=True, cleanup_tmp_directories=False,
                async_options=ocp.AsyncOptions(post_finalization_callback=on_finalized))
  if keep is None:
    return ocp.CheckpointManagerOptions(**common)  # Orbax's default keeps everything
  policies = getattr(ocp, "checkpoint_managers", None)
  if policies is not None and hasattr(policies, "LatestN"):  # max_to_keep is deprecated
    return ocp.CheckpointManagerOptions(preservation_policy=policies.LatestN(n=keep), **common)
  return ocp.CheckpointManagerOptions(max_to_keep=keep, **common)  # older Orbax


def _pack_data_state(states: list) -> dict:
  """The data_state item: one iterator state per process (each reads its own shard)."""
  return {_PER_PROCESS: list(states)}


def _unpack_data_state(item, where: str):
  """This process's iterator state, or None (warned) when the process count changed."""
  if not (isinstance(item, dict) and set(item) == {_PER_PROCESS}):
    return item  # written by one process before per-process states existed
  states = item[_PER_PROCESS]
  if len(states) != jax.process_count():
    log.warning("%s: the data position was saved by %d process(es) but %d are running; each "
                "reads another shard now, so the data iterators start from the beginning",
                where, len(states), jax.process_count())
    return None
  return states[jax.process_index()]


class Checkpointer:
  """Saves and restores training checkpoints in one directory (see module docstring).

  Args:
    directory: where the step directories go; created by the first save (a
      Checkpointer used only to restore creates nothing).
    keep: how many of the newest checkpoints to keep (older ones are deleted
      after a newer save has finished); None keeps all.
    async_save: write in a background thread; `save` returns once the arrays are
      copied to host memory. Call `wait_until_finished()` or `close()` before
      relying on the files.

  Usable as a context manager (`close` on exit). Every process of a run calls
  `save` with the same step (one directory, on a file system all hosts see);
  any number of processes may restore from it.
  """

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    self.directory = os.fspath(paths.as_path(directory))  # local (absolute) or a URL
    self.keep = keep
    self.async_save = async_save
    self._closed = False
    self._pending: tuple[int, list, list] | None = None  # (step, items, empty items)
    self._lock = threading.Lock()
    try:
      self._mngr = ocp.CheckpointManager(
          self.directory, options=_manager_options(keep, self._on_finalized),
          item_handlers=_handlers())
    except Exception as e:  # noqa: BLE001 - anything Orbax raises becomes a CheckpointError
      raise CheckpointError(self.directory,
                            f"cannot open the checkpoint directory: {_describe(e)}") from e

  def _on_finalized(self) -> None:
    """Orbax's post-finalisation callback (background thread, every process): process 0
    writes the checksums of the finished files into the still temporary step directory."""
    with self._lock:
      pending, self._pending = self._pending, None
    if pending is None or jax.process_index() != 0:
      return
    step, items, empty = pending
    step_dir = os.path.join(self.directory, f"{step}{_TMP_SUFFIX}")
    if not _path(step_dir).is_dir():  # object storage: finalised in place
      step_dir = os.path.join(self.directory, str(step))
    _write_checksums(step_dir, items, empty)

  # -- saving --

  def save(self, step: int, *, params, opt_state, data_state: dict, meta: dict,
           g_lm=None, force: bool = False) -> bool:
    """Save one checkpoint; returns whether a save was started.

    step: training step (non-negative int). A step not after the latest saved
      one is skipped (returns False) unless `force`; an existing step is never
      overwritten (CheckpointError).
    params, opt_state: pytrees of arrays (jax or numpy, any sharding).
    data_state: JSON-serialisable dict (this process's data iterator state;
      with several processes each one's is kept and restored to it).
    meta: JSON-serialisable dict; dataclasses (e.g. the PLDRConfig) become
      dicts, numpy scalars Python numbers. `meta['step']` is set to `step`.
    g_lm: optional pytree of the frozen G_LM arrays (fixed-G runs), saved as its
      own item for `load_g_lm`.

    With async_save the files are complete only after `wait_until_finished()`;
    an error from the background write is raised there (or by the next save).
    """
    self._check_open()
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
      raise CheckpointError(self.directory, f"step must be a non-negative integer, got {step!r}")
    step = int(step)
    if not isinstance(data_state, Mapping):
      raise CheckpointError(self.directory,
                            f"data_state must be a dict, got {type(data_state).__name__}")
    if not isinstance(meta, Mapping):
      raise CheckpointError(self.directory, f"meta must be a dict, got {type(meta).__name__}")
    data_json = _to_json(data_state, DATA_STATE)
    meta_json = _to_json(meta, META)
    if "step" in meta_json and meta_json["step"] != step:
      raise CheckpointError(self.directory,
                            f"meta['step']={meta_json['step']!r} differs from step={step}")
    meta_json["step"] = step
    if not force and not self._mngr.should_save(step):
      return False  # not after the latest saved step: skip before any work
    if not jax.tree.leaves(params):
      raise CheckpointError(self.directory, "params has no arrays")
    items = {DATA_STATE: ocp.args.JsonSave(_pack_data_state(distributed.gather_json(data_json))),
             META: ocp.args.JsonSave(meta_json)}
    empty = []
    for name, tree, save_args in ((PARAMS, params, ocp.args.StandardSave),
                                  (OPT_STATE, opt_state, ocp.args.StandardSave),
                                  (G_LM, g_lm, ocp.args.PyTreeSave)):
      if name == G_LM and g_lm is None:
        continue
      if not jax.tree.leaves(tree):  # e.g. optax.sgd's EmptyState(): Orbax cannot save it
        empty.append(name)
        continue
      items[name] = save_args(tree)
    try:
      _path(self.directory).mkdir(parents=True, exist_ok=True)
      self._mngr.wait_until_finished()  # the previous save's callback has run
      with self._lock:
        self._pending = (step, sorted(items), empty)
      started = bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(os.path.join(self.directory, str(step)),
                            f"step {step} already exists; not overwritten") from e
    except CheckpointError:
      raise
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

  # -- listing --

  def all_steps(self) -> list[int]:
    """Steps with a finished checkpoint on disk, ascending (read from the directory,
    so another process's saves show up; a save still in flight does not)."""
    return _steps_on_disk(self.directory)

  def latest_step(self) -> int | None:
    """The newest finished step on disk, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  # -- restoring --

  def _prepare(self, step, abstract: dict, also=()):
    """Resolve the step, verify the files and check the abstract trees against Orbax's metadata.

    also: further items (JSON) whose files are verified. Returns (step, step_dir,
    stored): `stored` are the array items to read; an item saved empty (no
    arrays) is not stored and comes back as its abstract tree.
    """
    self._check_open()
    self.wait_until_finished()  # our own newest save must be on disk first
    step = _resolve_step(self.directory, step)
    step_dir = os.path.join(self.directory, str(step))
    record = _read_checksums(step_dir)
    empty = set((record or {}).get("empty_items", []))
    for item, tree in abstract.items():
      if tree is None:
        raise CheckpointError(step_dir, f"abstract_{item} is required (see abstract_like)")
      if item in empty and jax.tree.leaves(tree):
        raise CheckpointError(
            os.path.join(step_dir, item), f"the abstract '{item}' tree does not match the "
            f"checkpoint: '{item}' was saved without arrays but the abstract tree has "
            f"{_listed(_flat(tree))}")
    stored = {k: v for k, v in abstract.items() if k not in empty}
    _require_items(step_dir, list(stored) + list(also))
    _verify_files(step_dir, record, list(stored) + list(also))
    try:
      metadata = self._mngr.item_metadata(step)
      layouts = {}
      for k in stored:
        m = metadata[k] if k in metadata else None
        if m is None:
          raise ValueError(f"no metadata for item '{k}'")
        layouts[k] = _layout_from_metadata(getattr(m, "tree", m))
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(step_dir, "checkpoint is corrupt or unreadable: cannot read its "
                                      f"metadata: {_describe(e)}") from e
    for item, tree in stored.items():
      n = _legacy_layers(layouts[item], tree)
      if n is not None:  # restored per layer, then stacked (params_lib.stack_layers)
        stored[item] = tree = _per_layer_abstract(tree, n)
      _check_layout(os.path.join(step_dir, item), item, layouts[item], tree)
    return step, step_dir, stored

  def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state) -> dict:
    """Restore a whole training state (the latest finished step when `step` is None).

    abstract_params, abstract_opt_state: trees of ShapeDtypeStruct (see
      `abstract_like`) with the saved structure, shapes and dtypes; each array
      comes back with the requested sharding.
    Returns {'params', 'opt_state', 'data_state', 'meta', 'step'}; data_state is
    this process's (None, with a warning, if the number of processes changed).
    Raises CheckpointError for a missing directory, no checkpoints, an unknown
    step (the message lists the available ones), a corrupt checkpoint, or an
    abstract tree that does not match (the message names the key paths).
    """
    abstract = {PARAMS: abstract_params, OPT_STATE: abstract_opt_state}
    step, step_dir, stored = self._prepare(step, abstract, also=(DATA_STATE, META))
    args = {k: ocp.args.StandardRestore(v) for k, v in stored.items()}
    args.update({DATA_STATE: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()})
    out = self._orbax_restore(step, step_dir, ocp.args.Composite(**args))
    trees = {k: _as_requested(out[k], stored[k], abstract[k]) if k in stored else abstract[k]
             for k in (PARAMS, OPT_STATE)}
    return {"params": trees[PARAMS], "opt_state": trees[OPT_STATE],
            "data_state": _unpack_data_state(out[DATA_STATE], step_dir),
            "meta": out[META], "step": step}

  def restore_params(self, step: int | None = None, *, abstract_params):
    """Only the parameters (for generation/eval: no optimizer state needed)."""
    step, step_dir, stored = self._prepare(step, {PARAMS: abstract_params})
    out = self._orbax_restore(step, step_dir, ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(stored[PARAMS])}))
    return _as_requested(out[PARAMS], stored[PARAMS], abstract_params)

  def _orbax_restore(self, step: int, step_dir: str, args):
    try:
      return self._mngr.restore(step, args=args)
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(step_dir, f"checkpoint is corrupt or unreadable: {_describe(e)}") from e


# ---------------------------------------------------------------- stand-alone readers

def _read_json_item(step_dir: str, item: str):
  path = os.path.join(step_dir, item)
  try:
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as c:
      return c.restore(path, args=ocp.args.JsonRestore())
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(
        path, f"checkpoint is corrupt: cannot read item '{item}': {_describe(e)}") from e


def load_meta(directory, step: int | None = None) -> dict:
  """The 'meta' JSON of a checkpoint (latest finished step when None), with 'step'.

  Needs no array structure: read the config from it before building abstract trees.
  """
  directory = os.fspath(paths.as_path(directory))
  step = _resolve_step(directory, step)
  step_dir = os.path.join(directory, str(step))
  _require_items(step_dir, [META])
  meta = _read_json_item(step_dir, META)
  if not isinstance(meta, dict):
    raise CheckpointError(os.path.join(step_dir, META),
                          "checkpoint is corrupt: meta is not a JSON object")
  return meta


def load_g_lm(directory, step: int | None = None):
  """The 'g_lm' item alone, as NumPy arrays in the structure it was saved in.

  Needs neither the params nor the optimizer structure. Raises CheckpointError
  if the step has no g_lm item (it was saved with g_lm=None) or it is corrupt.
  """
  directory = os.fspath(paths.as_path(directory))
  step = _resolve_step(directory, step)
  step_dir = os.path.join(directory, str(step))
  item_dir = os.path.join(step_dir, G_LM)
  record = _read_checksums(step_dir)
  if G_LM not in _items_present(step_dir):
    if G_LM in (record or {}).get("empty_items", []):
      raise CheckpointError(item_dir, f"step {step} was saved with a g_lm that holds no arrays")
    raise CheckpointError(item_dir, f"step {step} has no g_lm item (saved with g_lm=None)")
  _verify_files(step_dir, record, [G_LM])
  try:
    with ocp.PyTreeCheckpointer() as c:
      meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
      meta = getattr(meta, "item_metadata", meta)  # StepMetadata in some Orbax versions
      tree = getattr(meta, "tree", meta)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return c.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(item_dir,
                          f"checkpoint is corrupt: cannot read g_lm: {_describe(e)}") from e

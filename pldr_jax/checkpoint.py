"""Pretraining checkpoints with Orbax: params, optimizer, data position, G_LM.

One checkpoint per step, `<directory>/<step>/`, written by an Orbax
`CheckpointManager` as separate items (`args.Composite`):

  params       parameter pytree (StandardSave; nested dicts and lists)
  opt_state    optax state pytree (StandardSave; namedtuples come back as such
               because restores go into an abstract tree of the same structure)
  data_state   JSON: the data iterator's `get_state()`
  meta         JSON: `step`, the config as a dict, anything else the caller adds
  g_lm         (optional) frozen G_LM tensors, e.g. {'G_LM': [L, H, dk, dk]};
               readable alone with `load_g_lm` without knowing any other structure
  manifest     JSON: key path, shape, dtype and a 32-bit fingerprint of every
               leaf of params/opt_state/g_lm: restores check the abstract trees
               against it (naming the key paths that differ) and the restored
               data against the fingerprints (zstd chunks carry no checksum)

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

Paths are local (POSIX) directories: the step listing and the item checks use
`os`, not `etils.epath`.
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

__all__ = ["CheckpointError", "Checkpointer", "abstract_like", "load_g_lm", "load_meta"]

log = logging.getLogger(__name__)

PARAMS, OPT_STATE, DATA_STATE, META, G_LM, MANIFEST = (
    "params", "opt_state", "data_state", "meta", "g_lm", "manifest")
_FORMAT = "pldr_jax.checkpoint/1"
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's marker of an unfinished save
_FINGERPRINT = "u32-odd-weighted-sum-v1"  # see _fingerprints
_MAX_LISTED = 8


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or restored.

  Attributes:
    path: the directory or file concerned.
    reason: what went wrong.
  """

  def __init__(self, path, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f"{reason} [checkpoint path: {self.path}]")


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


# ---------------------------------------------------------------- fingerprints

def _words(dtype) -> tuple[Any, int] | None:
  """(unsigned word type, words per element) to read an array's bits, or None."""
  dt = np.dtype(dtype)
  if dt == np.bool_:
    return np.uint8, 1
  known = dt.kind in "fiu" or dt.name == "bfloat16" or dt.name.startswith("float8")
  if not known or dt.itemsize not in (1, 2, 4, 8):
    return None  # complex, int4, strings, ...: not fingerprinted
  return ({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint32}[dt.itemsize],
          2 if dt.itemsize == 8 else 1)


def _as_words(x, xp):
  """The array's bits as uint32 words (xp: jnp or np); 8-byte elements become [..., 2]."""
  word, per = _words(x.dtype)
  if x.dtype == xp.bool_:
    return x.astype(xp.uint32)
  if xp is np:
    flat = np.asarray(x).reshape(-1)  # C order; a copy where x is not contiguous
    return flat.view(word).reshape(x.shape + ((2,) if per == 2 else ())).astype(np.uint32)
  if per == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint32)  # [..., 2], low word first
  return jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)


@jax.jit
def _shard_fingerprint(x, offsets, strides):
  """This shard's part of the fingerprint: offsets/strides place it in the whole array."""
  u = _as_words(x, jnp)
  idx = jnp.zeros(u.shape, jnp.uint32)
  for dim in range(u.ndim):
    idx = idx + (jax.lax.broadcasted_iota(jnp.uint32, u.shape, dim) + offsets[dim]) * strides[dim]
  return jnp.sum(u * (idx * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def _word_strides(shape, dtype) -> tuple[tuple[int, ...], np.ndarray]:
  wshape = tuple(shape) + ((2,) if _words(dtype)[1] == 2 else ())
  strides, acc = [], 1
  for n in reversed(wshape):
    strides.append(acc % 2**32)
    acc *= n
  return wshape, np.asarray(strides[::-1], np.uint32)


def _np_fingerprint(x) -> int:
  u = _as_words(np.asarray(x), np).reshape(-1).astype(np.uint64)
  w = np.arange(u.size, dtype=np.uint64) * np.uint64(2) + np.uint64(1)
  return int(np.sum(u * w, dtype=np.uint64) & np.uint64(0xFFFFFFFF))  # wraps mod 2^64


def _fingerprints(tree) -> dict[str, int]:
  """{key path: fingerprint} of every array leaf.

  fingerprint = sum_i u_i * (2 i + 1) mod 2^32 over the array's bits u as uint32
  words in C order (8-byte elements: low word first). A change to any single
  element changes it (odd weights are invertible mod 2^32). jax arrays are
  fingerprinted shard by shard where they live (no collectives, no gathers) and
  the parts added on the host; NumPy arrays on the host. Same number either way.
  """
  parts: dict[str, list] = {}
  out: dict[str, int] = {}
  for k, v in _flat(tree).items():
    if not hasattr(v, "dtype") or _words(v.dtype) is None:
      continue
    if isinstance(v, jax.Array):
      wshape, strides = _word_strides(v.shape, v.dtype)
      parts[k] = []
      for shard in v.addressable_shards:
        if shard.replica_id != 0:
          continue  # count replicated data once
        offsets = [sl.indices(n)[0] for sl, n in zip(shard.index, v.shape)]
        offsets = np.asarray(offsets + [0] * (len(wshape) - len(offsets)), np.uint32)
        parts[k].append(_shard_fingerprint(shard.data, offsets, strides))
    elif isinstance(v, (np.ndarray, np.generic)):
      out[k] = _np_fingerprint(v)
  host = jax.device_get(parts)
  totals = {k: sum(int(p) for p in ps) % 2**32 for k, ps in host.items()}
  if jax.process_count() > 1 and totals:  # shards with replica_id 0 live on different hosts
    from jax.experimental import multihost_utils
    keys = sorted(totals)
    gathered = np.asarray(multihost_utils.process_allgather(
        np.asarray([totals[k] for k in keys], np.uint32)), np.uint64)
    totals = dict(zip(keys, (int(x) % 2**32 for x in gathered.reshape(-1, len(keys)).sum(0))))
  out.update(totals)
  return out


def _manifest_entries(tree) -> dict[str, dict]:
  """{key path: {'shape', 'dtype', 'fingerprint'}} per array leaf, {'type'} per other leaf."""
  prints = _fingerprints(tree)
  out = {}
  for k, v in _flat(tree).items():
    if hasattr(v, "shape") and hasattr(v, "dtype"):
      out[k] = {"shape": [int(n) for n in v.shape], "dtype": np.dtype(v.dtype).name}
      if k in prints:
        out[k]["fingerprint"] = prints[k]
    else:
      out[k] = {"type": type(v).__name__}
  return out


def _verify(step_dir, item: str, tree, entries: Mapping[str, dict] | None):
  """Fingerprints of the restored `tree` against the manifest's."""
  if not entries:
    return
  got = _fingerprints(tree)
  bad = [k for k, v in got.items() if entries.get(k, {}).get("fingerprint", v) != v]
  if bad:
    raise CheckpointError(
        os.path.join(step_dir, item),
        f"checkpoint is corrupt: item '{item}' restored with data that does not match "
        f"the fingerprints written at save time, at {_listed(bad)}")


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

def _steps_on_disk(directory: str) -> list[int]:
  if not os.path.isdir(directory):
    return []
  return sorted(int(s) for s in ocp.utils.checkpoint_steps(directory))


def _unfinished(directory: str) -> list[str]:
  if not os.path.isdir(directory):
    return []
  return sorted(n for n in os.listdir(directory) if _TMP_SUFFIX in n)


def _resolve_step(directory: str, step: int | None) -> int:
  """The step to read (the latest finished one when None), or a CheckpointError."""
  if not os.path.exists(directory):
    raise CheckpointError(directory, "cannot restore: the checkpoint directory does not exist")
  if not os.path.isdir(directory):
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
    return {n for n in os.listdir(step_dir) if os.path.isdir(os.path.join(step_dir, n))}
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


def _layout_from_manifest(entries: Mapping[str, dict]) -> dict[str, tuple]:
  return {k: (tuple(e["shape"]), e["dtype"]) if "shape" in e else (None, None)
          for k, e in entries.items()}


def _layout_from_metadata(metadata_tree) -> dict[str, tuple]:
  """The same from Orbax's own item metadata (checkpoints without a manifest)."""
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


# ---------------------------------------------------------------- Checkpointer

def _handlers() -> dict:
  return {PARAMS: ocp.StandardCheckpointHandler(), OPT_STATE: ocp.StandardCheckpointHandler(),
          G_LM: ocp.PyTreeCheckpointHandler(), DATA_STATE: ocp.JsonCheckpointHandler(),
          META: ocp.JsonCheckpointHandler(), MANIFEST: ocp.JsonCheckpointHandler()}


def _manager_options(keep: int | None, async_save: bool) -> ocp.CheckpointManagerOptions:
  common = dict(create=False, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=False)
  if keep is None:
    return ocp.CheckpointManagerOptions(**common)  # Orbax's default keeps everything
  policies = getattr(ocp, "checkpoint_managers", None)
  if policies is not None and hasattr(policies, "LatestN"):  # max_to_keep is deprecated
    return ocp.CheckpointManagerOptions(preservation_policy=policies.LatestN(n=keep), **common)
  return ocp.CheckpointManagerOptions(max_to_keep=keep, **common)  # older Orbax


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

  Usable as a context manager (`close` on exit). One process writes a
  directory; any number may read it.
  """

  def __init__(self, directory, *, keep: int | None = 3, async_save: bool = True):
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
      raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    self.directory = os.path.abspath(os.fspath(directory))
    self.keep = keep
    self.async_save = async_save
    self._closed = False
    try:
      self._mngr = ocp.CheckpointManager(
          self.directory, options=_manager_options(keep, async_save), item_handlers=_handlers())
    except Exception as e:  # noqa: BLE001 - anything Orbax raises becomes a CheckpointError
      raise CheckpointError(self.directory,
                            f"cannot open the checkpoint directory: {_describe(e)}") from e

  # -- saving --

  def save(self, step: int, *, params, opt_state, data_state: dict, meta: dict,
           g_lm=None, force: bool = False) -> bool:
    """Save one checkpoint; returns whether a save was started.

    step: training step (non-negative int). A step not after the latest saved
      one is skipped (returns False) unless `force`; an existing step is never
      overwritten (CheckpointError).
    params, opt_state: pytrees of arrays (jax or numpy, any sharding).
    data_state: JSON-serialisable dict (the data iterator's state).
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
    manifest = {"format": _FORMAT, "fingerprint": _FINGERPRINT, "items": {}, "empty_items": []}
    items = {DATA_STATE: ocp.args.JsonSave(data_json), META: ocp.args.JsonSave(meta_json)}
    for name, tree, save_args in ((PARAMS, params, ocp.args.StandardSave),
                                  (OPT_STATE, opt_state, ocp.args.StandardSave),
                                  (G_LM, g_lm, ocp.args.PyTreeSave)):
      if name == G_LM and g_lm is None:
        continue
      if not jax.tree.leaves(tree):  # e.g. optax.sgd's EmptyState(): Orbax cannot save it
        manifest["empty_items"].append(name)
        continue
      manifest["items"][name] = _manifest_entries(tree)
      items[name] = save_args(tree)
    items[MANIFEST] = ocp.args.JsonSave(manifest)
    try:
      os.makedirs(self.directory, exist_ok=True)
      return bool(self._mngr.save(step, args=ocp.args.Composite(**items), force=force))
    except ocp.checkpoint_manager.StepAlreadyExistsError as e:
      raise CheckpointError(os.path.join(self.directory, str(step)),
                            f"step {step} already exists; not overwritten") from e
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001
      raise CheckpointError(self.directory, f"saving step {step} failed: {_describe(e)}") from e

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

  def _prepare(self, step, abstract: dict):
    """Resolve the step and check the abstract trees against the checkpoint.

    Returns (step, step_dir, manifest, stored): `stored` are the items to read;
    an item saved empty (no arrays) is not stored and comes back as its
    abstract tree.
    """
    self._check_open()
    self.wait_until_finished()  # our own newest save must be on disk first
    step = _resolve_step(self.directory, step)
    step_dir = os.path.join(self.directory, str(step))
    manifest = _read_manifest(step_dir)
    empty = set((manifest or {}).get("empty_items", []))
    for item, tree in abstract.items():
      if tree is None:
        raise CheckpointError(step_dir, f"abstract_{item} is required (see abstract_like)")
      if item in empty and jax.tree.leaves(tree):
        raise CheckpointError(
            os.path.join(step_dir, item), f"the abstract '{item}' tree does not match the "
            f"checkpoint: '{item}' was saved without arrays but the abstract tree has "
            f"{_listed(_flat(tree))}")
    stored = {k: v for k, v in abstract.items() if k not in empty}
    _require_items(step_dir, list(stored))
    if manifest is not None:
      layouts = {k: _layout_from_manifest(manifest["items"].get(k, {})) for k in stored}
    else:
      try:
        metadata = self._mngr.item_metadata(step)
        layouts = {}
        for k in stored:
          m = metadata[k] if k in metadata else None
          if m is None:
            raise ValueError(f"no metadata for item '{k}'")
          layouts[k] = _layout_from_metadata(getattr(m, "tree", m))
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(step_dir, "checkpoint is corrupt: cannot read its metadata: "
                                        f"{_describe(e)}") from e
    for item, tree in stored.items():
      _check_layout(os.path.join(step_dir, item), item, layouts[item], tree)
    return step, step_dir, manifest, stored

  def restore(self, step: int | None = None, *, abstract_params, abstract_opt_state) -> dict:
    """Restore a whole training state (the latest finished step when `step` is None).

    abstract_params, abstract_opt_state: trees of ShapeDtypeStruct (see
      `abstract_like`) with the saved structure, shapes and dtypes; each array
      comes back with the requested sharding.
    Returns {'params', 'opt_state', 'data_state', 'meta', 'step'}.
    Raises CheckpointError for a missing directory, no checkpoints, an unknown
    step (the message lists the available ones), a corrupt checkpoint, or an
    abstract tree that does not match (the message names the key paths).
    """
    abstract = {PARAMS: abstract_params, OPT_STATE: abstract_opt_state}
    step, step_dir, manifest, stored = self._prepare(step, abstract)
    _require_items(step_dir, [DATA_STATE, META])
    args = {k: ocp.args.StandardRestore(v) for k, v in stored.items()}
    args.update({DATA_STATE: ocp.args.JsonRestore(), META: ocp.args.JsonRestore()})
    out = self._orbax_restore(step, step_dir, ocp.args.Composite(**args))
    trees = {}
    for item in (PARAMS, OPT_STATE):
      if item in stored:
        trees[item] = out[item]
        _verify(step_dir, item, trees[item], _entries(manifest, item))
      else:
        trees[item] = abstract[item]  # saved without arrays: the structure is the value
    return {"params": trees[PARAMS], "opt_state": trees[OPT_STATE],
            "data_state": out[DATA_STATE], "meta": out[META], "step": step}

  def restore_params(self, step: int | None = None, *, abstract_params):
    """Only the parameters (for generation/eval: no optimizer state needed)."""
    step, step_dir, manifest, _ = self._prepare(step, {PARAMS: abstract_params})
    out = self._orbax_restore(step, step_dir, ocp.args.Composite(
        **{PARAMS: ocp.args.StandardRestore(abstract_params)}))
    _verify(step_dir, PARAMS, out[PARAMS], _entries(manifest, PARAMS))
    return out[PARAMS]

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


def _read_manifest(step_dir: str) -> dict | None:
  """The manifest, or None (with a warning) for a checkpoint written without one."""
  if MANIFEST not in _items_present(step_dir):
    log.warning("%s has no manifest item: abstract trees are checked against Orbax's "
                "metadata and the restored data is not verified", step_dir)
    return None
  manifest = _read_json_item(step_dir, MANIFEST)
  if (not isinstance(manifest, dict) or manifest.get("format") != _FORMAT
      or manifest.get("fingerprint") != _FINGERPRINT
      or not isinstance(manifest.get("items"), dict)):
    raise CheckpointError(os.path.join(step_dir, MANIFEST),
                          "checkpoint is corrupt or from an unknown version: bad manifest")
  return manifest


def _entries(manifest: dict | None, item: str) -> dict | None:
  return None if manifest is None else manifest["items"].get(item)


def load_meta(directory, step: int | None = None) -> dict:
  """The 'meta' JSON of a checkpoint (latest finished step when None), with 'step'.

  Needs no array structure: read the config from it before building abstract trees.
  """
  directory = os.path.abspath(os.fspath(directory))
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
  directory = os.path.abspath(os.fspath(directory))
  step = _resolve_step(directory, step)
  step_dir = os.path.join(directory, str(step))
  item_dir = os.path.join(step_dir, G_LM)
  manifest = _read_manifest(step_dir)
  if G_LM not in _items_present(step_dir):
    if G_LM in (manifest or {}).get("empty_items", []):
      raise CheckpointError(item_dir, f"step {step} was saved with a g_lm that holds no arrays")
    raise CheckpointError(item_dir, f"step {step} has no g_lm item (saved with g_lm=None)")
  try:
    with ocp.PyTreeCheckpointer() as c:
      meta = ocp.PyTreeCheckpointHandler().metadata(epath.Path(item_dir))
      meta = getattr(meta, "item_metadata", meta)  # StepMetadata in some Orbax versions
      tree = getattr(meta, "tree", meta)
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      g = c.restore(item_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(item_dir,
                          f"checkpoint is corrupt: cannot read g_lm: {_describe(e)}") from e
  _verify(step_dir, G_LM, g, _entries(manifest, G_LM))
  return g

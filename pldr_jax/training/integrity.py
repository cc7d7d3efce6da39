"""Checks of a checkpoint step before it is restored (`pldr_jax.training.checkpoint`).

Files: Orbax and TensorStore checksum their indexes and OCDBT nodes but not the
zstd-compressed chunks, so a flipped byte in the data can decode to wrong values
silently. Process 0 records the size and CRC-32 of every file of every item in
`<step>/checksums.json` once Orbax has finalised them (before the step directory
gets its final name); every process verifies the same files at restore
(`CheckpointCorrupt`). Through `etils.epath`: local or `gs://`.

Trees: an abstract tree against Orbax's item metadata (`CheckpointMismatch`
naming the key paths that differ in structure, shape or dtype).
"""

from __future__ import annotations

import json
import logging
import os
import zlib

import jax
import jax.numpy as jnp

from pldr_jax import errors, paths

FILE = "checksums.json"
_FORMAT, _CHECKSUM = "pldr_jax.training.checkpoint/2", "crc32-per-file"
_BLOCK, _MAX_LISTED = 1 << 24, 8

log = logging.getLogger(__name__)


def listed(names) -> str:
  """The first few names, comma-separated, and how many more."""
  names = sorted(names)
  more = f" ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else ""
  return ", ".join(names[:_MAX_LISTED]) + more


def _crc32(path) -> tuple[int, int]:
  crc, size = 0, 0
  with paths.as_path(path).open("rb") as f:
    while block := f.read(_BLOCK):
      crc, size = zlib.crc32(block, crc), size + len(block)
  return size, crc


def write_checksums(step_dir: str, items, empty_items) -> None:
  """The record of a finished step: every file of `items`, and the items saved empty."""
  record = {"format": _FORMAT, "checksum": _CHECKSUM, "empty_items": sorted(empty_items),
            "items": {item: {rel: list(_crc32(f)) for rel, f in
                             sorted(paths._files(paths.as_path(step_dir) / item).items())}
                      for item in sorted(items)}}
  target = paths.as_path(step_dir) / FILE
  if paths.is_remote(target):  # an object appears whole
    target.write_text(json.dumps(record))
  else:
    tmp = target.with_name(FILE + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, target)


def read_checksums(step_dir: str) -> dict | None:
  """The record of a step; None (warned) for a step written without one."""
  path = paths.as_path(step_dir) / FILE
  if not path.exists():
    log.warning("%s has no %s: its files are not verified", step_dir, FILE)
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise errors.CheckpointCorrupt(path, f"checkpoint is corrupt: bad checksum file: {e}") from e
  if (not isinstance(record, dict) or record.get("format") != _FORMAT
      or record.get("checksum") != _CHECKSUM or not isinstance(record.get("items"), dict)
      or not isinstance(record.get("empty_items"), list)):
    raise errors.CheckpointCorrupt(path, "checkpoint is corrupt or from an unknown version: "
                                         "bad checksum file")
  return record


def verify_files(step_dir: str, record: dict | None, items) -> None:
  """Every recorded file of `items` against `record`; CheckpointCorrupt naming them."""
  for item in items if record else ():
    want = record["items"].get(item, {})  # none: saved without arrays
    item_dir = paths.as_path(step_dir) / item
    missing = [rel for rel in want if not (item_dir / rel).is_file()]
    if missing:
      raise errors.CheckpointCorrupt(item_dir, f"checkpoint is incomplete: file(s) of item "
                                               f"'{item}' missing: {listed(missing)}")
    bad = [rel for rel, (size, crc) in want.items() if _crc32(item_dir / rel) != (size, crc)]
    if bad:
      raise errors.CheckpointCorrupt(item_dir, f"checkpoint is corrupt: file(s) of item '{item}' "
                                     f"differ from their checksums at save time: {listed(bad)}")


def flat(tree) -> dict:
  """{'layers/wq/kernel': leaf} (dict keys, list indices and namedtuple fields)."""
  key = lambda k: str(next((getattr(k, a) for a in ("key", "idx", "name") if hasattr(k, a)), k))
  return {"/".join(map(key, p)) or "<root>": x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_layout(item_dir, item: str, metadata, abstract) -> None:
  """Structure, shapes and dtypes of `abstract` against Orbax's metadata of the item."""
  saved, want = flat(getattr(metadata, "tree", metadata)), flat(abstract)
  shapes, dtypes = [], []
  for k in sorted(set(saved) & set(want)):
    s, w = saved[k], want[k]
    if not hasattr(w, "dtype"):
      continue
    if getattr(s, "shape", None) is not None and tuple(s.shape) != tuple(w.shape):
      shapes.append(f"{k} saved {tuple(s.shape)} vs requested {tuple(w.shape)}")
    elif getattr(s, "dtype", None) is not None and jnp.dtype(s.dtype) != jnp.dtype(w.dtype):
      dtypes.append(f"{k} saved {jnp.dtype(s.dtype).name} vs requested {jnp.dtype(w.dtype).name}")
  problems = {"not in the checkpoint:": listed(set(want) - set(saved)),
              "in the checkpoint but not in the abstract tree:": listed(set(saved) - set(want)),
              "shape mismatch at": "; ".join(shapes[:_MAX_LISTED]),
              "dtype mismatch at": dtypes and "; ".join(dtypes[:_MAX_LISTED])
                                   + " (restore in the saved dtype and cast afterwards)"}
  if any(problems.values()):
    raise errors.CheckpointMismatch(
        item_dir, f"the abstract '{item}' tree does not match the checkpoint: "
        + "; ".join(f"{h} {t}" for h, t in problems.items() if t))

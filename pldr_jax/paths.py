"""Paths a user gives (local or object storage) and the paths a run records.

Every path a user gives pldr-jax (run folder, checkpoints, data_dir, tokenizer)
may be a local path or an object-storage URL (`gs://bucket/...`); `as_path`
turns either into an `etils.epath.Path` (gcsfs behind `gs://`), so one code
path serves both.

A run folder is relocatable: the paths a run records in its checkpoint meta
(`DataConfig.data_dir`, `DataConfig.tokenizer_path`) are stored relative to
the run folder when they lie inside it (`record`), and resolved against the
folder where it is opened (`resolve`), whatever the working directory. Paths
outside the run folder are stored absolute (URLs as they are). Runs written
before this stored paths relative to the working directory of the training
(`runs/tiny/data/tokenizer/...`) or absolute; `resolve` still finds them: it
tries the path against the run folder, then as it is, then each shorter tail
of it inside the run folder (`data/tokenizer/...`).
"""

from __future__ import annotations

import os

from etils import epath

__all__ = ["as_path", "is_remote", "record", "resolve", "record_data", "resolve_data",
           "cache_dir", "sync_tree"]

_DATA_PATHS = ("data_dir", "tokenizer_path")


def is_remote(path: str | os.PathLike) -> bool:
  """Whether `path` is a URL (`gs://...`, `s3://...`) rather than a local path."""
  return "://" in os.fspath(path)


def _fresh_listings() -> None:
  """gcsfs caches folder listings per client, so files another writer added
  (TensorStore, another host) would stay unseen: listings are read afresh."""
  import fsspec
  fsspec.config.conf.setdefault("gs", {}).setdefault("use_listings_cache", False)


def as_path(path: str | os.PathLike) -> epath.Path:
  """An `epath.Path` for a local path (made absolute, `~` expanded) or a URL."""
  text = os.fspath(path)
  if is_remote(text):
    _fresh_listings()
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def _text(path: str | os.PathLike) -> str:
  """The normalised absolute text of a path (URLs: no trailing slash)."""
  return os.fspath(as_path(path)).rstrip("/")


def record(path: str | os.PathLike | None, run_dir: str | os.PathLike) -> str | None:
  """How a run stores `path`: relative to `run_dir` when inside it, else absolute.

  record('runs/a/data/tok.model', 'runs/a') == 'data/tok.model';
  record('/data/tfds', 'runs/a') == '/data/tfds'; URLs outside the run unchanged.
  """
  if path is None:
    return None
  full, root = _text(path), _text(run_dir)
  if is_remote(full) != is_remote(root):
    return full
  if full == root:
    return "."
  if full.startswith(root + "/"):
    return full[len(root) + 1:]
  return full


def _tails(path: str) -> list[str]:
  """'a/b/c' -> ['b/c', 'c']: the shorter tails of a recorded path, longest first."""
  parts = [p for p in path.replace("\\", "/").split("/") if p and p != "."]
  if is_remote(path):
    parts = parts[2:]  # drop 'gs:' and the bucket
  return ["/".join(parts[k:]) for k in range(1, len(parts))]


def resolve(path: str | None, run_dir: str | os.PathLike) -> str | None:
  """A recorded path as one that opens from anywhere (see the module docstring).

  New runs: relative to `run_dir`. Older runs: absolute or relative to the
  working directory of the training, found where they are or at the same tail
  inside `run_dir` (the folder was moved). A path found nowhere comes back
  against `run_dir` (relative) or as recorded (absolute), for the caller to
  report.
  """
  if path is None:
    return None
  root = as_path(run_dir)
  if is_remote(path):
    candidates = [path]
  elif os.path.isabs(path):
    candidates = [path]
  else:
    candidates = [os.fspath(root / path), os.path.abspath(path)]
  candidates += [os.fspath(root / tail) for tail in _tails(path)]
  for c in candidates:
    if as_path(c).exists():
      return c
  return candidates[0]


def record_data(data, run_dir):
  """`data` (a DataConfig) with its paths as a run records them (`record`)."""
  return data.replace(**{k: record(getattr(data, k), run_dir) for k in _DATA_PATHS})


def resolve_data(data, run_dir):
  """`data` (a DataConfig read from a run's meta) with its paths resolved (`resolve`)."""
  return data.replace(**{k: resolve(getattr(data, k), run_dir) for k in _DATA_PATHS})


# ---------------------------------------------------------------- local caches

CACHE_ENV = "PLDR_JAX_CACHE"


def cache_dir(key: str | os.PathLike) -> epath.Path:
  """A local folder that caches the object-storage folder `key` (the only local
  writes of a run on object storage): `$PLDR_JAX_CACHE/<bucket/path>`, default
  `~/.cache/pldr_jax`."""
  root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "pldr_jax")
  rel = os.fspath(key).split("://", 1)[-1].strip("/")
  return epath.Path(root) / rel


def _files(root: epath.Path) -> dict[str, epath.Path]:
  """{path relative to root: file} of every file under root."""
  out, todo = {}, [root]
  while todo:
    for child in todo.pop().iterdir():
      if child.is_dir():
        todo.append(child)
      else:
        out[os.fspath(child)[len(os.fspath(root)):].lstrip("/")] = child
  return out


def sync_tree(src, dst, keep=lambda rel: True) -> None:
  """Copy the files under `src` that `dst` lacks (or holds with another size) to
  `dst`; either side local or on object storage. keep(rel) picks the files."""
  src, dst = as_path(src), as_path(dst)
  for rel, f in sorted(_files(src).items()):
    if not keep(rel):
      continue
    target = dst / rel
    if target.exists() and target.stat().length == f.stat().length:
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(target) and is_remote(f):
      f.copy(target, overwrite=True)  # server-side
    elif is_remote(target):
      target.write_bytes(f.read_bytes())  # an object appears whole
    else:  # other processes of this host may read it meanwhile
      tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
      tmp.write_bytes(f.read_bytes())
      os.replace(tmp, target)

"""Plain-text / JSONL corpora on disk, and the embedded default corpus.

A corpus is a folder (or a single file) of documents:

* `*.jsonl` — one JSON object per line; the document is `obj[text_key]`
  (default key "text"). Blank lines are skipped.
* `*.txt`   — the whole file is one document.

A folder is split by file or sub-folder name: `train.jsonl`,
`train-00001-of-00004.jsonl` and `train/*.txt` all belong to split "train";
`validation.jsonl` to "validation". The split name is the file stem up to the
first "-" (or "."), or the sub-folder's name.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pldr_jax.errors import DataError

__all__ = [
    "DEFAULT_CORPUS_DIR",
    "default_corpus_dir",
    "find_split_files",
    "iter_documents",
    "corpus_fingerprint",
]

SUFFIXES = (".jsonl", ".txt")

# data/corpus/ at the root of the repository (two levels above this package).
DEFAULT_CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "corpus"
_CORPUS_ENV = "PLDR_JAX_CORPUS_DIR"


def default_corpus_dir() -> Path:
  """The embedded corpus: $PLDR_JAX_CORPUS_DIR, else `<repo>/data/corpus`."""
  path = Path(os.environ.get(_CORPUS_ENV, DEFAULT_CORPUS_DIR))
  if not (path / "train.jsonl").is_file():
    raise DataError(
        f"embedded corpus not found: {path / 'train.jsonl'} does not exist. "
        f"It ships in the repository's data/corpus/ folder; run from a checkout "
        f"(an editable install) or point ${_CORPUS_ENV} at a copy of it.")
  return path


def _split_of(path: Path) -> str:
  stem = path.name[:-len(path.suffix)] if path.suffix else path.name
  return stem.split("-", 1)[0].split(".", 1)[0]


def find_split_files(corpus: str | os.PathLike) -> dict[str, list[Path]]:
  """Maps split name -> sorted list of document files under `corpus`."""
  root = Path(corpus)
  if not root.exists():
    raise DataError(f"corpus path not found: {root}")
  if root.is_file():
    if root.suffix not in SUFFIXES:
      raise DataError(f"corpus file {root} must end in one of {SUFFIXES}")
    return {_split_of(root): [root]}
  splits: dict[str, list[Path]] = {}
  for entry in sorted(root.iterdir()):
    if entry.is_dir():
      files = sorted(p for p in entry.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
      if files:
        splits.setdefault(entry.name, []).extend(files)
    elif entry.suffix in SUFFIXES:
      splits.setdefault(_split_of(entry), []).append(entry)
  if not splits:
    raise DataError(
        f"corpus folder {root} holds no {'/'.join(SUFFIXES)} files "
        "(expected e.g. train.jsonl and validation.jsonl)")
  return splits


def iter_documents(files: list[Path] | Path, text_key: str = "text") -> Iterator[str]:
  """Yields the documents of the given `.jsonl` / `.txt` files, in order."""
  if isinstance(files, (str, os.PathLike)):
    files = [Path(files)]
  for path in files:
    path = Path(path)
    if not path.is_file():
      raise DataError(f"corpus file not found: {path}")
    if path.suffix == ".txt":
      yield path.read_text(encoding="utf-8")
      continue
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          obj = json.loads(line)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or text_key not in obj:
          raise DataError(
              f"{path}:{lineno}: expected a JSON object with a {text_key!r} field")
        text = obj[text_key]
        if not isinstance(text, str):
          raise DataError(f"{path}:{lineno}: field {text_key!r} is not a string")
        yield text


def corpus_fingerprint(splits: dict[str, list[Path]], text_key: str) -> str:
  """sha256 over the split layout, file contents and text key."""
  h = hashlib.sha256(f"text_key={text_key}\n".encode())
  for split in sorted(splits):
    for path in splits[split]:
      h.update(f"{split}:{path.name}:{path.stat().st_size}\n".encode())
      with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
          h.update(block)
  return h.hexdigest()

"""The per-step metrics log of a run, `<workdir>/metrics.jsonl` (one JSON object a line).

Training lines hold `step`, `loss`, `grad_norm`, ...; evaluation lines hold `step`
and `eval` (loss, perplexity, accuracy, tokens). A resumed run rewrites the steps
after its checkpoint, so for each step the last line wins; a line cut short by a
kill is skipped. Plain JSON and files only: readable without jax.

The run folder may be on object storage (`gs://...`), where a file cannot be
appended to: there the log is kept in memory and the whole object rewritten at
most every `upload_every_s` seconds, at every `sync()` (the trainer calls it
with each checkpoint, so every step up to the newest checkpoint is in the log)
and at `close()`.
"""

from __future__ import annotations

import json
import os
import time

from pldr_jax import paths

__all__ = ["read_metrics", "trim_metrics", "open_metrics"]

NAME = "metrics.jsonl"


def _records(path):
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if isinstance(rec, dict) and "step" in rec:
      yield line, rec


def read_metrics(workdir) -> tuple[dict[int, dict], dict[int, dict]]:
  """({step: train record}, {step: eval metrics}) of a run; empty if it has no log.

  workdir: local or a URL (`gs://...`)."""
  train, evals = {}, {}
  path = paths.as_path(workdir) / NAME
  if not path.is_file():
    return train, evals
  for _, rec in _records(path):
    if "eval" in rec:
      evals[int(rec["step"])] = rec["eval"]
    elif "loss" in rec:
      train[int(rec["step"])] = rec
  return train, evals


def trim_metrics(path, last_step: int) -> None:
  """Keep the records of steps <= last_step (a resume rewrites the later ones); drop
  lines cut short by a kill."""
  path = paths.as_path(path)
  if not path.is_file():
    return
  kept = "".join(line + "\n" for line, rec in _records(path) if int(rec["step"]) <= last_step)
  if paths.is_remote(path):
    path.write_text(kept)  # an object is replaced whole
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(kept)
  os.replace(tmp, path)


class _LocalLog:
  """Appends and flushes every line (a kill loses at most the line being written)."""

  def __init__(self, path):
    self._f = open(path, "a")

  def write(self, text: str) -> None:
    self._f.write(text)

  def flush(self) -> None:
    self._f.flush()

  sync = flush

  def close(self) -> None:
    self._f.close()


class _ObjectLog:
  """Object storage: the whole log rewritten from memory (see the module docstring)."""

  def __init__(self, path, upload_every_s: float):
    self._path = path
    self._text = path.read_text() if path.exists() else ""
    self._every = upload_every_s
    self._uploaded = time.monotonic()
    self._dirty = False

  def write(self, text: str) -> None:
    self._text += text
    self._dirty = True

  def flush(self) -> None:
    if time.monotonic() - self._uploaded >= self._every:
      self.sync()

  def sync(self) -> None:
    if self._dirty:
      self._path.write_text(self._text)
      self._dirty = False
    self._uploaded = time.monotonic()

  def close(self) -> None:
    self.sync()


def open_metrics(path, *, upload_every_s: float = 10.0):
  """The log at `path` opened for appending: `write(text)`, `flush()`, `sync()`, `close()`.

  path: local or a URL. Locally each `flush` reaches the file; on object storage
  `flush` uploads at most every `upload_every_s` seconds and `sync` always."""
  path = paths.as_path(path)
  if paths.is_remote(path):
    return _ObjectLog(path, upload_every_s)
  return _LocalLog(path)

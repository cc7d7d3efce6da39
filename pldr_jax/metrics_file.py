"""The per-step metrics log of a run, `<workdir>/metrics.jsonl` (one JSON object a line).

Training lines hold `step`, `loss`, `grad_norm`, ...; evaluation lines hold `step`
and `eval` (loss, perplexity, accuracy, tokens). A resumed run rewrites the steps
after its checkpoint, so for each step the last line wins; a line cut short by a
kill is skipped. Plain JSON and files only: readable without jax.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["read_metrics", "trim_metrics"]


def _records(path: Path):
  for line in path.read_text().splitlines():
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by a kill
    if isinstance(rec, dict) and "step" in rec:
      yield line, rec


def read_metrics(workdir) -> tuple[dict[int, dict], dict[int, dict]]:
  """({step: train record}, {step: eval metrics}) of a run; empty if it has no log."""
  train, evals = {}, {}
  path = Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return train, evals
  for _, rec in _records(path):
    if "eval" in rec:
      evals[int(rec["step"])] = rec["eval"]
    elif "loss" in rec:
      train[int(rec["step"])] = rec
  return train, evals


def trim_metrics(path: Path, last_step: int) -> None:
  """Keep the records of steps <= last_step (a resume rewrites the later ones); drop
  lines cut short by a kill."""
  path = Path(path)
  if not path.is_file():
    return
  kept = [line for line, rec in _records(path) if int(rec["step"]) <= last_step]
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(k + "\n" for k in kept))
  os.replace(tmp, path)

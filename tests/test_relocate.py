"""Run folders move: a run trained in one place (its data and tokenizer inside it, as
the main command leaves it) is copied elsewhere, the original deleted, and used
from another working directory through `pldr_jax.load`, `perplexity.py`,
`less_eval.py` and `evaluate.py`; runs whose meta holds paths relative to the
training's working directory or absolute (written before relocatable runs) still
open after a move."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pldr_jax
from helpers import load_script, write_tiny_run
from test_pretrain import REPO, SCRIPT, SMALL

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it


@pytest.fixture(scope="module")
def moved(tmp_path_factory):
  """(the moved run folder, its last eval record): trained as `runs/tiny` from its own
  working directory, with the data built inside it; then copied and the original deleted."""
  root = tmp_path_factory.mktemp("relocate")
  (root / "train").mkdir()
  params = SMALL + ["TrainConfig.num_steps=4", "TrainConfig.eval_every=4",
                    "DataConfig.max_eval_batches=1"]
  run = subprocess.run(
      [sys.executable, str(SCRIPT), "--gin_file", str(REPO / "experiments/configs/tiny.gin"),
       "--workdir", "runs/tiny", "--no_progress"] + [f"--gin_param={p}" for p in params],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=root / "train", capture_output=True,
      text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  shutil.copytree(root / "train" / "runs" / "tiny", root / "elsewhere" / "copy")
  shutil.rmtree(root / "train")
  dest = root / "elsewhere" / "copy"
  evals = [json.loads(l)["eval"] for l in (dest / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in l]
  return dest, evals[-1]


@pytest.fixture
def other_cwd(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return cwd


def test_a_moved_run_works_from_another_directory(moved, other_cwd):
  """One test, so that the run is trained once (xdist spreads a module's tests)."""
  from pldr_jax.training import checkpoint as ckpt_lib
  run, last_eval = moved
  data = ckpt_lib.load_meta(run / "checkpoints")["data"]  # what pretrain.py records
  assert data["tokenizer_path"].startswith("data/tokenizer/") and data["data_dir"] == "data/tfds"
  m = pldr_jax.load(run)
  assert m.tokenizer is not None and m.tokenizer.encode("It was")
  assert Path(m.data.data_dir) == run / "data" / "tfds"
  ppl = load_script("experiments/perplexity.py", "pldr_perplexity_moved")
  assert ppl.main(["--checkpoint", str(run), "--max_batches", "1", "--out", "ppl.json"]) == 0
  got = json.loads((other_cwd / "ppl.json").read_text())
  assert got["tokens"] == last_eval["tokens"]
  np.testing.assert_allclose(got["loss"], last_eval["loss"], rtol=1e-6)
  le = load_script("experiments/less_eval.py", "pldr_less_eval_moved")
  assert le.main(["--model_workdir", str(run), "--budgets", "8", "--max_batches", "1",
                  "--out", "le"]) == 0
  rows = json.loads((other_cwd / "le" / "less_eval.json").read_text())["rows"]
  assert any(r["method"] == "full" and np.isfinite(r["perplexity"]) for r in rows)
  _evaluate(run, other_cwd)


def _evaluate(run, cwd):
  """experiments/evaluate.py on the local multiple-choice task (needs the eval extra)."""
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    return
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  tasks = Path(__file__).resolve().parent / "lm_eval_tasks"
  for f in tasks.iterdir():  # the task's data file by absolute path
    text = f.read_text()
    if f.suffix == ".yaml":
      text = text.replace("validation: pldr_tiny_mc.jsonl",
                          f"validation: {tasks / 'pldr_tiny_mc.jsonl'}")
    (cwd / f.name).write_text(text)
  ev = load_script("experiments/evaluate.py", "pldr_evaluate_moved")
  assert ev.main(["--checkpoint", str(run), "--tasks", "pldr_tiny_mc", "--include_path",
                  str(cwd), "--no_default_tasks", "--limit", "2", "--batch_size", "2",
                  "--out", "eval.json"]) == 0
  report = json.loads((cwd / "eval.json").read_text())
  assert 0.0 <= report["g_cache"]["on"]["pldr_tiny_mc"]["acc,none"] <= 1.0


@pytest.mark.parametrize("recorded", ["cwd", "absolute"])
def test_runs_written_before_still_open_after_a_move(tmp_path, monkeypatch, recorded):
  """Older metas: the tokenizer relative to the training's working directory
  (`runs/tiny/data/tokenizer/...`), or absolute; found again inside the moved run."""
  (tmp_path / "train").mkdir()
  monkeypatch.chdir(tmp_path / "train")
  write_tiny_run(Path("runs") / "tiny", recorded=recorded)
  shutil.move(tmp_path / "train" / "runs" / "tiny", tmp_path / "moved")
  (tmp_path / "other").mkdir()
  monkeypatch.chdir(tmp_path / "other")
  m = pldr_jax.load(tmp_path / "moved")
  assert m.tokenizer is not None and m.tokenizer.vocab_size == 32000
  assert Path(m.data.tokenizer_path).is_relative_to(tmp_path / "moved")

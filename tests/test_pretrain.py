"""End to end: experiments/pretrain.py, SIGKILL + resume, NaN stop, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "pretrain.py"

# A model small enough for CI, big enough that a step takes a few ms.
SMALL = [
    "PLDRConfig.vocab_size=512", "PLDRConfig.d_model=32", "PLDRConfig.num_heads=2",
    "PLDRConfig.num_layers=1", "PLDRConfig.d_ff=64", "PLDRConfig.a_dff=16",
    "PLDRConfig.num_res_units=1", "PLDRConfig.max_len=64",
    "DataConfig.vocab_size=512", "DataConfig.seq_len=64", "DataConfig.batch_size=8",
    "DataConfig.num_threads=0", "TrainConfig.warmup_steps=10", "TrainConfig.log_every=1",
    "TrainConfig.eval_every=1000", "TrainConfig.max_eval_batches=1",
    "TrainConfig.checkpoint_every=4", "experiment.samples=0",
]


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("shared_data")


def _cmd(workdir, data_workdir, steps, extra=()):
  params = SMALL + [f"TrainConfig.num_steps={steps}", f"experiment.data_workdir='{data_workdir}'",
                    *extra]
  return [sys.executable, str(SCRIPT), "--gin_file", str(REPO / "experiments/configs/tiny.gin"),
          "--workdir", str(workdir), "--no_progress"] + [f"--gin_param={p}" for p in params]


def _losses(workdir) -> dict[int, float]:
  out = {}
  for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]  # a resumed run rewrites steps after its checkpoint
  return out


def _steps_saved(workdir) -> list[int]:
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_sigkill_then_resume_reproduces_uninterrupted_losses(tmp_path, data_workdir):
  steps = 60
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  full = subprocess.run(_cmd(tmp_path / "full", data_workdir, steps), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=600)
  assert full.returncode == 0, full.stderr[-3000:]
  assert "finished at step 60" in full.stdout

  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_cmd(killed_dir, data_workdir, steps), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if any(s >= 8 for s in _steps_saved(killed_dir)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  kept = _steps_saved(killed_dir)
  assert kept and max(kept) < steps
  resumed = subprocess.run(_cmd(killed_dir, data_workdir, steps), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from" in resumed.stdout
  want, got = _losses(tmp_path / "full"), _losses(killed_dir)
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  for s in want:
    assert got[s] == want[s], f"step {s}: {got[s]} != {want[s]} (killed after step {max(kept)})"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  wd = tmp_path / "nan"
  ok = subprocess.run(_cmd(wd, data_workdir, 8), env=env, cwd=REPO, capture_output=True,
                      text=True, timeout=600)
  assert ok.returncode == 0, ok.stderr[-3000:]
  before = {p.relative_to(wd): p.read_bytes() for p in (wd / "checkpoints" / "8").rglob("*")
            if p.is_file()}
  # Resume with an absurd learning rate: weights overflow float32 and the loss goes NaN.
  bad = subprocess.run(_cmd(wd, data_workdir, 40, ["TrainConfig.learning_rate=1e38"]), env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0
  assert "TrainingError" in bad.stderr and "last good checkpoint (step 8)" in bad.stderr
  assert _steps_saved(wd) == [4, 8] or max(_steps_saved(wd)) == 8
  after = {p.relative_to(wd): p.read_bytes() for p in (wd / "checkpoints" / "8").rglob("*")
           if p.is_file()}
  assert after == before
  # ... and the run resumes from it with a sane learning rate.
  again = subprocess.run(_cmd(wd, data_workdir, 10), env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "resumed from" in again.stdout and "finished at step 10" in again.stdout


@pytest.mark.parametrize("extra, message", [
    (["DataConfig.seq_len=128"], "seq_len=128 is longer than the model's context"),
    (["TrainConfig.mesh_data=3"], "does not fit 1 device"),
    (["experiment.default_corpus_dir='/nonexistent/corpus'"], "/nonexistent/corpus"),
    (["PLDRConfig.d_modle=4"], "doesn't have a parameter named 'd_modle'"),
    (["PLDRConfig.num_heads=5"], "not divisible by num_heads=5"),
])
def test_bad_configs_are_rejected_with_the_reason(tmp_path, data_workdir, extra, message):
  out = subprocess.run(_cmd(tmp_path / "bad", data_workdir, 4, extra),
                       env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert message in out.stderr, out.stderr[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists() or not _steps_saved(tmp_path / "bad")


def test_perplexity_script_reproduces_the_runs_own_eval(tmp_path, data_workdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  wd = tmp_path / "ppl"
  run = subprocess.run(_cmd(wd, data_workdir, 4, ["TrainConfig.eval_every=4"]), env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  evals = [json.loads(l)["eval"] for l in (wd / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in l]
  out = tmp_path / "ppl.json"
  ppl = subprocess.run([sys.executable, str(REPO / "experiments/perplexity.py"), "--checkpoint",
                        str(wd), "--max_batches", "1", "--out", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert ppl.returncode == 0, ppl.stderr[-3000:]
  got = json.loads(out.read_text())
  assert got["step"] == 4 and got["tokens"] == evals[-1]["tokens"]
  np.testing.assert_allclose(got["loss"], evals[-1]["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["perplexity"], np.exp(got["loss"]), rtol=1e-9)

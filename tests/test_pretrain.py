"""End to end: experiments/pretrain.py: NaN stop, bad configs, perplexity, corrupt newest
checkpoint and --restore_step, SIGTERM + resume, full disk."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import compile_cache

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "pretrain.py"

# A model small enough for CI, big enough that a step takes a few ms.
SMALL = [
    "PLDRConfig.vocab_size=512", "PLDRConfig.d_model=32", "PLDRConfig.num_heads=2",
    "PLDRConfig.num_layers=1", "PLDRConfig.d_ff=64", "PLDRConfig.a_dff=16",
    "PLDRConfig.num_res_units=1", "PLDRConfig.max_len=64",
    "DataConfig.vocab_size=512", "DataConfig.seq_len=64", "DataConfig.batch_size=8",
    "DataConfig.num_threads=0", "TrainConfig.warmup_steps=10", "TrainConfig.log_every=1",
    "TrainConfig.eval_every=1000", "DataConfig.max_eval_batches=1",
    "TrainConfig.checkpoint_every=4", "experiment.samples=0",
]


@pytest.fixture(scope="module")
def data_workdir(tmp_path_factory):
  return tmp_path_factory.mktemp("shared_data")


def _env() -> dict:
  """The runs' environment: the CPU, and the compilation cache the end-to-end runs of
  this test process share (tests/compile_cache.py: a resumed run loads the programs
  the first run compiled)."""
  return compile_cache.env()


@pytest.fixture(scope="module")
def run8(tmp_path_factory, data_workdir):
  """One 8-step run (checkpoints at 4 and 8, an eval at its last step), trained once for
  the tests that start from such a run: they copy it (`_copy_run`) or only read it."""
  wd = tmp_path_factory.mktemp("run8") / "run"
  first = subprocess.run(_cmd(wd, data_workdir, 8), env=_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=600)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "finished at step 8" in first.stdout
  return wd


def _copy_run(src: Path, dst: Path) -> Path:
  shutil.copytree(src, dst)
  return dst


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


# A run killed (SIGKILL) mid-way resumes to the uninterrupted run's losses: on 8 devices
# and on 8 devices x FSDP against one device (tests/test_multidevice.py), on two
# processes with one killed (same file). Resumed steps recompute bit-identically on one
# device: the corrupt-checkpoint test below; a SIGTERM stop resumes: the test below and,
# on gs://, tests/test_object_storage.py.


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_workdir, run8):
  env = _env()
  wd = _copy_run(run8, tmp_path / "nan")  # 8 steps, checkpoints at 4 and 8
  before = {p.relative_to(wd): p.read_bytes() for p in (wd / "checkpoints" / "8").rglob("*")
            if p.is_file()}
  # Resume with an absurd learning rate: weights overflow float32 and the loss goes NaN.
  bad = subprocess.run(_cmd(wd, data_workdir, 40, ["TrainConfig.learning_rate=1e38"]), env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0
  err = [l for l in bad.stderr.splitlines() if l.strip()]  # one line (pldr_jax.cli)
  assert len(err) == 1 and err[0].startswith("error: loss is nan"), bad.stderr[-3000:]
  assert "last good checkpoint (step 8)" in err[0]
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
    (["PLDRConfig.attention='cudnn'"], "'cudnn' needs compute_dtype bfloat16"),
])
def test_bad_configs_are_rejected_with_the_reason(tmp_path, data_workdir, extra, message,
                                                  monkeypatch, capsys):
  # In this process, through the entry point's error handling (pldr_jax.cli.run, what
  # `cli.main` exits with): each case fails before any compile, so a fresh interpreter
  # per case would only add its start-up (tests/test_cli_errors.py runs the script).
  pretrain = pretrain_module()
  monkeypatch.setattr(pretrain.host, "retain_freed_memory", lambda: False)  # keep our malloc
  from pldr_jax import cli
  rc = cli.run(pretrain.main, _cmd(tmp_path / "bad", data_workdir, 4, extra)[2:])
  err = capsys.readouterr().err
  assert rc != 0
  assert message in err, err[-2000:]
  assert not (tmp_path / "bad" / "checkpoints").exists() or not _steps_saved(tmp_path / "bad")


def test_perplexity_script_reproduces_the_runs_own_eval(tmp_path, run8):
  env = _env()
  wd = run8  # read only: evaluated at its last step, 8
  evals = [json.loads(l)["eval"] for l in (wd / "metrics.jsonl").read_text().splitlines()
           if '"eval"' in l]
  out = tmp_path / "ppl.json"
  ppl = subprocess.run([sys.executable, str(REPO / "experiments/perplexity.py"), "--checkpoint",
                        str(wd), "--max_batches", "1", "--out", str(out)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert ppl.returncode == 0, ppl.stderr[-3000:]
  got = json.loads(out.read_text())
  assert got["step"] == 8 and got["tokens"] == evals[-1]["tokens"]
  np.testing.assert_allclose(got["loss"], evals[-1]["loss"], rtol=1e-6)
  np.testing.assert_allclose(got["perplexity"], np.exp(got["loss"]), rtol=1e-9)


# ---------------------------------------------------------------- recovery

def pretrain_module():
  """experiments/pretrain.py (the script under test) as a module, loaded once per process."""
  from helpers import load_script
  return load_script("experiments/pretrain.py", "pldr_pretrain_entry", once=True)


def _run(cmd, **kw):
  return subprocess.run(cmd, env=_env(), cwd=REPO,
                        capture_output=True, text=True, timeout=600, **kw)


def _metric_steps(workdir) -> list[int]:
  records = [json.loads(l) for l in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return [r["step"] for r in records if "loss" in r]


def _flip_params_data(step_dir: Path):
  for f in list(step_dir.glob("params/ocdbt.process_*/d/*")) + list(step_dir.glob("params/d/*")):
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def test_corrupt_newest_falls_back_and_restore_step_picks_one(tmp_path, data_workdir, run8):
  wd = _copy_run(run8, tmp_path / "run")  # 8 steps, checkpoints at 4 and 8
  before = _losses(wd)
  _flip_params_data(wd / "checkpoints" / "8")
  again = _run(_cmd(wd, data_workdir, 12))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "checkpoint step 8" in again.stdout and "falling back to step 4" in again.stdout
  assert "resumed from" in again.stdout and "at step 4" in again.stdout
  assert (wd / "checkpoints" / "8.corrupt").is_dir() and _steps_saved(wd) == [4, 8, 12]
  assert _metric_steps(wd) == list(range(1, 13))  # no duplicate steps after the resume
  after = _losses(wd)
  assert all(after[s] == before[s] for s in range(1, 9))  # steps 5-8 recomputed identically
  # --restore_step: back to step 4; the newer checkpoints are set aside, not deleted
  picked = _run(_cmd(wd, data_workdir, 6) + ["--restore_step", "4"])
  assert picked.returncode == 0, picked.stderr[-3000:]
  assert "at step 4" in picked.stdout and "finished at step 6" in picked.stdout
  assert _steps_saved(wd) == [4, 6] and (wd / "checkpoints" / "12.replaced").is_dir()
  assert _metric_steps(wd) == list(range(1, 7))


def test_sigterm_saves_the_current_step_and_resumes(tmp_path, data_workdir):
  wd = tmp_path / "run"
  cmd = _cmd(wd, data_workdir, 400, ["TrainConfig.checkpoint_every=1000"])
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if (wd / "metrics.jsonl").exists() and len(_metric_steps(wd)) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be stopped"
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  saved = _steps_saved(wd)
  assert len(saved) == 1 and 3 <= saved[0] < 400, saved
  assert f"stopped by SIGTERM at step {saved[0]}" in out and "resume with: " in out
  assert _metric_steps(wd) == list(range(1, saved[0] + 1))
  resumed = _run(_cmd(wd, data_workdir, saved[0] + 2))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"at step {saved[0]}" in resumed.stdout
  assert _metric_steps(wd) == list(range(1, saved[0] + 3))


def test_disk_full_is_one_line(monkeypatch, capsys, tmp_path):
  import errno
  from pldr_jax.errors import CheckpointError
  from pldr_jax.training import trainer
  pretrain = pretrain_module()

  def full(*_, **__):
    try:
      raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ckpt" / "x"))
    except OSError as e:
      raise CheckpointError(tmp_path, "a background save failed") from e

  monkeypatch.setattr(trainer, "run_pretraining", full)
  monkeypatch.setattr(pretrain, "resolve_data", lambda run: run["data"])
  from pldr_jax import cli
  rc = cli.run(pretrain.main, ["--gin_file", str(REPO / "experiments/configs/tiny.gin"),
                               "--workdir", str(tmp_path)])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 1 and len(err) == 1 and "disk full" in err[0] and str(tmp_path) in err[0]

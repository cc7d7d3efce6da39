"""One line per error at every entry point (pldr_jax.cli), and Ctrl-C at compile and at eval.

The error rows run the entry points' main() in this process through `cli.run` (what
their `__main__` runs), except where the row needs a real file system state: an
unwritable run folder and a full disk run `experiments/pretrain.py` as a subprocess
on a read-only / 600 KB tmpfs mounted in a user namespace (`unshare -rm`; skipped
where unprivileged user namespaces are off). The Ctrl-C tests send real SIGINTs to a
training subprocess of a small model.
"""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import load_script
from pldr_jax import cli, errors

REPO = Path(__file__).resolve().parents[1]
TINY_GIN = str(REPO / "experiments" / "configs" / "tiny.gin")
TOKENIZER = str(REPO / "data" / "published" / "pldr-refinedweb-32k.model")
SMALL = [
    "PLDRConfig.vocab_size=512", "PLDRConfig.d_model=32", "PLDRConfig.num_heads=2",
    "PLDRConfig.num_layers=1", "PLDRConfig.d_ff=64", "PLDRConfig.a_dff=16",
    "PLDRConfig.num_res_units=1", "PLDRConfig.max_len=64",
    "DataConfig.vocab_size=512", "DataConfig.seq_len=64", "DataConfig.batch_size=8",
    "DataConfig.num_threads=0", "TrainConfig.warmup_steps=10", "TrainConfig.log_every=1",
    "DataConfig.max_eval_batches=1", "experiment.samples=0",
]


def _one_line(err: str, *needles: str) -> str:
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1, err
  assert lines[0].startswith("error: "), lines[0]
  for n in needles:
    assert n in lines[0], (n, lines[0])
  return lines[0]


def _script(relpath: str, name: str):
  import gin
  if relpath.startswith("benchmarks/"):  # a package: its dataclasses need the module name
    import importlib
    return importlib.import_module(relpath.removesuffix(".py").replace("/", "."))
  with gin.unlock_config():  # a parse in an earlier test locked it; a script registers anew
    return load_script(relpath, name, once=True)


def _pretrain():
  return _script("experiments/pretrain.py", "pldr_pretrain_entry")


def _run_in_process(capsys, module, argv) -> tuple[int, str]:
  capsys.readouterr()
  code = cli.run(module.main, argv)
  return code, capsys.readouterr().err


# ---------------------------------------------------------------- the wrapper itself

def test_debug_flag_and_variable_show_the_traceback(monkeypatch, capsys):
  seen = []

  def bad(argv):
    seen.append(argv)
    raise errors.ConfigError("PLDRConfig.d_model=3 is not divisible\n  In call to configurable 'x'")

  monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
  assert cli.run(bad, ["--a", "1"]) == 1
  _one_line(capsys.readouterr().err, "PLDRConfig.d_model=3 is not divisible", "--debug")
  with pytest.raises(errors.ConfigError):
    cli.run(bad, ["--a", "--debug"])
  assert seen[-1] == ["--a"]  # the script never sees --debug
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  with pytest.raises(errors.ConfigError):
    cli.run(bad, [])
  monkeypatch.setenv(cli.DEBUG_ENV, "0")
  with pytest.raises(ZeroDivisionError):  # not a known error: a bug keeps its traceback
    cli.run(lambda argv: 1 / 0, [])


def test_disk_full_noise_is_dropped(capsys):
  """What Orbax does on a full disk: log each failed background write (with its
  traceback) through absl and asyncio, then raise; only the one line is left."""
  write = ("RESOURCE_EXHAUSTED: Error writing local file \"/r/checkpoints/4.orbax-checkpoint-"
           "tmp/x\": No space left on device [os_error_code='28']")

  def full(argv):
    for name in ("absl", "asyncio", ""):
      try:
        raise ValueError(write)
      except ValueError:
        logging.getLogger(name).exception("_SignalingThread.run() raised an exception")
    logging.getLogger("asyncio").error("RuntimeError: Event loop is closed")
    raise errors.CheckpointError(f"saving step 4 failed: ValueError: {write}")

  logging.getLogger("unrelated").error("kept")
  capsys.readouterr()
  assert cli.run(full, []) == 1
  _one_line(capsys.readouterr().err, "disk full", "/r/checkpoints", "run the same command again")


# ---------------------------------------------------------------- the table, pretrain.py

@pytest.mark.parametrize("argv, needles", [
    (["--gin_file", "experiments/configs/tny.gin"],
     ["gin file not found: experiments/configs/tny.gin", "did you mean experiments/configs/tiny.gin"]),
    (["--gin_file", TINY_GIN, "--gin_param=PLDRConfig.d_modle=4"],
     ["doesn't have a parameter named 'd_modle'", "did you mean 'd_model'", "--gin_param"]),
    (["--gin_file", TINY_GIN, "--gin_param=PLDRConfg.d_model=4"],
     ["No configurable matching 'PLDRConfg'", "did you mean 'PLDRConfig'"]),
    (["--gin_file", TINY_GIN, "--gin_param=TrainConfig.num_steps='ten'"],
     ["TrainConfig.num_steps='ten' is not valid", "an integer"]),
])
def test_pretrain_config_errors_are_one_line(capsys, tmp_path, argv, needles):
  code, err = _run_in_process(capsys, _pretrain(), argv + ["--workdir", str(tmp_path / "w")])
  assert code == 1
  _one_line(err, *needles)
  assert not (tmp_path / "w").exists()  # found before the run folder is made


def test_pretrain_workdir_that_is_a_file(capsys, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  for workdir in (f, f / "run"):
    code, err = _run_in_process(capsys, _pretrain(), ["--gin_file", TINY_GIN,
                                                      "--workdir", str(workdir)])
    assert code == 1
    _one_line(err, f"--workdir {workdir} is not a folder")


def test_pretrain_restore_step_that_does_not_exist(capsys, tmp_path):
  for step in (4, 8):  # what Orbax lists as finished steps
    (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
  code, err = _run_in_process(capsys, _pretrain(), [
      "--gin_file", TINY_GIN, "--workdir", str(tmp_path), "--restore_step", "5",
      f"--gin_param=DataConfig.tokenizer_path='{TOKENIZER}'", "--gin_param=DataConfig.vocab_size=32000",
      "--gin_param=PLDRConfig.vocab_size=32000"])
  assert code == 1
  _one_line(err, "no checkpoint of step 5", "saved steps: 4, 8", "--restore_step")


def _userns_mount(options: str, folder: Path, command: list[str], **kw):
  """command run in a user + mount namespace with a tmpfs (`options`) on `folder`."""
  if shutil.which("unshare") is None:
    pytest.skip("no unshare")
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs "
                          f"{folder}"], capture_output=True, text=True)
  if probe.returncode:
    pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
  script = f'mount -t tmpfs -o {options} tmpfs "$0" && exec "$@"'
  return subprocess.run(["unshare", "-rm", "sh", "-c", script, str(folder)] + command, **kw)


def _pretrain_cmd(workdir, data, steps, extra=()):
  params = SMALL + [f"TrainConfig.num_steps={steps}", f"experiment.data_workdir='{data['dir']}'",
                    f"experiment.default_corpus_dir='{data['corpus']}'", *extra]
  return [sys.executable, str(REPO / "experiments" / "pretrain.py"), "--gin_file", TINY_GIN,
          "--workdir", str(workdir), "--no_progress"] + [f"--gin_param={p}" for p in params]


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


@pytest.mark.slow
def test_pretrain_unwritable_run_folder_fails_at_start(tmp_path):
  folder = tmp_path / "ro"
  folder.mkdir()
  cmd = [sys.executable, str(REPO / "experiments" / "pretrain.py"), "--gin_file", TINY_GIN,
         "--workdir", str(folder / "run")]
  t0 = time.time()
  if os.geteuid() != 0:
    folder.chmod(0o555)
    try:
      out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)
    finally:
      folder.chmod(0o755)
  else:  # root writes through permissions: a read-only file system stops it
    out = _userns_mount("ro,size=64k", folder, cmd, env=_env(), capture_output=True, text=True,
                        timeout=120)
  assert out.returncode == 1
  _one_line(out.stderr, f"cannot write to --workdir {folder / 'run'}")
  assert time.time() - t0 < 30  # before any data preparation or compile


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
  """A 30-document corpus (a few seconds to build and tokenize) and a data folder."""
  root = tmp_path_factory.mktemp("cli_data")
  corpus = root / "corpus"
  corpus.mkdir()
  for split, n in (("train", 30), ("validation", 2)):
    lines = (REPO / "data" / "corpus" / f"{split}.jsonl").read_text().splitlines()[:n]
    (corpus / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
  return {"corpus": str(corpus), "dir": str(root / "data")}


@pytest.mark.slow
def test_pretrain_full_disk_is_one_line(tmp_path, small_data):
  """A real ENOSPC: the run folder on a 600 KB tmpfs; the first checkpoint does not fit."""
  mnt = tmp_path / "small_disk"
  mnt.mkdir()
  cmd = _pretrain_cmd(mnt / "run", small_data, 8, ["TrainConfig.checkpoint_every=4",
                                                   "TrainConfig.eval_every=1000"])
  out = _userns_mount("size=600k", mnt, cmd, env=_env(), capture_output=True, text=True,
                      timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  _one_line(out.stderr, "disk full (No space left on device) writing", str(mnt / "run"),
            "run the same command again")


# ---------------------------------------------------------------- the other entry points

def test_other_entry_points_one_line(capsys, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  missing = str(tmp_path / "missing")
  rows = [
      ("experiments/ablate_seeds.py", "pldr_ablate_seeds_entry",
       ["--gin_file", "experiments/configs/ablate_tny.gin", "--out", str(tmp_path / "s")],
       "did you mean experiments/configs/ablate_tiny.gin"),
      ("experiments/train_less.py", "pldr_train_less_entry",
       ["--gin_file", "experiments/configs/less_tiny.gin", "--gin_param=LessTrainConfig.rnak=4"],
       "did you mean 'rank'"),
      ("experiments/train_less.py", "pldr_train_less_entry",
       ["--gin_file", "experiments/configs/less_tiny.gin", "--model_workdir", missing],
       f"--model_workdir {missing} is not a folder"),
      ("experiments/less_eval.py", "pldr_less_eval_entry", ["--model_workdir", missing],
       f"--model_workdir {missing} is not a folder"),
      ("experiments/perplexity.py", "pldr_perplexity_entry", ["--checkpoint", missing],
       f"nothing to load at {missing}"),
      ("experiments/perplexity.py", "pldr_perplexity_entry",
       ["--checkpoint", missing, "--out", str(a_file / "ppl.json")], "is not a folder"),
      ("experiments/evaluate.py", "pldr_evaluate_entry",
       ["--checkpoint", missing, "--out", str(tmp_path)], f"--out {tmp_path} is a folder"),
      ("experiments/analyze_g.py", "pldr_analyze_g_entry", [missing],
       f"G_LM source not found: {missing}"),
      ("benchmarks/run.py", "pldr_bench_run_entry", ["--out", str(a_file)],
       f"--out {a_file} is not a folder"),
  ]
  for relpath, name, argv, needle in rows:
    code, err = _run_in_process(capsys, _script(relpath, name), argv)
    assert code == 1, (relpath, err)
    _one_line(err, needle)
  assert not (tmp_path / "s").exists()


def test_ablate_gin_typo_is_one_line(capsys, tmp_path):
  ablate = _script("experiments/ablate.py", "pldr_ablate_entry")
  old = signal.getsignal(signal.SIGTERM)  # ablate.main stops its children on SIGTERM
  try:
    code, err = _run_in_process(capsys, ablate, [
        "--gin_file", "experiments/configs/ablate_tiny.gin", "--out", str(tmp_path / "a"),
        "--gin_param=TrainConfig.num_step=3"])
  finally:
    signal.signal(signal.SIGTERM, old)
  assert code == 1
  _one_line(err, "named 'num_step'", "did you mean 'num_steps'")
  assert not (tmp_path / "a").exists()


def test_analyze_g_writes_beside_its_source(tmp_path, monkeypatch, capsys):
  import numpy as np
  monkeypatch.chdir(tmp_path)
  run = tmp_path / "runs" / "r"
  run.mkdir(parents=True)
  np.save(run / "g.npy", np.stack([np.eye(4)] * 2)[None])
  analyze = _script("experiments/analyze_g.py", "pldr_analyze_g_entry")
  assert cli.run(analyze.main, ["runs/r/g.npy", "--no_plots"]) == 0
  assert (run / "analysis_g" / "g_metrics.csv").is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing in the cwd
  (run / "checkpoints").mkdir()
  assert analyze.default_out(run) == run.resolve() / "analysis"
  assert analyze.default_out(run / "checkpoints") == run.resolve() / "analysis"


# ---------------------------------------------------------------- small things

def test_save_hf_publishes_the_tokenizer(tmp_path):
  import jax
  import pldr_jax
  from pldr_jax import config, params
  from pldr_jax.compat import hf
  from pldr_jax.data import load_tokenizer
  c = config.tiny(vocab_size=32000, max_len=64)
  p = params.init_params(c, jax.random.key(0))
  hf.save_hf(tmp_path / "hf", p, c, tokenizer=load_tokenizer(TOKENIZER))
  loaded = pldr_jax.load(tmp_path / "hf")
  assert loaded.tokenizer is not None and loaded.tokenizer.encode("It is") == \
      load_tokenizer(TOKENIZER).encode("It is")
  with pytest.raises(errors.CheckpointError, match="tokenizer file not found"):
    hf.save_hf(tmp_path / "hf2", p, c, tokenizer=tmp_path / "none.model")


def test_float_token_ids_are_rejected():
  import jax
  from pldr_jax import config, params
  from pldr_jax.inference import generate
  c = config.tiny()
  p = params.init_params(c, jax.random.key(0))
  with pytest.raises(errors.InputError, match="prompt 0 holds float64 values"):
    generate.generate(p, [[2.0, 5.5]], config=c, max_new_tokens=1)


# ---------------------------------------------------------------- Ctrl-C

def _steps_saved(workdir) -> list[int]:
  d = Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _train_records(workdir) -> list[int]:
  path = Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _wait(cond, proc, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if cond():
      return
    time.sleep(0.02)
  raise AssertionError(f"never happened (exit {proc.poll()})")


@pytest.mark.slow
def test_ctrl_c_at_compile_saves_then_twice_at_eval_aborts(tmp_path, small_data):
  wd = tmp_path / "run"
  cmd = _pretrain_cmd(wd, small_data, 400, ["TrainConfig.checkpoint_every=2",
                                            "TrainConfig.eval_every=4"])
  err_path, out_path = tmp_path / "err1.txt", tmp_path / "out1.txt"
  with open(err_path, "w") as err, open(out_path, "w") as out:
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=out, stderr=err)
    # the log is opened right before the loop: the first step is compiling now
    _wait(lambda: (wd / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    _wait(lambda: "Ctrl-C (SIGINT): the run will save" in err_path.read_text(), proc, 5)
    acked = time.time() - t0
    assert proc.wait(timeout=240) == 0, err_path.read_text()[-3000:]
  assert acked < 2.0
  stderr = err_path.read_text()
  assert ("Ctrl-C (SIGINT): the run will save a checkpoint at the end of the current step, then "
          "stop. Press Ctrl-C again to abort at once without saving.") in stderr.splitlines()
  assert "Traceback" not in stderr
  stdout = out_path.read_text()
  assert "stopped by SIGINT at step 1; checkpoint of step 1" in stdout
  python = stdout.split("resume with: ", 1)[1].split()[0]
  assert Path(python).resolve() == Path(sys.executable).resolve()  # not a bare `python`
  assert _steps_saved(wd) == [1] and _train_records(wd) == [1]

  # resumed; Ctrl-C twice while the first eval runs (compiles): abort without saving
  proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait(lambda: 4 in _train_records(wd), proc)  # step 4's record is written, then its eval
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, output[-3000:]
  saved = _steps_saved(wd)  # step 2's save may still have been in flight: then only 1
  assert saved in ([1], [1, 2]), saved
  aborted = ("Ctrl-C (SIGINT) again: aborted without saving; the newest checkpoint (step "
             f"{saved[-1]} in {wd / 'checkpoints'}) is intact.")
  assert aborted in output, output[-3000:]
  ack, abort = output.index("Ctrl-C (SIGINT): the run will save"), output.index(aborted)
  assert ack < abort and "Traceback" not in output and "stopped by" not in output
  assert "step 4: eval" not in output[:ack]  # the signal came during step 4's eval
  import pldr_jax
  loaded = pldr_jax.load(wd)  # the newest checkpoint restores (checksums verified)
  assert loaded.step == saved[-1]

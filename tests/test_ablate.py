"""experiments/ablate.py: a CI-sized sweep of all five modes; a rerun skips finished runs."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "ablate.py"
MODES = ["learned", "identity", "random", "transferred", "inference_only"]

# As tests/test_pretrain.py's SMALL: tiny model, 8 steps, eval and checkpoint every 4.
SMALL = [
    "PLDRConfig.vocab_size=512", "PLDRConfig.d_model=32", "PLDRConfig.num_heads=2",
    "PLDRConfig.num_layers=1", "PLDRConfig.d_ff=64", "PLDRConfig.a_dff=16",
    "PLDRConfig.num_res_units=1", "PLDRConfig.max_len=64",
    "DataConfig.vocab_size=512", "DataConfig.seq_len=64", "DataConfig.batch_size=8",
    "DataConfig.num_threads=0", "TrainConfig.warmup_steps=4", "TrainConfig.log_every=1",
    "TrainConfig.eval_every=4", "DataConfig.max_eval_batches=1",
    "TrainConfig.checkpoint_every=4", "TrainConfig.num_steps=8",
]


def _ablate_module():
  spec = importlib.util.spec_from_file_location("ablate_under_test", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _sweep(out, data_workdir):
  cmd = [sys.executable, str(SCRIPT), "--gin_file=experiments/configs/ablate_tiny.gin",
         f"--out={out}"] + [f"--gin_param={p}" for p in
                            SMALL + [f"experiment.data_workdir='{data_workdir}'"]]
  t0 = time.time()
  res = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
  return res.stdout, time.time() - t0


def test_sweep_writes_table_and_plot_for_all_modes_and_rerun_skips(tmp_path):
  out = tmp_path / "ablate"
  stdout, _ = _sweep(out, tmp_path / "data")
  with open(out / "ablation.csv") as f:
    table = {r["mode"]: r for r in csv.DictReader(f)}
  assert list(table) == MODES
  doc = json.loads((out / "ablation.json").read_text())
  assert [r["mode"] for r in doc["modes"]] == MODES and doc["num_steps"] == 8
  for row in doc["modes"]:
    assert row["eval_loss"] is not None and 0 < row["eval_loss"] < 20, row
    assert 0 <= row["eval_accuracy"] <= 1 and row["eval_perplexity"] > 1
    if row["mode"] == "inference_only":
      assert row["train_loss"] is None
    else:
      assert row["final_step"] == 8 and row["train_loss"] > 0
  assert (out / "ablation.png").stat().st_size > 10_000
  # transferred got the learned run's G_LM; inference-only its weights and a [START]-only G
  cmd = json.loads((out / "transferred" / "command.json").read_text())
  assert any("experiment.g_source" in c and str(out / "learned" / "checkpoints") in c for c in cmd)
  inf = json.loads((out / "inference_only" / "metrics.json").read_text())
  assert inf["prompt"] == [2] and inf["source_step"] == 8
  assert (out / "inference_only" / "g_lm_prompt.npy").is_file()
  # all runs shared the one data_workdir
  assert not any((out / m / "data").exists() for m in MODES)

  logs = {m: (out / m / "metrics.jsonl").read_text() for m in MODES[:4]}
  stdout2, seconds = _sweep(out, tmp_path / "data")
  assert seconds < 60, f"a rerun with every run finished took {seconds:.0f}s"
  for m in MODES:
    assert f"{m}: " in stdout2 and "skipped" in stdout2.split(f"{m}: ", 1)[1].splitlines()[0]
  assert {m: (out / m / "metrics.jsonl").read_text() for m in MODES[:4]} == logs
  with open(out / "ablation.csv") as f:
    assert [r["mode"] for r in csv.DictReader(f)] == MODES


def test_finished_detection_and_commands(tmp_path):
  ab = _ablate_module()
  wd = tmp_path / "run"
  wd.mkdir()
  assert not ab.is_finished(wd, 8)
  lines = [{"step": s, "loss": 1.0, "accuracy": 0.1} for s in (1, 2, 3)]
  (wd / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + '\n{"step": 8, "lo')
  assert not ab.is_finished(wd, 8)  # cut short by a kill: an unfinished run
  with open(wd / "metrics.jsonl", "a") as f:
    f.write("\n" + json.dumps({"step": 8, "loss": 0.5}) + "\n"
            + json.dumps({"step": 8, "eval": {"loss": 0.7, "perplexity": 2.0, "accuracy": 0.3}}))
  assert ab.is_finished(wd, 8)
  train, evals = ab.read_metrics(wd)
  assert sorted(train) == [1, 2, 3, 8] and evals[8]["loss"] == 0.7

  out = tmp_path / "o"
  cmd = ab.train_command("transferred", ["/x.gin"], ["A.b=1"], out, tmp_path / "d")
  assert cmd[1] == str(ab.PRETRAIN) and f"--workdir={out / 'transferred'}" in cmd
  assert '--gin_param=PLDRConfig.g_mode="transferred"' in cmd
  assert f'--gin_param=experiment.g_source="{out / "learned" / "checkpoints"}"' in cmd
  assert cmd.index("--gin_param=A.b=1") < cmd.index('--gin_param=PLDRConfig.g_mode="transferred"')
  # the same command every time: an unfinished run resumes with it
  assert cmd == ab.train_command("transferred", ["/x.gin"], ["A.b=1"], out, tmp_path / "d")
  assert not any("g_source" in c for c in ab.train_command("identity", [], [], out, tmp_path))


def test_strip_metric_learner_leaves_a_fixed_g_model():
  import jax
  from pldr_jax.config import tiny
  from pldr_jax.params import init_params, param_specs
  ab = _ablate_module()
  learned = init_params(tiny(), jax.random.key(0))
  fixed = tiny(g_mode="transferred")
  stripped = ab.strip_metric_learner(learned, fixed)
  want = jax.tree.structure(param_specs(fixed), is_leaf=lambda x: hasattr(x, "init"))
  assert jax.tree.structure(stripped) == want
  assert stripped["layers"]["wq"]["kernel"] is learned["layers"]["wq"]["kernel"]  # stacked

"""The benchmark suite runs end to end (smoke suite: every section, tiny config).

No timing is asserted (benchmarks are scripts, not timed tests); these tests
check that every section produces well-formed rows, that the byte accounting
behind the bandwidth-floor fractions is right, and that the report is written.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from benchmarks import decode_bench, report, run
from pldr_jax import config as cfg
from pldr_jax.params import init_params
import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it


def test_read_param_bytes_counts_what_a_decode_step_reads():
  c = cfg.tiny()
  params = init_params(c, jax.random.key(0))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  total = sum(x.size * 4 for _, x in leaves)
  embed = params["embed"].size * 4
  plga = sum(x.size * 4 for p, x in leaves
             if any(getattr(k, "key", None) in ("res_units", "ln_a", "plga") for k in p))
  assert plga > 0
  b = 3
  row = b * c.d_model * 4
  # G recomputed: everything but the unused embedding rows.
  assert decode_bench.read_param_bytes(params, c, "kv", b) == total - embed + row
  # With the G-cache the metric learner and power-law tensors are not read.
  assert decode_bench.read_param_bytes(params, c, "kv+g", b) == total - embed + row - plga
  assert decode_bench.read_param_bytes(params, c, "less", b) == total - embed + row - plga


def test_state_memory_full_cache_grows_sparse_does_not():
  small = decode_bench.state_memory("tiny", "kv+g", 1, 128, budget=32)
  big = decode_bench.state_memory("tiny", "kv+g", 1, 1024, budget=32)
  c = cfg.tiny()
  per_slot = c.num_layers * 2 * c.num_heads * c.head_dim * 4
  assert big["state_bytes"] - small["state_bytes"] == (1024 - 128) * per_slot
  for mode in ("h2o", "lambda", "less"):
    a = decode_bench.state_memory("tiny", mode, 1, 128, budget=32)
    z = decode_bench.state_memory("tiny", mode, 1, 1024, budget=32)
    assert a["state_bytes"] == z["state_bytes"] > 0
  less = decode_bench.state_memory("tiny", "less", 1, 128, budget=32, rank=8)
  h2o = decode_bench.state_memory("tiny", "h2o", 1, 128, budget=32)
  # H [R, dk] + z [R] per head and layer, float32.
  assert less["state_bytes"] - h2o["state_bytes"] == c.num_layers * c.num_heads * 8 * (
      c.head_dim + 1) * 4


def _kinds(suite):
  return {(d.weights, b, m) for d in suite.decode for b in d.batches for m in d.modes}


def test_rehearsal_and_smoke_hold_every_gpu_case_kind():
  """`--suite gpu_rehearsal` is the GPU suite on the tiny config (bf16 decode at batch
  64, LESS past its budget, bf16 paired and prefill, training with fused attention);
  the smoke suite, which the next test runs, holds every one of those kinds."""
  gpu, reh, smoke = run.SUITES["gpu"], run.SUITES["gpu_rehearsal"], run.SUITES["smoke"]
  assert _kinds(reh) == _kinds(gpu) and reh.order == gpu.order
  assert {(t.attention, t.remat) for t in reh.train} == {
      ("xla" if t.attention == "cudnn" else t.attention, t.remat) for t in gpu.gpu_train}
  assert _kinds(smoke) >= _kinds(reh) and set(smoke.order) == set(run.SECTIONS)
  assert {(t.compute_dtype, t.attention, t.remat) for t in smoke.train} == {
      (t.compute_dtype, t.attention, t.remat) for t in reh.train}
  assert {(p.weights, p.batch) for p in smoke.paired} == {(p.weights, p.batch) for p in reh.paired}
  assert {(p.weights, b) for p in smoke.prefill for b in p.batches} == {
      (p.weights, b) for p in reh.prefill for b in p.batches}
  assert all(max(d.lengths) > smoke.budget for d in smoke.decode if "less" in d.modes)


def test_smoke_suite_runs_every_section_and_case_kind_and_writes_the_report(tmp_path):
  """One run of every section: the GPU suite's case kinds on the tiny config (so a
  path that breaks is found here, not in a GPU lease), every decode mode, training on
  two forced host devices and with fused attention in their own processes; then the
  report, which regenerates from the JSON alone."""
  smoke = run.SUITES["smoke"]
  assert run.main(["--suite", "smoke", "--out", str(tmp_path)]) == 0
  files = list(tmp_path.glob("suite_smoke_*.json"))
  assert len(files) == 1
  rec = json.loads(files[0].read_text())
  assert rec["complete"] and rec["skipped"] == []
  env = rec["environment"]
  for k in ("machine", "device", "jax", "date", "cpu_count"):
    assert env[k]
  assert rec["ceilings"]["read_bandwidth"]["bytes_per_s"] > 0
  assert rec["ceilings"]["matmul"]["float32"] > 0
  for section in ("decode", "gcache", "prefill", "train"):
    errors = [r["error"] for r in rec[section] if "error" in r]
    assert not errors, (section, errors)
  dec = rec["decode"]
  assert {(r["weights"], r["batch"], r["mode"]) for r in dec} == _kinds(smoke)
  assert {r["mode"] for r in dec} == set(decode_bench.MODES)
  for r in dec:
    assert r["latency_ms"] > 0 and math.isfinite(r["tokens_per_s"])
    assert 0 < r["fraction_of_bandwidth_floor"]
    assert r["bytes_per_token"] > 0
  kvg = [r for r in dec if r["mode"] == "kv+g" and r["batch"] == 8 and r["weights"] == "float32"][0]
  c = cfg.tiny()
  assert kvg["state_bytes"] == c.num_layers * 2 * 8 * 64 * c.num_heads * c.head_dim * 4 + 8 * 4
  train = rec["train"]
  assert {(r["attention"], r["remat"], r["devices"]) for r in train} == {
      (t.attention, t.remat, t.devices) for t in smoke.train}
  assert {r["devices"] for r in train} == {1, 2}
  for r in train:
    assert r["tokens_per_s"] > 0 and 0 < r["mfu"] and np.isfinite(r["loss"])
  (comp,) = rec["compile"]
  assert comp["ok"] and comp["compilations"] == comp["num_buckets_used"]
  assert rec["memory"] and rec["prefill"]
  assert {r["weights"] for r in rec["gcache"]} == {"bfloat16"}
  assert len(rec["gcache"]) == 3 * len(smoke.paired)
  for full, sdpa, less in zip(*[iter(rec["gcache"])] * 3):  # stepped in alternation
    assert (full["mode"], sdpa["mode"], less["mode"]) == ("kv+g", "sdpa", "less")
    assert less["speed_vs_full"] == full["latency_ms"] / less["latency_ms"]
    assert full["overhead_vs_sdpa"] == full["latency_ms"] / sdpa["latency_ms"] - 1.0
  text = (tmp_path / "RESULTS.md").read_text()
  for heading in ("Machine ceilings", "Targets", "## Decode", "## Prefill", "## Training", "G-cache overhead",
                  "Compilations while decoding", "Decode-state memory"):
    assert heading in text
  assert (tmp_path / "plots" / "decode_state_memory.png").exists()
  # The report regenerates from the JSON alone.
  (tmp_path / "RESULTS.md").unlink()
  assert report.main([str(files[0])]) == 0
  assert (tmp_path / "RESULTS.md").exists()


def test_gpu_suite_measures_what_the_gpu_goals_need():
  """`--suite gpu`: decode at batch 1/8/64 (HBM floor from the ceilings), the G-cache
  overhead, LESS vs the full cache from 8k to 32k tokens, bf16 110M training with
  plain and cuDNN-fused attention; the goals' sections first (a time budget cuts the
  rest)."""
  s = run.SUITES["gpu"]
  full = [d for d in s.decode if "kv+g" in d.modes and d.weights == "bfloat16"]
  assert {1, 8, 64} <= {b for d in full for b in d.batches}
  less = [d for d in s.decode if "less" in d.modes]
  assert {8192, 32768} <= {n for d in less for n in d.lengths}
  assert s.paired and s.ceilings.gib >= 1.0
  assert all(p.weights == "bfloat16" for p in s.paired + s.prefill)
  assert not s.train and s.gpu_train
  assert all(t.compute_dtype == "bfloat16" and t.preset == "pldrv51_110m" for t in s.gpu_train)
  assert {t.attention for t in s.gpu_train} == {"plain", "cudnn"}
  assert s.order[:3] == ("ceilings", "train", "decode") and set(s.order) == set(run.SECTIONS)


def test_time_budget_skips_cases_and_every_case_is_saved_as_it_ends(tmp_path, monkeypatch):
  """--budget_s: no case starts once it is spent (each one listed in "skipped"); the
  JSON is rewritten after every case, so a run killed half-way keeps what it measured."""
  assert run.main(["--suite", "smoke", "--out", str(tmp_path / "a"), "--no_report",
                   "--budget_s", "0", "--only", "ceilings,decode,train,compile"]) == 0
  (path,) = (tmp_path / "a").glob("suite_smoke_*.json")
  rec = json.loads(path.read_text())
  assert rec["complete"] and rec["ceilings"] and not rec["decode"] and not rec["train"]
  assert len([x for x in rec["skipped"] if x.startswith("decode ")]) == len(
      [1 for d in run.SUITES["smoke"].decode for _ in d.batches for _ in d.lengths for _ in d.modes])
  assert "compile" in rec["skipped"] and "compile" not in rec

  calls = []
  real = decode_bench.run_case

  def dies_at_the_third(case, *a, **k):
    calls.append(case)
    if len(calls) == 3:
      raise KeyboardInterrupt  # what a kill at the lease's time limit leaves
    return real(case, *a, **k)

  monkeypatch.setattr(decode_bench, "run_case", dies_at_the_third)
  with pytest.raises(KeyboardInterrupt):
    run.main(["--suite", "smoke", "--out", str(tmp_path / "b"), "--no_report",
              "--only", "decode"])
  (path,) = (tmp_path / "b").glob("suite_smoke_*.json")
  rec = json.loads(path.read_text())
  assert rec["complete"] is False and len(rec["decode"]) == 2
  report.write_report(path, tmp_path / "b")
  assert "stopped before its end" in (tmp_path / "b" / "RESULTS.md").read_text()


def test_gpu_record_gets_its_own_page_and_the_gpu_goals(tmp_path):
  """A GPU suite's JSON becomes RESULTS_gpu.md (the CPU page stays and links to it),
  with the bf16 batch-1 decode held to 0.6 of the HBM floor, MFU to 0.4, and a failed
  training case listed as failed."""
  env = {"machine": "m", "cpu": "x", "cpu_count": 16, "platform": "gpu", "device": "H100",
         "num_devices": 1, "jax": "0.11.2", "jaxlib": "0.11.2", "python": "3.12.3",
         "date": "2026-11-27T00:00:00+00:00"}

  def dec(weights, batch, mode, frac, ms=1.0, length=1024):
    return {"preset": "pldrv51_110m", "weights": weights, "batch": batch, "length": length,
            "mode": mode, "latency_ms": ms, "tokens_per_s": batch / ms * 1e3,
            "bytes_per_token": 1e8, "fraction_of_bandwidth_floor": frac, "compile_s": 1.0,
            "state_bytes": 1, "gcache_bytes": 1}

  rec = {"suite": "gpu", "environment": env, "budget_s": 390.0, "skipped": ["memory"],
         "complete": True, "wall_s": 400.0,
         "ceilings": {"read_bandwidth": {"bytes_per_s": 3e12, "bytes": 2 ** 32,
                                         "by_method": {"sum": 3e12}, "best_method": "sum"},
                      "matmul": {"n": 8192, "float32": 4e14, "bfloat16": 7.5e14}},
         "decode": [dec("bfloat16", 1, "kv+g", 0.65), dec("bfloat16", 64, "kv+g", 0.9),
                    dec("float32", 1, "kv+g", 0.5),
                    dec("bfloat16", 8, "kv+g", 0.5, ms=4.0, length=8192),
                    dec("bfloat16", 8, "less", 0.2, ms=1.0, length=8192)],
         "train": [{"preset": "pldrv51_110m", "devices": 1, "compute_dtype": "bfloat16",
                    "batch": 16, "seq": 1024, "platform": "gpu", "attention": "cudnn",
                    "remat": "none", "mfu": 0.45, "tokens_per_s": 2e5, "step_s": 0.08,
                    "model_flops_per_s": 3.4e14, "compile_s": 20.0, "peak_device_mib": 9e3},
                   {"preset": "pldrv51_110m", "devices": 1, "compute_dtype": "bfloat16",
                    "batch": 64, "seq": 1024, "platform": "gpu", "attention": "plain",
                    "remat": "none", "error": "exit 1: RESOURCE_EXHAUSTED: out of memory"}]}
  rows = {t[0]: t[1:] for t in report.targets(rec)}
  assert rows["110M bf16 batch-1 decode (KV+G, 1024 tokens) / HBM floor"] == (
      0.65, ">= 0.6", True)
  assert rows["110M bf16 batch-64 decode (KV+G, 1024 tokens) / HBM floor"][2] is None
  assert rows["110M fp32 batch-1 decode (KV+G, 1024 tokens) / HBM floor"][2] is None
  mfu = [v for k, v in rows.items() if k.startswith("110M training MFU")]
  assert mfu == [(0.45, ">= 0.4", True)]
  failed = [v for k, v in rows.items() if "attention=plain" in k and "training (" in k]
  assert failed and failed[0][2] is False and "out of memory" in failed[0][0]
  less = rows["pldrv51_110m bfloat16 LESS vs full KV+G cache throughput, batch 8, "
              "8192 tokens (separate runs)"]
  assert less == (4.0, ">= 2.0", True)
  path = tmp_path / "suite_gpu_2026-11-27T000000.json"
  path.write_text(json.dumps(rec))
  cpu_page = tmp_path / "RESULTS.md"
  cpu_page.write_text("the CPU page")
  written = report.write_report(path, tmp_path)
  assert written[0] == tmp_path / "RESULTS_gpu.md"
  assert cpu_page.read_text() == "the CPU page"
  assert all(p.name.startswith("gpu_") for p in written[1:]) and written[1:]
  text = written[0].read_text()
  assert "H100" in text and "not started: memory" in text


def test_less_vs_full_target_prefers_alternating_steps():
  """The LESS / full-cache goal rows come from the paired section's alternating steps
  where it has the case, and from the decode table (labelled so) where it does not."""
  def dec(mode, length, ms):
    return {"preset": "pldrv51_110m", "weights": "float32", "batch": 1, "length": length,
            "mode": mode, "latency_ms": ms, "tokens_per_s": 1e3 / ms}
  rec = {"decode": [dec("kv+g", 1024, 10.0), dec("less", 1024, 20.0),
                    dec("kv+g", 4096, 30.0), dec("less", 4096, 10.0)],
         "gcache": [{"preset": "pldrv51_110m", "batch": 1, "length": 1024, "mode": "less",
                     "speed_vs_full": 1.25}]}
  rows = {t[0]: t[1:] for t in report.targets(rec) if "LESS vs full" in t[0]}
  paired = "pldrv51_110m LESS vs full KV+G cache throughput, batch 1, 1024 tokens"
  assert rows[paired + " (alternating steps)"] == (1.25, ">= 1.0", True)  # not 0.5
  assert rows[paired.replace("1024", "4096") + " (separate runs)"] == (3.0, ">= 1.0", True)
  assert len(rows) == 2


def test_goals_against_the_authors_come_from_the_alternating_comparison(tmp_path):
  """The "x the authors' PyTorch" goal rows take their ratios from the newest
  benchmarks/vs_authors.py record beside the suite's JSON (CPU page only), and
  vs_authors.py says in one line where the authors' code is missing."""
  def row(section, ratio, batch, **kw):
    return {"section": section, "unit": "tokens/s", "ratio": ratio, "batch": batch, **kw}
  authors = {"name": "vs_authors_X.json",
             "rows": [row("train", 1.5, 4, seq=256), row("decode", 4.0, 1, prompt=128),
                      row("decode", 3.2, 8, prompt=128), row("prefill", 9.0, 1, prompt=128)]}
  rows = report.targets({}, authors)
  assert [t[1:] for t in rows] == [(1.5, ">= 2.0", False), (3.2, ">= 3.0", True)]
  assert "train (4x256)" in rows[0][0] and "vs_authors_X.json" in rows[0][0]
  assert "batch 8" in rows[1][0]
  assert report.targets({}) == []

  env = {"machine": "m", "cpu": "x", "cpu_count": 2, "platform": "cpu", "device": "cpu",
         "num_devices": 1, "jax": "0.10.2", "jaxlib": "0.10.2", "python": "3.11.7",
         "date": "2026-11-27T00:00:00+00:00"}
  for name, ratio in (("vs_authors_2026-11-26.json", 0.5), ("vs_authors_2026-11-27.json", 3.5)):
    (tmp_path / name).write_text(json.dumps({"rows": [row("decode", ratio, 8, prompt=128)]}))
  path = tmp_path / "suite_quick_2026-11-27T000000.json"
  path.write_text(json.dumps({"suite": "quick", "environment": env}))
  text = report.write_report(path, tmp_path)[0].read_text()
  assert "vs_authors_2026-11-27.json) | 3.500 | >= 3.0 | yes" in text
  assert "vs_authors_2026-11-26" not in text

  proc = subprocess.run([sys.executable, "-m", "benchmarks.vs_authors", "--authors_src",
                         str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr.strip().splitlines() == [
      f"vs_authors: --authors_src {tmp_path}: no pldr_model_v510.py, "
      "power_law_attention_layer_v510.py there (the folder src/pldr_model_v510 of "
      "github.com/burcgokden/PLDR-LLM-with-KVG-cache)"]

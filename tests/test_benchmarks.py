"""The benchmark suite runs end to end (smoke suite: every section, tiny config).

No timing is asserted (benchmarks are scripts, not timed tests); these tests
check that every section produces well-formed rows, that the byte accounting
behind the bandwidth-floor fractions is right, and that the report is written.
"""

import json
import math

import jax
import numpy as np

from benchmarks import decode_bench, report, run
from pldr_jax import config as cfg
from pldr_jax import model
import pytest

pytestmark = pytest.mark.slow  # `pytest -m 'not slow'` skips it


def test_read_param_bytes_counts_what_a_decode_step_reads():
  c = cfg.tiny()
  params = model.init_params(c, jax.random.key(0))
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


def test_smoke_suite_writes_every_section_and_the_report(tmp_path):
  assert run.main(["--suite", "smoke", "--out", str(tmp_path)]) == 0
  files = list(tmp_path.glob("suite_smoke_*.json"))
  assert len(files) == 1
  rec = json.loads(files[0].read_text())
  env = rec["environment"]
  for k in ("machine", "device", "jax", "date", "cpu_count"):
    assert env[k]
  assert rec["ceilings"]["read_bandwidth"]["bytes_per_s"] > 0
  assert rec["ceilings"]["matmul"]["float32"] > 0
  dec = rec["decode"]
  assert not [r for r in dec if "error" in r], [r["error"] for r in dec if "error" in r]
  assert {r["mode"] for r in dec} == set(decode_bench.MODES)
  for r in dec:
    assert r["latency_ms"] > 0 and math.isfinite(r["tokens_per_s"])
    assert 0 < r["fraction_of_bandwidth_floor"]
    assert r["bytes_per_token"] > 0
  kvg = [r for r in dec if r["mode"] == "kv+g" and r["batch"] == 2][0]
  c = cfg.tiny()
  assert kvg["state_bytes"] == c.num_layers * 2 * 2 * 128 * c.num_heads * c.head_dim * 4 + 2 * 4
  (train,) = rec["train"]
  assert "error" not in train, train.get("error")
  assert train["devices"] == 2 and train["tokens_per_s"] > 0 and 0 < train["mfu"]
  assert np.isfinite(train["loss"])
  (comp,) = rec["compile"]
  assert comp["ok"] and comp["compilations"] == comp["num_buckets_used"]
  assert rec["memory"] and rec["prefill"]
  text = (tmp_path / "RESULTS.md").read_text()
  full, sdpa, less = rec["gcache"]  # stepped in alternation
  assert (full["mode"], sdpa["mode"], less["mode"]) == ("kv+g", "sdpa", "less")
  assert less["speed_vs_full"] == full["latency_ms"] / less["latency_ms"]
  assert full["overhead_vs_sdpa"] == full["latency_ms"] / sdpa["latency_ms"] - 1.0
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
  overhead, LESS vs the full cache from 8k to 32k tokens, bf16 110M training."""
  s = run.SUITES["gpu"]
  full = [d for d in s.decode if "kv+g" in d.modes and d.weights == "bfloat16"]
  assert {1, 8, 64} <= {b for d in full for b in d.batches}
  less = [d for d in s.decode if "less" in d.modes]
  assert {8192, 32768} <= {n for d in less for n in d.lengths}
  assert s.paired and s.ceilings.gib >= 1.0
  assert all(t.compute_dtype == "bfloat16" and t.preset == "pldrv51_110m" for t in run.GPU_TRAIN)


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

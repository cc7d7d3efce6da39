#!/usr/bin/env python
"""The benchmark suite: `python -m benchmarks.run --suite quick` (under 10 minutes on CPU).

Runs, in one go and on one machine:
  ceilings   read bandwidth of a 1 GiB array and the fp32/bf16 matmul rate;
  decode     per-token latency / tokens/s of every decode mode
             (benchmarks/decode_bench.py) at batch 1 and 8 over lengths, for
             `tiny` and `pldrv51_110m`, with the fraction of the memory-
             bandwidth floor (bytes read per step / measured bandwidth);
  prefill    prefill seconds per length;
  train      tokens/s and MFU of the train step on 1 and 8 (forced) devices,
             each in its own process (benchmarks/train_bench.py);
  compile    decode-step / train-step compile times and the number of
             compilations while generating 20 prompts of assorted lengths;
  memory     decode-state + G-cache bytes per mode and length (shapes only).

Writes benchmarks/results/suite_<suite>_<date>.json (every row names machine,
device, JAX version and date) and regenerates benchmarks/results/RESULTS.md and
the PNG plots from the newest suite file (benchmarks/report.py).

Suites: `quick` (the lengths and configs below, a few timed steps each), `full`
(lengths 256..8192 everywhere, 110M on 8 devices, more steps), `gpu` (one GPU,
bf16; `bash benchmarks/gpu_session.sh` runs it), `gpu_rehearsal` (the gpu
suite's cases on the tiny config, for a CPU) and `smoke` (tests: the rehearsal's
case kinds at one length each, every decode mode, every section). `--only
decode,train` runs a subset (the report then uses what the file holds);
`--budget_s S` starts no case after S seconds. The JSON is rewritten after every
case, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# On a GPU, XLA's client takes 75% of the device's memory when the backend starts:
# the train cases' own processes would get the rest. Allocate as needed instead
# (before JAX starts; no effect on a CPU). An explicit setting wins.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax

from benchmarks import common, compile_bench, decode_bench, report
from pldr_jax import cli
from pldr_jax.training import host

RESULTS = ROOT / "benchmarks" / "results"

@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Decode cases: every batch x length x mode of one preset and weight dtype.

  Attributes:
    preset: `pldr_jax.config` preset ("tiny", "pldrv51_110m").
    weights: "float32" or "bfloat16" (params and compute).
    batches: batch sizes.
    lengths: context lengths (tokens already in the cache).
    modes: `decode_bench.MODES` entries ("kv", "kv+g", "sdpa", "h2o", ...).
  """
  preset: str
  weights: str
  batches: tuple[int, ...]
  lengths: tuple[int, ...]
  modes: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PairedSpec:
  """KV+G-cache vs SDPA vs LESS decode, timed step by step in alternation (the
  G-cache overhead and the LESS / full-cache speed, each ratio within one round).

  Attributes:
    preset: `pldr_jax.config` preset.
    batch: batch size.
    lengths: context lengths.
    rounds: alternating steps per length (medians are reported).
    weights: "float32" or "bfloat16" (params and compute).
  """
  preset: str
  batch: int
  lengths: tuple[int, ...]
  rounds: int
  weights: str = "float32"


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
  """Prefill seconds of the kv+g, sdpa and less modes.

  Attributes:
    preset: `pldr_jax.config` preset.
    batches: batch sizes.
    lengths: prompt lengths.
    weights: "float32" or "bfloat16" (params and compute).
  """
  preset: str
  batches: tuple[int, ...]
  lengths: tuple[int, ...]
  weights: str = "float32"


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """One train-step measurement, run in its own process (benchmarks/train_bench.py).

  Attributes:
    preset: `pldr_jax.config` preset.
    batch: global batch size.
    seq: tokens per sequence.
    steps: timed steps.
    devices: devices of the mesh (> 1: forced host devices, CPU only).
    compute_dtype: "float32" or "bfloat16".
    attention: `PLDRConfig.attention` ("plain", "xla", "cudnn").
    remat: `PLDRConfig.remat` ("none", "minimal", "full").
  """
  preset: str
  batch: int
  seq: int
  steps: int
  devices: int
  compute_dtype: str
  attention: str = "plain"
  remat: str = "none"


@dataclasses.dataclass(frozen=True)
class CeilingsSpec:
  """Arguments of `common.ceilings`.

  Attributes:
    gib: size of the array whose read bandwidth is measured, GiB.
    n: side of the [n, n] matmul whose rate is measured (>= 8192 on a GPU).
    repeats: repetitions (the best is kept).
  """
  gib: float
  n: int
  repeats: int


@dataclasses.dataclass(frozen=True)
class CompileSpec:
  """Arguments of `compile_bench.generate_counts`: compilations while generating.

  Attributes:
    num_prompts: prompts of assorted lengths generated one after the other.
    max_len: the config's context (prompt lengths are drawn below it).
    max_new_tokens: tokens generated per prompt.
  """
  num_prompts: int
  max_len: int
  max_new_tokens: int = 8


@dataclasses.dataclass(frozen=True)
class Suite:
  """What one suite runs (`--suite NAME`), section by section.

  Attributes:
    decode: decode cases (section "decode").
    decode_steps: timed decode steps per preset.
    paired: KV+G vs SDPA vs LESS alternating measurements (section "gcache").
    prefill: prefill cases (section "prefill").
    train: train-step cases (section "train").
    memory_lengths: lengths of the decode-state memory table (section "memory").
    ceilings: bandwidth / matmul ceilings (section "ceilings").
    compile: the compilation count (section "compile").
    budget: cache budget (slots) of the sparse modes (h2o, lambda, less).
    gpu_train: train-step cases added when the device is a GPU.
    order: the order the sections run in (the most wanted first where a time
      budget may cut the run short).
  """
  decode: tuple[DecodeSpec, ...]
  decode_steps: dict[str, int]
  paired: tuple[PairedSpec, ...]
  prefill: tuple[PrefillSpec, ...]
  train: tuple[TrainSpec, ...]
  memory_lengths: tuple[int, ...]
  ceilings: CeilingsSpec
  compile: CompileSpec
  budget: int = 256
  gpu_train: tuple[TrainSpec, ...] = ()
  order: tuple[str, ...] = ("ceilings", "compile", "memory", "decode", "gcache", "prefill",
                            "train")


SUITES = {
    "quick": Suite(
        decode=(
            DecodeSpec("tiny", "float32", (1, 8), (256, 1024, 4096, 8192),
                       tuple(m for m in decode_bench.MODES if m != "recompute")),
            DecodeSpec("tiny", "float32", (1, 8), (256, 1024), ("recompute",)),
            DecodeSpec("pldrv51_110m", "float32", (1,), (1024, 4096, 8192),
                       ("kv", "kv+g", "sdpa", "h2o", "lambda", "less")),
            DecodeSpec("pldrv51_110m", "float32", (1,), (256,), ("recompute",)),
            DecodeSpec("pldrv51_110m", "float32", (8,), (1024, 8192), ("kv+g", "sdpa", "less")),
            DecodeSpec("pldrv51_110m", "bfloat16", (1,), (1024,), ("kv+g",)),
        ),
        decode_steps={"tiny": 20, "pldrv51_110m": 16},
        paired=(PairedSpec("pldrv51_110m", 1, (1024, 8192), 24),
                PairedSpec("pldrv51_110m", 8, (1024, 8192), 12)),
        prefill=(PrefillSpec("tiny", (1,), (1024, 8192)),
                 PrefillSpec("pldrv51_110m", (1,), (1024,))),
        train=(
            TrainSpec("tiny", 16, 128, 10, 1, "float32"),
            TrainSpec("tiny", 16, 128, 10, 8, "float32"),
            TrainSpec("pldrv51_110m", 4, 256, 3, 1, "float32"),  # issue 13's shape
        ),
        memory_lengths=(256, 1024, 4096, 8192),
        ceilings=CeilingsSpec(gib=1.0, n=2048, repeats=5),
        compile=CompileSpec(num_prompts=20, max_len=512),
    ),
    "full": Suite(
        decode=(
            DecodeSpec("tiny", "float32", (1, 8), (256, 512, 1024, 2048, 4096, 8192),
                       tuple(decode_bench.MODES)),
            DecodeSpec("pldrv51_110m", "float32", (1, 8), (256, 1024, 2048, 4096, 8192),
                       ("kv", "kv+g", "sdpa", "h2o", "lambda", "less")),
            DecodeSpec("pldrv51_110m", "float32", (1,), (256, 1024), ("recompute",)),
            DecodeSpec("pldrv51_110m", "bfloat16", (1, 8), (1024, 8192),
                       ("kv+g", "sdpa", "less")),
        ),
        decode_steps={"tiny": 40, "pldrv51_110m": 16},
        paired=tuple(PairedSpec("pldrv51_110m", b, (256, 1024, 4096, 8192), 60) for b in (1, 8)),
        prefill=(PrefillSpec("tiny", (1, 8), (256, 1024, 4096, 8192)),
                 PrefillSpec("pldrv51_110m", (1,), (256, 1024, 4096))),
        train=(
            TrainSpec("tiny", 16, 128, 20, 1, "float32"),
            TrainSpec("tiny", 16, 128, 20, 8, "float32"),
            TrainSpec("pldrv51_110m", 2, 1024, 3, 1, "float32"),
            TrainSpec("pldrv51_110m", 8, 1024, 2, 8, "float32"),
            TrainSpec("pldrv51_110m", 2, 1024, 3, 1, "bfloat16"),
        ),
        memory_lengths=(256, 512, 1024, 2048, 4096, 8192),
        ceilings=CeilingsSpec(gib=2.0, n=4096, repeats=10),
        compile=CompileSpec(num_prompts=20, max_len=2048),
    ),
}
# One H100 (or any GPU), under 8 minutes (`bash benchmarks/gpu_session.sh` runs it
# with a time budget): 110M bf16 training MFU with plain and cuDNN-fused attention,
# decode at batch 1/8/64 against the HBM floor (ceilings), the G-cache's overhead
# over SDPA and LESS vs the full cache (paired), LESS and the full cache at 8k-32k
# tokens, prefill and compile times. The goals first: ceilings, training,
# decode. `gpu_rehearsal` below is the same suite scaled to the tiny config, for a CPU.
SUITES["gpu"] = Suite(
    decode=(
        DecodeSpec("pldrv51_110m", "bfloat16", (1, 8, 64), (1024, 8192), ("kv+g",)),
        DecodeSpec("pldrv51_110m", "bfloat16", (1, 8), (16384, 32768), ("kv+g",)),
        DecodeSpec("pldrv51_110m", "bfloat16", (1, 8), (8192, 16384, 32768), ("less",)),
        DecodeSpec("pldrv51_110m", "float32", (1, 8), (1024,), ("kv+g",)),
    ),
    decode_steps={"pldrv51_110m": 32},
    paired=tuple(PairedSpec("pldrv51_110m", b, (1024, 8192), 40, "bfloat16") for b in (1, 8)),
    prefill=(PrefillSpec("pldrv51_110m", (1,), (1024, 8192), "bfloat16"),
             PrefillSpec("pldrv51_110m", (8,), (1024,), "bfloat16")),
    train=(),
    # With the scores stored ("plain"), XLA:CPU counts ~15 GiB of temporaries at 8x1024
    # and ~60 GiB at 32x1024 (benchmarks/results/train_variants_2026-11-27.md): 16x1024
    # here. The fused kernel stores none; batch 64 is the case that tests it. A case
    # that fails (out of memory, no cuDNN) is recorded with its error, the suite goes on.
    gpu_train=(TrainSpec("pldrv51_110m", 16, 1024, 10, 1, "bfloat16"),
               TrainSpec("pldrv51_110m", 16, 1024, 10, 1, "bfloat16", attention="cudnn"),
               TrainSpec("pldrv51_110m", 64, 1024, 10, 1, "bfloat16", attention="cudnn")),
    memory_lengths=(1024, 8192, 32768),
    ceilings=CeilingsSpec(gib=4.0, n=8192, repeats=10),
    compile=CompileSpec(num_prompts=20, max_len=2048),
    order=("ceilings", "train", "decode", "gcache", "prefill", "compile", "memory"),
)


def rehearsal(suite: Suite) -> Suite:
  """`suite` on the tiny config, for a CPU: lengths / 256 (at least 64), the GPU
  training cases run here with "cudnn" attention as "xla" (one case per attention
  and remat setting): the same sections, case kinds (bf16, batch 64, LESS past the
  budget, fused attention, remat) and code paths, in a couple of minutes."""
  short = lambda ls: tuple(sorted({max(64, n // 256) for n in ls}))
  train = {}
  for t in suite.train + suite.gpu_train:
    attention = "xla" if t.attention == "cudnn" else t.attention
    train.setdefault((t.compute_dtype, attention, t.remat), dataclasses.replace(
        t, preset="tiny", batch=4, seq=64, steps=2, devices=1, attention=attention))
  train = tuple(train.values())
  return dataclasses.replace(
      suite,
      decode=tuple(dataclasses.replace(d, preset="tiny", lengths=short(d.lengths))
                   for d in suite.decode),
      decode_steps={"tiny": 2},
      paired=tuple(dataclasses.replace(p, preset="tiny", lengths=short(p.lengths), rounds=3)
                   for p in suite.paired),
      prefill=tuple(dataclasses.replace(p, preset="tiny", lengths=short(p.lengths))
                    for p in suite.prefill),
      train=train, gpu_train=(),
      memory_lengths=short(suite.memory_lengths), budget=32,
      ceilings=CeilingsSpec(gib=0.0625, n=256, repeats=2),
      compile=CompileSpec(num_prompts=3, max_len=64, max_new_tokens=4))


SUITES["gpu_rehearsal"] = rehearsal(SUITES["gpu"])
# A short pass over every section (tests/test_benchmarks.py; numbers meaningless):
# every case kind of the GPU suite as the rehearsal runs it (bf16 decode at batch
# 1/8/64, LESS past its budget, bf16 paired and prefill, training with plain and
# fused attention), each at one length, plus every decode mode once and training on
# two forced host devices -- one run instead of a smoke run and a rehearsal.
SUITES["smoke"] = dataclasses.replace(
    SUITES["gpu_rehearsal"],
    decode=(DecodeSpec("tiny", "bfloat16", (1, 8, 64), (64,), ("kv+g",)),
            DecodeSpec("tiny", "bfloat16", (1, 8), (64,), ("less",)),
            DecodeSpec("tiny", "float32", (1,), (64,), tuple(decode_bench.MODES)),
            DecodeSpec("tiny", "float32", (8,), (64,), ("kv+g",))),
    prefill=(PrefillSpec("tiny", (1, 8), (64,), "bfloat16"),),
    train=tuple(dataclasses.replace(t, devices=2) if t.attention == "plain" else t
                for t in SUITES["gpu_rehearsal"].train),
    compile=CompileSpec(num_prompts=3, max_len=32, max_new_tokens=4))
SECTIONS = ("ceilings", "decode", "gcache", "prefill", "train", "compile", "memory")


def log(msg: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Budget:
  """The suite's time budget (`--budget_s`): a case not started before it is spent is
  listed in the record's "skipped", not run; what ran is saved as it comes."""

  def __init__(self, seconds: float | None):
    self.end = None if seconds is None else time.perf_counter() + seconds
    self.skipped: list[str] = []

  def allows(self, what: str) -> bool:
    if self.end is None or time.perf_counter() < self.end:
      return True
    self.skipped.append(what)
    log(f"skipped, time budget spent: {what}")
    return False


class Rows(list):
  """A section's rows; every row added saves the whole record (`save()`), so a run
  cut short (a device lease's time limit, a crash) keeps what it measured."""

  def __init__(self, save):
    super().__init__()
    self._save = save

  def append(self, row):
    super().append(row)
    self._save()

  def extend(self, rows):
    super().extend(rows)
    self._save()

  def __iadd__(self, rows):
    self.extend(rows)
    return self


def run_decode(suite: Suite, ceil, rows, budget: Budget):
  bw = ceil["read_bandwidth"]["bytes_per_s"] if ceil else None
  for d in suite.decode:
    preset, weights = d.preset, d.weights
    for batch in d.batches:
      for length in d.lengths:
        for mode in d.modes:
          if not budget.allows(f"decode {preset} {weights} b{batch} L{length} {mode}"):
            continue
          case = decode_bench.DecodeCase(preset, mode, batch, length, weights,
                                         budget=suite.budget,
                                         steps=suite.decode_steps[preset])
          try:
            r = decode_bench.run_case(case)
          except Exception as e:  # a failed case is recorded, the suite goes on
            r = {**case.__dict__, "error": f"{type(e).__name__}: {e}"}
            log(f"decode {preset} {weights} b{batch} L{length} {mode}: FAILED {r['error']}")
            rows.append(r)
            continue
          if bw:
            r["bandwidth_floor_ms"] = 1e3 * r["bytes_per_token"] / bw
            r["fraction_of_bandwidth_floor"] = r["bandwidth_floor_ms"] / r["latency_ms"]
          rows.append(r)
          log(f"decode {preset} {weights} b{batch} L{length} {mode:9s} "
              f"{r['latency_ms']:9.3f} ms/step {r['tokens_per_s']:10.1f} tok/s "
              f"floor {r.get('fraction_of_bandwidth_floor', float('nan')):.2f} "
              f"(compile {r['compile_s']:.1f}s)")


def run_gcache(suite: Suite, rows, budget: Budget):
  """KV+G-cache vs same-size SDPA vs LESS decode, timed step by step in alternation:
  the G-cache's overhead and LESS's speed over the full cache come from the same
  rounds, so this VM's drift (up to 50% between minutes) hits both sides alike."""
  for ps in suite.paired:
    preset, batch, rounds = ps.preset, ps.batch, ps.rounds
    for length in ps.lengths:
      if not budget.allows(f"paired {preset} {ps.weights} b{batch} L{length}"):
        continue
      cases = [decode_bench.DecodeCase(preset, m, batch, length, ps.weights,
                                       budget=suite.budget)
               for m in ("kv+g", "sdpa", "less")]
      full, sdpa, less = decode_bench.paired(cases, rounds)
      over = full["latency_ms"] / sdpa["latency_ms"] - 1.0
      speed = full["latency_ms"] / less["latency_ms"]
      rows += [{**full, "overhead_vs_sdpa": over}, sdpa, {**less, "speed_vs_full": speed}]
      log(f"paired {preset} {ps.weights} b{batch} L{length}: KV+G {full['latency_ms']:.3f} ms, SDPA "
          f"{sdpa['latency_ms']:.3f} ms, LESS {less['latency_ms']:.3f} ms (medians of "
          f"{rounds} alternating steps): G-cache overhead {100 * over:+.1f}%, "
          f"LESS {speed:.2f}x the full cache")


def run_prefill(suite: Suite, rows, budget: Budget):
  for ps in suite.prefill:
    preset = ps.preset
    for batch in ps.batches:
      for length in ps.lengths:
        for mode in ("kv+g", "sdpa", "less"):
          if not budget.allows(f"prefill {preset} {ps.weights} b{batch} L{length} {mode}"):
            continue
          try:
            r = decode_bench.prefill_time(preset, mode, batch, length, ps.weights,
                                          budget=suite.budget)
          except Exception as e:
            r = {"preset": preset, "mode": mode, "batch": batch, "length": length,
                 "weights": ps.weights, "error": f"{type(e).__name__}: {e}"}
          rows.append(r)
          log(f"prefill {preset} b{batch} L{length} {mode}: "
              f"{r.get('prefill_s', float('nan')):.3f} s")


def run_train(suite: Suite, ceil, rows, on_gpu: bool, budget: Budget):
  cases = suite.train + (suite.gpu_train if on_gpu else ())
  mm = ceil["matmul"] if ceil else None
  for case in cases:
    preset, batch, seq, steps = case.preset, case.batch, case.seq, case.steps
    devices, dtype = case.devices, case.compute_dtype
    if on_gpu and devices > 1:
      continue  # one GPU: forced host devices are a CPU-only measurement
    what = (f"train {preset} b{batch}x{seq} {devices} dev {dtype} "
            f"attention={case.attention} remat={case.remat}")
    if not budget.allows(what):
      continue
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
      flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, "-m", "benchmarks.train_bench", "--preset", preset, "--batch",
           str(batch), "--seq", str(seq), "--steps", str(steps), "--compute_dtype", dtype,
           "--attention", case.attention, "--remat", case.remat]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
      tail = (proc.stderr or proc.stdout)[-600:]
      r = {"preset": preset, "batch": batch, "seq": seq, "devices": devices,
           "compute_dtype": dtype, "attention": case.attention, "remat": case.remat,
           "platform": jax.devices()[0].platform, "error": f"exit {proc.returncode}: {tail}"}
      log(f"{what}: FAILED ({tail[-200:]})")
    else:
      r = json.loads(lines[-1][len("RESULT "):])
      if mm:
        ceiling = mm["bfloat16"] if dtype == "bfloat16" and on_gpu else mm["float32"]
        r["matmul_ceiling_flops_per_s"] = ceiling
        r["mfu"] = r["model_flops_per_s"] / ceiling
      log(f"{what}: {r['tokens_per_s']:.1f} tok/s, "
          f"{r['model_flops_per_s'] / 1e9:.2f} GFLOP/s, MFU {r.get('mfu', float('nan')):.3f}, "
          f"compile {r['compile_s']:.1f}s ({time.perf_counter() - t0:.0f}s)")
    rows.append(r)


def run_memory(suite: Suite, rows):
  for preset in ("tiny", "pldrv51_110m"):
    for length in suite.memory_lengths:
      for mode in ("kv", "kv+g", "sdpa", "h2o", "lambda", "less"):
        r = decode_bench.state_memory(preset, mode, 1, length, budget=suite.budget)
        rows.append(r)
  log(f"memory: {len(rows)} rows")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--suite", choices=sorted(SUITES), default="quick")
  ap.add_argument("--only", default=None, help=f"comma-separated subset of {SECTIONS}")
  ap.add_argument("--out", default=str(RESULTS))
  ap.add_argument("--no_report", action="store_true")
  ap.add_argument("--budget_s", type=float, default=None,
                  help="start no case after this many seconds (the rest are listed as "
                       "skipped); the record is saved after every case either way")
  a = ap.parse_args(argv)
  # As a decoding or training process should run on a CPU (pldr_jax.training.host): the decode
  # steps' temporaries (the fp32 copies of bf16 weights above all) are not page-faulted
  # in anew at every step. Before JAX starts; PLDR_JAX_SYSTEM_MALLOC=1 turns it off.
  host.retain_freed_memory()
  sections = SECTIONS if not a.only else tuple(s.strip() for s in a.only.split(","))
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    ap.error(f"unknown sections {sorted(unknown)}; known: {SECTIONS}")
  suite = SUITES[a.suite]
  sections = tuple(s for s in suite.order if s in sections)
  on_gpu = jax.devices()[0].platform == "gpu"
  t_start = time.perf_counter()
  budget = Budget(a.budget_s)
  record = {"suite": a.suite, "environment": common.environment(), "sections": list(sections),
            "budget_s": a.budget_s, "skipped": budget.skipped, "complete": False}
  out = cli.check_run_folder(Path(a.out), "--out")
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H%M%S")
  path = out / f"suite_{a.suite}_{stamp}.json"

  def save():
    record["wall_s"] = time.perf_counter() - t_start
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(path)

  log(f"suite {a.suite} on {record['environment']['device']} "
      f"({record['environment']['cpu']}, {record['environment']['cpu_count']} cores), "
      f"jax {jax.__version__}; sections {', '.join(sections)}; saving to {path}")
  ceil = None
  compile_kwargs = dataclasses.asdict(suite.compile)
  runners = {
      "compile": lambda rows: rows.append(compile_bench.generate_counts(**compile_kwargs)),
      "memory": lambda rows: run_memory(suite, rows),
      "decode": lambda rows: run_decode(suite, ceil, rows, budget),
      "gcache": lambda rows: run_gcache(suite, rows, budget),
      "prefill": lambda rows: run_prefill(suite, rows, budget),
      "train": lambda rows: run_train(suite, ceil, rows, on_gpu, budget),
  }
  for name in sections:
    t0 = time.perf_counter()
    if name == "ceilings":
      ceil = common.ceilings(**dataclasses.asdict(suite.ceilings), gpu=on_gpu)
      record["ceilings"] = ceil
      save()
      log(f"ceilings: read {ceil['read_bandwidth']['bytes_per_s'] / 1e9:.2f} GB/s "
          f"({ceil['read_bandwidth']['best_method']}), matmul fp32 "
          f"{ceil['matmul']['float32'] / 1e9:.1f} GFLOP/s, bf16 "
          f"{ceil['matmul']['bfloat16'] / 1e9:.1f} GFLOP/s")
      continue
    if name in ("compile", "memory") and not budget.allows(name):
      continue
    rows = record[name] = Rows(save)
    runners[name](rows)
    log(f"{name} done in {time.perf_counter() - t0:.0f}s")
    if name == "compile":
      c = rows[-1]
      log(f"compile: {c['compilations']} compilations for {c['num_prompts']} prompts in "
          f"{c['num_buckets_used']} buckets ({'ok' if c['ok'] else 'TOO MANY'})")
  record["complete"] = True
  save()
  log(f"wrote {path} ({record['wall_s']:.0f}s"
      + (f"; {len(budget.skipped)} case(s) skipped by the time budget)" if budget.skipped
         else ")"))
  if not a.no_report:
    written = report.write_report(path, out)
    log("report: " + ", ".join(str(p) for p in written))
  return 0


if __name__ == "__main__":
  cli.main(main)

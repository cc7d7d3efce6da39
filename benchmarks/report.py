#!/usr/bin/env python
"""Markdown table and PNG plots from a suite JSON written by benchmarks/run.py.

  python -m benchmarks.report [benchmarks/results/suite_quick_<date>.json]

(no argument: the newest suite_*.json in benchmarks/results). Writes
benchmarks/results/RESULTS.md (RESULTS_gpu.md for a GPU run) and
benchmarks/results/plots/*.png (gpu_*.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

MODE_ORDER = ("recompute", "kv", "kv+g", "sdpa", "h2o", "lambda", "less")


def _fmt(x, nd=3):
  if x is None:
    return ""
  if isinstance(x, float):
    if x != x:
      return "nan"
    if abs(x) >= 1e5 or (abs(x) < 1e-3 and x != 0):
      return f"{x:.3e}"
    return f"{x:.{nd}f}"
  return str(x)


def _table(headers, rows) -> list[str]:
  out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
  out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
  return out


def _mib(b):
  return None if b is None else b / 2 ** 20


def _decode_lookup(rec):
  return {(r["preset"], r.get("weights"), r["batch"], r["length"], r["mode"]): r
          for r in rec.get("decode", []) if "error" not in r}


# Issue 13's goals against the authors' PyTorch code, from benchmarks/vs_authors.py
# (same weights, alternating rounds, one process): (its section, batch, goal).
AUTHORS_GOALS = (("train", None, 2.0), ("decode", 8, 3.0))
# Issue 13's training goal: model FLOPs utilisation by platform.
MFU_GOAL = {"gpu": 0.4, "cpu": 0.7}


def targets(rec, authors: dict | None = None) -> list[tuple]:
  """(target, measured, goal, met) rows from a suite record: issue 13's goals.

  authors: a benchmarks/vs_authors.py record (its file name under "name"), for the
  goals stated against the authors' PyTorch code."""
  d = _decode_lookup(rec)
  out = []
  big = "pldrv51_110m"
  on_gpu = rec.get("environment", {}).get("platform") == "gpu"
  # The batch-1 goal: fp32 on a CPU (>= 0.9 of the read-bandwidth floor), bf16 on a
  # GPU (>= 0.6 of the HBM floor); the other batches and dtypes are measured alone.
  goal_weights, goal = ("bfloat16", 0.6) if on_gpu else ("float32", 0.9)
  floor = "HBM floor" if on_gpu else "read-bandwidth floor"
  for weights in ("float32", "bfloat16"):
    for batch in (1, 8, 64):
      if (weights, batch) == ("bfloat16", 1) and not on_gpu:
        continue  # the CPU's bf16 row below
      kvg = sorted((k for k in d if k[0] == big and k[1] == weights and k[2] == batch
                    and k[4] == "kv+g"), key=lambda k: k[3])
      for k in kvg[:1]:
        f = d[k].get("fraction_of_bandwidth_floor")
        name = (f"110M {'fp32' if weights == 'float32' else 'bf16'} batch-{batch} decode "
                f"(KV+G, {k[3]} tokens) / {floor}")
        if (weights, batch) == (goal_weights, 1):
          out.append((name, f, f">= {goal}", f is not None and f >= goal))
        elif on_gpu:
          out.append((name, f, "(measured)", None))
  for section, batch, goal in AUTHORS_GOALS if authors else ():
    for r in authors["rows"]:
      if r["section"] == section and batch in (None, r["batch"]):
        shape = (f"{r['batch']}x{r['seq']}" if section == "train"
                 else f"batch {r['batch']}, KV+G after a {r['prompt']}-token prompt")
        out.append((f"110M fp32 {section} ({shape}) {r['unit']}, pldr-jax / the authors' "
                    f"PyTorch (alternating rounds, {authors['name']})", r["ratio"],
                    f">= {goal}", r["ratio"] >= goal))
  for k in sorted(k for k in d if k[0] == big and k[1] == "bfloat16" and k[2] == 1
                  and k[4] == "kv+g" and not on_gpu)[:1]:
    f = d[k].get("fraction_of_bandwidth_floor")
    fp32 = d.get((big, "float32", 1, k[3], "kv+g"))
    speed = fp32["latency_ms"] / d[k]["latency_ms"] if fp32 else None
    out.append((f"110M bf16-weights batch-1 decode (KV+G, {k[3]} tokens) / bandwidth floor "
                f"(speed-up over fp32: {_fmt(speed, 2)}x)", f, "(measured)", None))
  for r in rec.get("train", []):
    if r.get("preset") != big or r.get("devices") != 1:
      continue
    if "error" in r:
      shape = f"{r.get('compute_dtype')}, {r.get('batch')}x{r.get('seq')}, " \
              f"attention={r.get('attention', 'plain')}, remat={r.get('remat', 'none')}"
      out.append((f"110M training ({shape})", "failed: " + r["error"].strip()[-80:],
                  "runs", False))
      continue
    shape = f"{r['compute_dtype']}, {r['batch']}x{r['seq']}, {r.get('platform', '?')}"
    if r.get("attention", "plain") != "plain" or r.get("remat", "none") != "none":
      shape += f", attention={r.get('attention', 'plain')}, remat={r.get('remat', 'none')}"
    if "mfu" in r:
      goal = MFU_GOAL["gpu" if r.get("platform") == "gpu" else "cpu"]
      out.append((f"110M training MFU ({shape})", r["mfu"], f">= {goal}", r["mfu"] >= goal))
    if "compile_s" in r:
      out.append((f"110M train-step first compile ({shape}), s", r["compile_s"], "<= 15",
                  r["compile_s"] <= 15))
    if r.get("peak_rss_mib") is not None or r.get("peak_device_mib") is not None:
      peak = r.get("peak_device_mib", r.get("peak_rss_mib"))
      out.append((f"110M training memory peak ({shape}), MiB", peak, "(measured)", None))
  for r in rec.get("gcache", []):
    if "overhead_vs_sdpa" in r:
      over = r["overhead_vs_sdpa"]
      out.append((f"{r['preset']} decode with G-cache vs same-size SDPA, batch {r['batch']}, "
                  f"{r['length']} tokens (overhead; alternating steps)", over, "<= 0.05",
                  over <= 0.05))
  # LESS / full-cache speed: from the alternating steps where the suite has them, else
  # from the decode table (separate timings, so subject to the machine's drift).
  paired = {(r["preset"], r.get("weights", "float32"), r["batch"], r["length"]):
            r["speed_vs_full"] for r in rec.get("gcache", []) if "speed_vs_full" in r}
  for preset in ("tiny", big):
    for weights in ("float32", "bfloat16"):
      for batch in (1, 8):
        lengths = {k[3] for k in d if k[:3] == (preset, weights, batch) and k[3] >= 1024}
        lengths |= {k[3] for k in paired if k[:3] == (preset, weights, batch) and k[3] >= 1024}
        for length in sorted(lengths):
          goal = 2.0 if length >= 8192 else 1.0
          if (preset, weights, batch, length) in paired:
            s = paired[(preset, weights, batch, length)]
            how = "alternating steps"
          else:
            a = d.get((preset, weights, batch, length, "less"))
            b = d.get((preset, weights, batch, length, "kv+g"))
            if not (a and b):
              continue
            s = a["tokens_per_s"] / b["tokens_per_s"]
            how = "separate runs"
          dtype = "" if weights == "float32" else f" {weights}"
          out.append((f"{preset}{dtype} LESS vs full KV+G cache throughput, batch {batch}, "
                      f"{length} tokens ({how})", s, f">= {goal}", s >= goal))
  for r in rec.get("compile", []):
    out.append((f"compilations decoding {r['num_prompts']} prompts of assorted lengths "
                f"({r['num_buckets_used']} length buckets)", r["compilations"],
                f"== {r['num_buckets_used']}", r["ok"]))
  return out


def page_name(rec) -> str:
  """RESULTS.md for a CPU suite, RESULTS_<platform>.md (RESULTS_gpu.md) otherwise, so
  that a GPU run and a CPU run each keep their page."""
  platform = rec.get("environment", {}).get("platform", "cpu")
  return "RESULTS.md" if platform == "cpu" else f"RESULTS_{platform}.md"


def write_report(path, out_dir=RESULTS) -> list[Path]:
  path = Path(path)
  out_dir = Path(out_dir)
  rec = json.loads(path.read_text())
  env = rec["environment"]
  page = page_name(rec)
  plot_prefix = "" if page == "RESULTS.md" else env["platform"] + "_"
  lines = [f"# Benchmark results ({rec['suite']} suite)", "",
           f"Generated by `python -m benchmarks.run --suite {rec['suite']}` from "
           f"`{path.name}`; regenerate the page with `python -m benchmarks.report {path.name}`.",
           "",
           f"- machine: {env['machine']} ({env['cpu']}, {env['cpu_count']} cores); device: "
           f"{env['device']} ({env['platform']}, {env['num_devices']} device(s))",
           f"- JAX {env['jax']}, jaxlib {env.get('jaxlib')}, Python {env['python']}; "
           f"date {env['date']}; suite wall time {rec.get('wall_s', 0):.0f} s"]
  if "retain_freed_memory" in env:
    lines.append("- host memory: freed heap " + ("kept for reuse" if env["retain_freed_memory"]
                 else "returned to the OS (system allocator)") +
                 " in the suite's process (pldr_jax.training.host.retain_freed_memory)")
  if rec.get("budget_s") is not None:
    lines.append(f"- time budget {rec['budget_s']:.0f} s: {len(rec.get('skipped', []))} "
                 "case(s) not started: " + (", ".join(rec["skipped"]) or "none"))
  if rec.get("complete") is False:
    lines.append("- **the run stopped before its end**: the sections below hold what it "
                 "had measured")
  lines.append("")
  if page == "RESULTS.md":
    gpu = out_dir / "RESULTS_gpu.md"
    lines += ["GPU results: [RESULTS_gpu.md](RESULTS_gpu.md)." if gpu.exists() else
              "GPU results: none yet. On a GPU, `bash benchmarks/gpu_session.sh` runs "
              "`python -m benchmarks.run --suite gpu` within a time budget; "
              "`python -m benchmarks.report <its json>` then writes RESULTS_gpu.md.", ""]
  ceil = rec.get("ceilings")
  if ceil:
    bw = ceil["read_bandwidth"]
    mm = ceil["matmul"]
    lines += ["## Machine ceilings (measured in the same run)", "",
              f"- read bandwidth: **{bw['bytes_per_s'] / 1e9:.2f} GB/s** (best of: " +
              ", ".join(f"{k} {v / 1e9:.2f}" for k, v in bw["by_method"].items()) +
              f" GB/s; {bw['bytes'] / 2 ** 30:.2f} GiB array)",
              f"- matmul [{mm['n']}x{mm['n']}]^2: **{mm['float32'] / 1e9:.1f} GFLOP/s fp32**, "
              f"{mm['bfloat16'] / 1e9:.1f} GFLOP/s bf16", ""]
  found = sorted(out_dir.glob("vs_authors_*.json")) if page == "RESULTS.md" else []
  authors = {**json.loads(found[-1].read_text()), "name": found[-1].name} if found else None
  tg = targets(rec, authors)
  if tg:
    lines += ["## Targets", ""]
    lines += _table(["target", "measured", "goal", "met"],
                    [(t, m, g, "" if ok is None else ("yes" if ok else "**no**"))
                     for t, m, g, ok in tg])
    lines.append("")
    others = sorted(p.name for p in out_dir.glob("*_20??-??-??.md"))
    if others:
      lines += ["Goals measured by their own scripts (each page gives its command, machine "
                "and met / not met): " + ", ".join(f"[{n}]({n})" for n in others) + ".", ""]
  dec = rec.get("decode", [])
  if dec:
    lines += ["## Decode", "",
              "Per-token latency (median of the timed steps) at the given position; "
              "`floor` = (bytes read per step / read bandwidth) / latency. "
              "Sparse modes (h2o, lambda, less) keep 256 slots; less: R = 8, R' = 64. "
              "`recompute` = one full forward over the prefix per token.", ""]
    rows = []
    for r in sorted(dec, key=lambda r: (r["preset"], r.get("weights", ""), r["batch"],
                                        r["length"], MODE_ORDER.index(r["mode"]))):
      if "error" in r:
        rows.append((r["preset"], r.get("weights"), r["batch"], r["length"], r["mode"],
                     None, None, None, None, None, "error: " + r["error"][:80]))
        continue
      rows.append((r["preset"], r["weights"], r["batch"], r["length"], r["mode"],
                   r["latency_ms"], r["tokens_per_s"], _mib(r["bytes_per_token"]),
                   r.get("fraction_of_bandwidth_floor"), r["compile_s"],
                   _mib(r["state_bytes"] + r["gcache_bytes"])))
    lines += _table(["config", "weights", "batch", "length", "mode", "ms/token-step",
                     "tokens/s", "MiB read/step", "floor", "compile s", "state+G MiB"], rows)
    lines.append("")
  gc = [r for r in rec.get("gcache", []) if "overhead_vs_sdpa" in r]
  if gc:
    lines += ["## G-cache overhead and LESS vs the full cache", "",
              "KV+G-cache PLDR decode vs the same-size SDPA model and vs LESS (its "
              "sparse cache and low-rank state), the steps timed in alternation (medians).",
              ""]
    key = lambda r: (r["preset"], r["batch"], r["length"])
    by = lambda mode: {key(r): r for r in rec["gcache"] if r["mode"] == mode}
    sd, ls = by("sdpa"), by("less")
    lines += _table(["config", "batch", "length", "KV+G ms", "SDPA ms", "overhead", "LESS ms",
                     "LESS speed / KV+G"],
                    [(r["preset"], r["batch"], r["length"], r["latency_ms"],
                      sd.get(key(r), {}).get("latency_ms"), r["overhead_vs_sdpa"],
                      ls.get(key(r), {}).get("latency_ms"),
                      ls.get(key(r), {}).get("speed_vs_full")) for r in gc])
    lines.append("")
  pre = rec.get("prefill", [])
  if pre:
    lines += ["## Prefill", "",
              "A jitted prefill as generate runs it: the prompt's caches and its last "
              "token's logits (the LM head at that position only).", ""]
    lines += _table(["config", "mode", "batch", "length", "prefill s", "tokens/s",
                     "first call s"],
                    [(r["preset"], r["mode"], r["batch"], r["length"], r.get("prefill_s"),
                      r.get("prefill_tokens_per_s"), r.get("first_call_s")) for r in pre])
    lines.append("")
  tr = rec.get("train", [])
  if tr:
    lines += ["## Training", "",
              "Model FLOPs from the config (pldr_jax.training.train.flops_per_token, metric learner "
              "and power-law step included; remat's recomputation not counted); MFU = model "
              "FLOP/s / the matmul rate measured above (fp32; bf16 for bf16 on a GPU). "
              "`attention`, `remat`: PLDRConfig.attention / .remat. `peak MiB`: the device's "
              "peak where it reports one (GPU), else the process's peak RSS. "
              "`faults` = MiB of host pages faulted in per timed step, `kept` = freed host "
              "memory kept for reuse (pldr_jax.training.host.retain_freed_memory).",
              ""]
    lines += _table(["config", "dtype", "attention", "remat", "devices", "batch x seq",
                     "step s", "tokens/s", "GFLOP/s", "MFU", "compile s", "peak MiB", "faults",
                     "kept", "error"],
                    [(r["preset"], r.get("compute_dtype"), r.get("attention", "plain"),
                      r.get("remat", "none"), r.get("devices"),
                      f"{r.get('batch')}x{r.get('seq')}", r.get("step_s"),
                      r.get("tokens_per_s"),
                      None if "model_flops_per_s" not in r else r["model_flops_per_s"] / 1e9,
                      r.get("mfu"), r.get("compile_s"),
                      r.get("peak_device_mib", r.get("peak_rss_mib")),
                      r.get("page_fault_mib_per_step"), r.get("retain_freed_memory"),
                      r.get("error", "")[-80:].replace("\n", " ").replace("|", "/"))
                     for r in tr])
    lines.append("")
  comp = rec.get("compile", [])
  if comp:
    lines += ["## Compilations while decoding", ""]
    for r in comp:
      lines.append(f"- {r['num_prompts']} prompts of lengths {r['prompt_lengths']} "
                   f"({r['preset']}, context {r['max_len']}): **{r['compilations']} "
                   f"compilations** for buckets {r['buckets_used']} "
                   f"({'one per bucket' if r['ok'] else 'MORE than one per bucket'}); "
                   f"{r['total_s']:.1f} s in all")
    lines.append("")
  mem = rec.get("memory", [])
  if mem:
    lines += ["## Decode-state memory (batch 1, state + G-cache, MiB)", "",
              "Counted from the pytrees' shapes. Sparse modes: 256 slots; less adds "
              "H [R, dk] and z [R] per head and layer.", ""]
    for preset in sorted({r["preset"] for r in mem}):
      lengths = sorted({r["length"] for r in mem if r["preset"] == preset})
      modes = [m for m in MODE_ORDER if any(r["mode"] == m and r["preset"] == preset
                                            for r in mem)]
      look = {(r["mode"], r["length"]): r for r in mem if r["preset"] == preset}
      lines.append(f"**{preset}**")
      lines.append("")
      lines += _table(["mode"] + [str(n) for n in lengths],
                      [[m] + [_mib(look[(m, n)]["total_bytes"]) if (m, n) in look else None
                              for n in lengths] for m in modes])
      lines.append("")
  written = [out_dir / page]
  plot_dir = out_dir / "plots"
  written += plots(rec, plot_dir, plot_prefix)
  if written[1:]:
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in written[1:]] + [""]
  (out_dir / page).write_text("\n".join(lines))
  return written


def plots(rec, plot_dir: Path, prefix: str = "") -> list[Path]:
  """PNG plots of the decode, memory and training rows; file names start with
  `prefix` (e.g. "gpu_")."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  plot_dir.mkdir(parents=True, exist_ok=True)
  out = []
  dec = [r for r in rec.get("decode", []) if "error" not in r]
  groups = sorted({(r["preset"], r["weights"], r["batch"]) for r in dec})
  for preset, weights, batch in groups:
    rows = [r for r in dec if (r["preset"], r["weights"], r["batch"]) == (preset, weights, batch)]
    if len({r["length"] for r in rows}) < 2:
      continue
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, mode in enumerate(MODE_ORDER):
      pts = sorted((r["length"], r["latency_ms"]) for r in rows if r["mode"] == mode)
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                color=f"C{i}", ls="--" if mode in ("h2o", "lambda", "less") else "-")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens in context")
    ax.set_ylabel("ms per decode step")
    ax.set_title(f"{preset} {weights}, batch {batch}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = plot_dir / f"{prefix}decode_{preset}_{weights}_b{batch}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
  mem = rec.get("memory", [])
  if mem:
    presets = sorted({r["preset"] for r in mem})
    fig, axes = plt.subplots(1, len(presets), figsize=(5.5 * len(presets), 4))
    axes = [axes] if len(presets) == 1 else list(axes)
    for ax, preset in zip(axes, presets):
      for i, mode in enumerate(MODE_ORDER):
        pts = sorted((r["length"], r["total_bytes"] / 2 ** 20) for r in mem
                     if r["preset"] == preset and r["mode"] == mode)
        if pts:
          ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                  color=f"C{i}")
      ax.set_xscale("log", base=2)
      ax.set_yscale("log")
      ax.set_xlabel("tokens in context")
      ax.set_ylabel("decode state + G-cache (MiB), batch 1")
      ax.set_title(preset)
      ax.legend(fontsize=8)
    fig.tight_layout()
    p = plot_dir / f"{prefix}decode_state_memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
  tr = [r for r in rec.get("train", []) if "tokens_per_s" in r]
  if tr:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    labels = [f"{r['preset']}\n{r['compute_dtype']} {r['devices']}dev" +
              (f"\n{r.get('attention', 'plain')}/{r.get('remat', 'none')}"
               if prefix else "") for r in tr]
    vals = [r.get("mfu", 0.0) for r in tr]
    ax.bar(range(len(tr)), vals, color="C0")
    ax.set_xticks(range(len(tr)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("MFU (model FLOP/s / matmul rate)")
    ax.axhline(MFU_GOAL["gpu" if prefix == "gpu_" else "cpu"], color="k", lw=0.8, ls="--")
    fig.tight_layout()
    p = plot_dir / f"{prefix}train_mfu.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    out.append(p)
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if argv:
    path = Path(argv[0])
    if not path.exists() and (RESULTS / path).exists():
      path = RESULTS / path
  else:
    found = sorted(RESULTS.glob("suite_*.json"), key=lambda p: p.stat().st_mtime)
    if not found:
      print("no benchmarks/results/suite_*.json: run benchmarks/run.py first", file=sys.stderr)
      return 1
    path = found[-1]
  for p in write_report(path, path.parent):
    print(f"wrote {p}")
  return 0


if __name__ == "__main__":
  sys.exit(main())

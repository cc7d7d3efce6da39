#!/usr/bin/env python
"""The pod plan of docs/tpu.md: compile the train step per model, topology, mesh and batch.

    python -m benchmarks.tpu_plan --out benchmarks/results/tpu_plan_<date> \
        [--cases 110m:v5e:2x4:8x1:64:plain,...]

Each case is MODEL:CHIP:SHAPE:DATAxFSDP:GLOBAL_BATCH:ATTENTION[:REMAT], MODEL one
of 110m, 350m, 1b, 3b (experiments/configs/pldrv51_110m.gin, pldr_350m.gin,
pldr_1b.gin, pldr_3b.gin). Every case is `python -m pldr_jax.aot`'s train
program (pldr_jax.aot.run) for that topology: per-chip HBM against the chip,
FLOPs and bytes (layers counted through the unrolled twins), collectives,
and the roofline ESTIMATE of step time, tokens/s and MFU -- compiler figures,
not measurements. One JSON per case under --out (a case already there is not
compiled again), and `plan.md`: the table, plus per model and topology the
fastest case that fits, and the days for the published 110M budget of ~8B
tokens at that estimate; then per pod of the plan (PODS: v5e-8, v5e-256,
v4-128, v5p-128) the fastest fitting case projected to the pod at the same
per-device batch and fsdp size (`project`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GIN = {"110m": "experiments/configs/pldrv51_110m.gin", "350m": "experiments/configs/pldr_350m.gin",
       "1b": "experiments/configs/pldr_1b.gin", "3b": "experiments/configs/pldr_3b.gin"}
BUDGET_TOKENS = 8e9  # the published PLDRv51-110M run: ~8B tokens


def parse_case(text: str) -> dict:
  parts = text.split(":")
  if len(parts) not in (6, 7) or parts[0] not in GIN:
    raise SystemExit(f"case {text!r} is not MODEL:CHIP:SHAPE:DATAxFSDP:BATCH:ATTENTION[:REMAT]")
  model, chip, shape, mesh, batch, attention = parts[:6]
  data, fsdp = (int(x) for x in mesh.split("x"))
  return {"model": model, "topology": f"{chip}:{shape}", "mesh": (data, fsdp),
          "batch": int(batch), "attention": attention,
          "remat": parts[6] if len(parts) == 7 else "none", "key": text.replace(":", "_")}


def _megacore_devices(name: str) -> list:
  """A v4 topology's devices in megacore mode: one device per chip (32 GiB), as
  JAX runs a v4 (jax.make_mesh refuses a v4 core per device: 'Creating meshes
  for TPU >v3 requires one device per chip'). libtpu's default lists each
  TensorCore as a device; chip_config_name='megacore' lists chips."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return list(topologies.get_topology_desc(platform="tpu", topology_name=name,
                                           chip_config_name="megacore").devices)


def run_case(case: dict) -> dict:
  from pldr_jax import aot, gin_configs
  if case["topology"].startswith("v4:"):
    aot.topology_devices = _megacore_devices  # aot.run looks it up at call time
  run = gin_configs.parse([GIN[case["model"]]],
                          [f"PLDRConfig.attention='{case['attention']}'",
                           f"PLDRConfig.remat='{case['remat']}'"])
  t0 = time.perf_counter()
  result = aot.run(case["topology"], run["model"], run["train"], batch=case["batch"],
                   seq_len=run["data"].seq_len, mesh_shape=case["mesh"], programs=("train",))
  result["case"] = {k: v for k, v in case.items() if k != "key"}
  result["wall_s"] = time.perf_counter() - t0
  return result


# The pods of the plan: name -> (chip, JAX devices). v4 and v5p names count
# TensorCores: v4-128 = v4:4x4x4 and v5p-128 = v5p:4x4x4 are 64 chips each. v4
# cases are compiled in megacore mode (one 32 GiB device per chip, how JAX runs
# a v4; `_megacore_devices`); v5e and v5p have one device per chip anyway.
PODS = {"v5e-8": ("v5e", 8), "v5e-256": ("v5e", 256), "v4-128": ("v4", 64),
        "v5p-128": ("v5p", 64)}


def _days(d: float) -> str:
  """Days, with hours or minutes beside a value under a day."""
  if d != d or d >= 1:
    return f"{d:,.1f}"
  return f"{d:.2f} ({24 * d:.1f} h)" if d >= 1 / 24 else f"{d:.4f} ({1440 * d:.0f} min)"


def _bad_collectives(row: dict) -> bool:
  """Collective counts extrapolated from the twins came out negative: the 1- and
  2-layer twins were partitioned differently, so their difference is not one
  layer's collectives, and the ICI term of the estimate is unusable."""
  return any(v["count"] < 0 or v["bytes"] < 0 for v in row["collectives"].values())


def _mfu_text(row: dict) -> str:
  e = row["estimate"]
  if _bad_collectives(row):
    return f"{100 * e['mfu']:.1f}% (n/a) †"
  return f"{100 * e['mfu']:.1f}% ({100 * _mfu_serial(e):.0f}%)"


def _mfu_serial(e: dict) -> float:
  """MFU if FLOPs, HBM traffic and collectives did not overlap at all (their
  times summed): the pessimistic end of the same roofline."""
  total = e["flops_s"] + e["hbm_s"] + e["ici_s"]
  return e["mfu"] * e["step_s"] / total if total else float("nan")


def _per_device(c: dict, h: dict) -> float:
  return c["batch"] / h["num_devices"]


def project(r: dict) -> list[dict]:
  """The pods a compiled case stands for, at the same per-device batch and fsdp size.

  Per device, memory, FLOPs, bytes and the collectives' operand bytes depend on
  the per-device batch and the fsdp size, not on the number of data replicas:
  weights, optimizer state and gradients are sharded over fsdp only, and a ring
  all-reduce / all-gather moves about the same bytes per chip however many take
  part. So a case on a slice with mesh d x f stands for a pod of N devices with
  mesh (N / f) x f; tokens/s scale by N / devices. An ESTIMATE, like the rest.
  """
  c, h, row = r["case"], r["header"], r["programs"][0]
  e = row["estimate"]
  out = []
  for pod, (chip, n) in PODS.items():
    fsdp = c["mesh"][1]
    if chip != c["topology"].split(":")[0] or n % fsdp:
      continue
    tps = e["tokens_per_s"] * n / h["num_devices"]
    out.append({"pod": pod, "mesh": (n // fsdp, fsdp), "batch": round(_per_device(c, h) * n),
                "tokens_per_s": tps, "mfu": e["mfu"], "mfu_serial": _mfu_serial(e),
                "days": BUDGET_TOKENS / tps / 86400 if tps else float("nan"),
                "same": n == h["num_devices"]})
  return out


def render(results: list[dict], errors: dict[str, str] | None = None) -> str:
  lines = ["| model | topology | mesh data x fsdp | batch (per device) | attention | remat | "
           "HBM/device GiB (of) | fits | est. step ms (bound) | est. tok/s | est. MFU "
           "(no overlap) | est. days for 8B tokens | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  best = {}
  pods = {}
  order = {m: i for i, m in enumerate(GIN)}
  results = sorted(results, key=lambda r: (order[r["case"]["model"]], r["case"]["topology"],
                                           r["case"]["batch"], r["case"]["attention"],
                                           r["case"]["remat"]))
  for r in results:
    c, row, h = r["case"], r["programs"][0], r["header"]
    lead = (f"| {c['model']} | {c['topology']} | {c['mesh'][0]}x{c['mesh'][1]} | {c['batch']} "
            f"({_per_device(c, h):g}) | {c['attention']} | {c['remat']} |")
    if "error" in row:
      lines.append(f"{lead} did not compile: {row['error'][:200]} | | | | | | |")
      continue
    e, m = row["estimate"], row["hbm"]
    days = BUDGET_TOKENS / e["tokens_per_s"] / 86400 if e["tokens_per_s"] else float("nan")
    lines.append(
        f"{lead} {m['total'] / 2**30:.2f} ({m['capacity'] / 2**30:.1f}) | "
        f"{'yes' if m['fits'] else 'NO'} | {1e3 * e['step_s']:.1f} ({e['bound']}) | "
        f"{e['tokens_per_s']:,.0f} | {_mfu_text(row)} | {_days(days)} | {row['compile_s']:.0f} |")
    key = (c["model"], c["topology"])
    if m["fits"] and (key not in best or e["tokens_per_s"] > best[key][1]):
      best[key] = (c, e["tokens_per_s"], e["mfu"], days)
    if m["fits"]:
      for p in project(r):
        k = (c["model"], p["pod"])
        if k not in pods or p["tokens_per_s"] > pods[k][1]["tokens_per_s"]:
          pods[k] = (r, p)
  for key, text in sorted((errors or {}).items()):
    lines.append(f"| {key} | | | | | | did not compile: {text[:200]} | | | | | | |")
  lines += ["", "Fastest case that fits, per model and compiled topology (by the estimate):", "",
            "| model | topology | mesh | batch | attention | remat | est. MFU | est. days for 8B tokens |",
            "|---|---|---|---|---|---|---|---|"]
  for (model, topo), (c, tps, mfu, days) in sorted(best.items()):
    lines.append(f"| {model} | {topo} | {c['mesh'][0]}x{c['mesh'][1]} | {c['batch']} | "
                 f"{c['attention']} | {c['remat']} | {100 * mfu:.1f}% | {_days(days)} |")
  lines += ["", "Per pod: the fastest fitting case, projected at the same per-device batch and "
            "fsdp size (ESTIMATES; see `project`):", "",
            "| model | pod | mesh data x fsdp | global batch (per device) | attention | remat | "
            "HBM/device GiB | est. tok/s | est. MFU (no overlap) | est. days for 8B tokens | "
            "from the compile of |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for (model, pod), (r, p) in sorted(pods.items(), key=lambda kv: (order[kv[0][0]],
                                                                  list(PODS).index(kv[0][1]))):
    c, h, m = r["case"], r["header"], r["programs"][0]["hbm"]
    src = (f"{c['topology']} {c['mesh'][0]}x{c['mesh'][1]}, batch {c['batch']}"
           + (" (this pod)" if p["same"] else ""))
    lines.append(f"| {model} | {pod} | {p['mesh'][0]}x{p['mesh'][1]} | {p['batch']} "
                 f"({_per_device(c, h):g}) | {c['attention']} | {c['remat']} | "
                 f"{m['total'] / 2**30:.2f} / {m['capacity'] / 2**30:.1f} | "
                 f"{p['tokens_per_s']:,.0f} | {_mfu_text(r['programs'][0])} | "
                 f"{_days(p['days'])} | {src} |")
  if any(_bad_collectives(r["programs"][0]) for r in results if "error" not in r["programs"][0]):
    lines += ["", "† the collectives extrapolated from the 1- and 2-layer twins came out "
              "negative (the twins were partitioned differently): the ICI term is left out, "
              "so that row's estimate is HBM- or FLOP-bound only and may be optimistic."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--cases", required=False, default="",
                  help="comma-separated MODEL:CHIP:SHAPE:DATAxFSDP:BATCH:ATTENTION[:REMAT]")
  ap.add_argument("--render_only", action="store_true")
  args = ap.parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  if not args.render_only:
    for text in [c for c in args.cases.split(",") if c]:
      case = parse_case(text)
      path = out / f"{case['key']}.json"
      if path.exists():
        continue
      print(f"case {text} ...", file=sys.stderr, flush=True)
      try:
        result = run_case(case)
      except Exception as e:  # noqa: BLE001 - a case that cannot compile is a row too
        print(f"case {text} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        (out / f"{case['key']}.error.txt").write_text(f"{type(e).__name__}: {e}\n")
        continue
      path.write_text(json.dumps(result, indent=1, default=str))
      print(render([result]).splitlines()[2], file=sys.stderr, flush=True)
      (out / f"{case['key']}.error.txt").unlink(missing_ok=True)
  results = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
  done = {p.stem for p in out.glob("*.json")}
  errors = {p.name[:-len(".error.txt")]: p.read_text().strip().splitlines()[0]
            for p in sorted(out.glob("*.error.txt")) if p.name[:-len(".error.txt")] not in done}
  text = render(results, errors)
  (out / "plan.md").write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())

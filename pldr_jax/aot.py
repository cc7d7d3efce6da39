"""Compile the real steps for a TPU topology without a TPU: fit, cost and collectives.

    python -m pldr_jax.aot --topology v5e:16x16 \
        --gin_file=experiments/configs/pldrv51_110m.gin [--gin_param ...] [--json OUT]

The TPU compiler ships in the `libtpu` wheel (`pip install -e '.[tpu]'`) and
compiles for a topology (`jax.experimental.topologies`) with no chip attached.
This module builds the mesh `pretrain.py` builds (`train.make_mesh`) on the
topology's devices and compiles, with their real shardings, the very functions
a run executes -- not copies:

  train         train.make_train_step (AdamW recipe, dtype policy, donation)
  eval          train.make_eval_step
  prefill       what `generate.stream` runs first (generate._prefill_jit, FullCache)
  decode_kv     one decode step on the KV-cache, G_LM recomputed from the cached A
                (FullCache(g_cache=False); generate._step_jit)
  decode_g      one decode step on the KV- and G-cache (FullCache(), the default)
  decode_less   one decode step on a LESS cache (less_jax.SparseCache(H2O, kernels)):
                a plugin's program (below)

Plugins add decode programs without pldr_jax knowing them: a package declares
an entry point in the group "pldr_jax.aot_decode" whose object maps a program
name to `factory(config, *, budget, rank) -> (cache, context)` (a decode cache
of `pldr_jax.inference.caches`' protocol, and the slots a step attends over);
less_jax declares "decode_less". They are loaded when `build` or `main` runs.
For each it reports, per chip: HBM (arguments, outputs, temporaries, total,
against the chip's capacity), the compiler's FLOPs and bytes accessed, the
collectives of the optimised HLO (count and bytes of all-gather,
reduce-scatter, all-reduce, all-to-all, collective-permute) and the compile
time. The step time is an ESTIMATE, never a measurement: a roofline over the
compiler's counts, max(FLOPs / peak bf16 rate, bytes accessed / HBM bandwidth,
collective bytes / ICI bandwidth), from the chip's published figures
(`CHIPS`). XLA's own `optimal_seconds` is reported beside it but came back
negative for large programs on libtpu 0.0.42-0.0.50, so it is not used. MFU
is the model's FLOPs (`train.flops_per_token`, no recomputation counted)
over estimated time x peak.

A program that does not fit prints one line naming the chip's capacity and
what it needed, and the command exits 3.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from pldr_jax import backend, errors, g_modes
from pldr_jax.hlo import collectives, hlo_checks, top_bytes
from pldr_jax.inference import generate
from pldr_jax.inference.caches import FullCache
from pldr_jax.training import train
from pldr_jax import params as params_lib
from pldr_jax import sharding as sharding_lib
from pldr_jax.config import PLDRConfig, TrainConfig

__all__ = ["Chip", "CHIPS", "program_names", "decode_programs", "topology_devices", "build",
           "compile_program",
           "describe", "run", "report", "main"]

SDS = jax.ShapeDtypeStruct
GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Cloud TPU system-architecture pages)."""
  name: str
  hbm_bytes: float      # HBM capacity
  bf16_flops: float     # peak dense bf16 FLOP/s
  hbm_bw: float         # HBM bytes/s
  ici_bw: float         # collective bytes/s per chip (pod all-reduce bandwidth / chips)


CHIPS = {
    # v5e: 197 TFLOP/s bf16, 16 GB HBM2 at 819 GB/s, all-reduce 51.2 TB/s per 256-chip pod.
    "v5e": Chip("v5e", 16 * GiB, 197e12, 819e9, 51.2e12 / 256),
    # v4: 275 TFLOP/s, 32 GiB at 1200 GB/s, all-reduce 1.1 PB/s per 4096-chip pod.
    "v4": Chip("v4", 32 * GiB, 275e12, 1200e9, 1.1e15 / 4096),
    # v5p: 459 TFLOP/s, 95 GB at 2765 GB/s, ICI 4800 Gbit/s per chip.
    "v5p": Chip("v5p", 95e9, 459e12, 2765e9, 4800e9 / 8),
    # v6e: 918 TFLOP/s, 32 GB at 1640 GB/s, ICI 3584 Gbit/s per chip.
    "v6e": Chip("v6e", 32e9, 918e12, 1640e9, 3584e9 / 8),
}

# Decode programs: name -> factory(config, *, budget, rank) -> (cache, slots attended).
_DECODE = {"decode_kv": lambda config, **_: (FullCache(g_cache=False), None),
           "decode_g": lambda config, **_: (FullCache(), None)}
PLUGIN_GROUP = "pldr_jax.aot_decode"


def decode_programs() -> dict:
  """The decode programs: pldr_jax's and those plugins declare (entry points)."""
  out = dict(_DECODE)
  for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
    out.update(ep.load())
  return out


def program_names() -> tuple[str, ...]:
  """Every program `build` knows, plugins' decode programs included."""
  return ("train", "eval", "prefill", *decode_programs())


class AotError(errors.PldrError):
  """A topology, mesh or batch that cannot be compiled as asked."""


# ---------------------------------------------------------------- topology


def parse_topology(name: str) -> tuple[str, str]:
  """'v5e:16x16' -> ('v5e', '16x16'); the chip must be one of CHIPS."""
  chip, _, shape = name.partition(":")
  if chip not in CHIPS or not re.fullmatch(r"\d+(x\d+){1,2}", shape):
    raise AotError(f"topology {name!r} is not CHIP:AxB[xC] with CHIP one of {sorted(CHIPS)} "
                   "(e.g. v5e:16x16, v4:4x4x4, v5p:2x2x1)")
  return chip, shape


def topology_devices(name: str) -> list:
  """The devices of a TPU topology, compiled for with no TPU attached (libtpu).

  libtpu takes a machine-wide lock file unless ALLOW_MULTIPLE_LIBTPU_LOAD is set;
  compiling needs no chip, so it is set here (before libtpu loads) and several
  processes (test workers, a sweep) can compile at once.
  """
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  parse_topology(name)
  try:
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name)
  except Exception as e:  # noqa: BLE001 - no libtpu, or a shape the chip does not have
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise AotError(f"cannot describe TPU topology {name!r} ({first}); the TPU compiler "
                   "comes with `pip install -e '.[tpu]'`") from e
  return list(topo.devices)


# ---------------------------------------------------------------- programs


@dataclasses.dataclass
class Program:
  """One function to compile: `fn.lower(*args, **kwargs)`; tokens per execution
  (global) and the model FLOPs of one execution (global), for the estimate."""
  name: str
  fn: Any
  args: tuple
  kwargs: dict
  tokens: int
  model_flops: float
  cost_twins: "tuple[Program, Program] | None" = None  # 1 and 2 layers, unrolled
  num_layers: int = 1


def _abstract(tree, shardings):
  return jax.tree.map(lambda s, sh: SDS(s.shape, s.dtype, sharding=sh), tree, shardings)


def _info_abstract(info_tree, mesh):
  """ShapeDtypeStructs with shardings from a cache's `abstract()` (ArrayInfo leaves)."""
  is_info = sharding_lib.is_info
  return jax.tree.map(
      lambda i: SDS(i.shape, i.dtype,
                    sharding=sharding_lib.logical_sharding(i.shape, i.axes, mesh)),
      info_tree, is_leaf=is_info)


def _batch_sds(shape, dtype, mesh):
  return SDS(shape, dtype, sharding=sharding_lib.logical_sharding(
      shape, ("batch",) + (None,) * (len(shape) - 1), mesh))


def _given_g(config: PLDRConfig, mesh):
  if config.g_mode not in ("random", "transferred"):
    return None
  return SDS(g_modes.g_shape(config), jnp.float32,
             sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _decode_flops(config: PLDRConfig, batch: int, context: int) -> float:
  """Forward FLOPs of one decode step: weights (2 per parameter read) plus attention
  over `context` slots and q G_LM."""
  c = config
  d, dk = c.d_model, c.head_dim
  per_layer = 2 * (4 * d * d + 3 * d * c.d_ff) + 2 * 2 * context * d
  if c.g_mode != "identity":
    per_layer += 2 * c.num_heads * dk * dk
  return batch * (c.num_layers * per_layer + 2 * d * c.vocab_size)


def build(config: PLDRConfig, tc: TrainConfig, mesh, *, batch: int, seq_len: int,
          programs: Sequence[str] | None = None, decode_batch: int | None = None,
          prompt_len: int | None = None, cache_len: int | None = None,
          budget: int | None = None, rank: int = 8,
          cost_twins: bool = True) -> list[Program]:
  """The programs a run executes, with abstract arguments carrying their shardings.

  batch x seq_len: the global training batch (tokens [B, S]; the model reads S-1);
  decode_batch (default: one sequence per batch shard), prompt_len (default
  max_len / 2), cache_len (default max_len); budget (default max_len / 8) and
  rank: a fixed-size plugin cache's slots and kernel rank (decode_less).
  programs: default every program, plugins' included (`program_names()`).

  cost_twins: XLA's cost analysis counts a while-loop body once, however many
  times it runs, so a program whose layers run in one `lax.scan`
  (`scan_layers`, the default) reports about 1/L of the layers' FLOPs and bytes
  (checked on a 5-step scan of matmuls: 1x; unrolled: 5x). Each scanned
  whole-sequence program then gets two small twins, the model with 1 and with 2
  layers unrolled (no loop); the counts of L layers are c1 + (L - 1)(c2 - c1).
  Memory, compile time and shardings come from the program as it runs.
  """
  kw = dict(batch=batch, seq_len=seq_len, decode_batch=decode_batch, prompt_len=prompt_len,
            cache_len=cache_len, budget=budget, rank=rank)
  known = program_names()
  programs = known if programs is None else tuple(programs)
  whole = [p for p in programs if p in ("train", "eval", "prefill")]
  if cost_twins and config.scan_layers and whole and config.num_layers > 2:
    real = build(config, tc, mesh, programs=programs, cost_twins=False, **kw)
    one, two = ({p.name: p for p in build(config.replace(scan_layers=False, num_layers=n), tc,
                                          mesh, programs=whole, cost_twins=False, **kw)}
                for n in (1, 2))
    return [dataclasses.replace(p, cost_twins=(one[p.name], two[p.name]),
                                num_layers=config.num_layers) if p.name in one else p
            for p in real]
  unknown = sorted(set(programs) - set(known))
  if unknown:
    raise AotError(f"unknown program(s) {unknown}; known: {list(known)}")
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  for what, n in (("batch", batch), ("decode_batch", decode_batch)):
    if n is not None and n % ways:
      raise AotError(f"{what} {n} is not divisible by the {ways} batch shards of the mesh "
                     f"(data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  g_abs = _given_g(config, mesh)
  out = []
  tokens_abs = {"tokens": _batch_sds((batch, seq_len), jnp.int32, mesh),
                "mask": _batch_sds((batch, seq_len), jnp.int32, mesh)}
  train_tokens = batch * (seq_len - 1)
  if "train" in programs or "eval" in programs:
    tx = train.make_optimizer(tc)
    state = train.abstract_train_state(config, tx, mesh)
    fpt = train.flops_per_token(config, seq_len - 1)
    if "train" in programs:
      step = train.make_train_step(config, tc, tx, mesh, g_abs)
      out.append(Program("train", step.jitted, (state, tokens_abs, g_abs), {}, train_tokens,
                         fpt * train_tokens))
    if "eval" in programs:
      step = train.make_eval_step(config, mesh, g_abs)
      out.append(Program("eval", step.jitted, (state["params"], tokens_abs, g_abs), {},
                         train_tokens, fpt * train_tokens / 3))

  decoders = decode_programs()
  dec = [p for p in programs if p == "prefill" or p in decoders]
  if not dec:
    return out
  db = decode_batch or ways
  plen = prompt_len or max(config.max_len // 2, 1)
  clen = cache_len or config.max_len
  p_abs = _abstract(jax.eval_shape(lambda k: params_lib.init_params(config, k), jax.random.key(0)),
                    params_lib.param_shardings(config, mesh))
  tok = _batch_sds((db, plen), jnp.int32, mesh)
  lengths = _batch_sds((db,), jnp.int32, mesh)
  step_tok = _batch_sds((db,), jnp.int32, mesh)
  if "prefill" in dec:
    cache = FullCache()
    out.append(Program("prefill", generate._prefill_jit,
                       (p_abs, tok, lengths, g_abs, cache),
                       {"config": config, "cache_len": clen, "mesh": mesh}, db * plen,
                       train.flops_per_token(config, plen) / 3 * db * plen))
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  for name in [p for p in dec if p in decoders]:
    cache, context = decoders[name](config, budget=budget or max(config.max_len // 8, 4),
                                    rank=rank)
    # arrays inside the cache (a plugin's kernels) are abstract: replicate them
    cache = jax.tree.map(lambda s: SDS(s.shape, s.dtype, sharding=rep), cache)
    context = context or clen
    sp = generate._step_params_jit.lower(p_abs, cache, config=config, batch=db).compile()
    sp_abs = _abstract(jax.eval_shape(lambda p, c: c.step_params(p, config=config, batch=db),
                                      p_abs, cache), sp.output_shardings)
    s_info, g_info = cache.abstract(config=config, batch=db, cache_len=clen)
    out.append(Program(name, generate._step_jit,
                       (sp_abs, _info_abstract(g_info, mesh), _info_abstract(s_info, mesh),
                        step_tok, cache), {"config": config, "mesh": mesh}, db,
                       _decode_flops(config, db, context)))
  return out


# ---------------------------------------------------------------- compile and measure


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def compile_program(prog: Program):
  """Lower and compile one program -> (compiled, lower seconds, total seconds)."""
  t0 = time.perf_counter()
  lowered = prog.fn.lower(*prog.args, **prog.kwargs)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  return compiled, t1 - t0, time.perf_counter() - t0


def _counts(compiled) -> dict:
  """FLOPs, bytes accessed and collectives of one compiled program (loop bodies once)."""
  cost = _cost(compiled)
  return {"flops": float(cost.get("flops", 0.0)),
          "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
          "optimal_seconds": float(cost.get("optimal_seconds", float("nan"))),
          "collectives": collectives(compiled.as_text())}


def extrapolate(c1: dict, c2: dict, layers: int) -> dict:
  """Counts of `layers` layers from those of 1 and 2 unrolled: c1 + (L - 1)(c2 - c1)."""
  lin = lambda a, b: a + (layers - 1) * (b - a)
  return {"flops": lin(c1["flops"], c2["flops"]),
          "bytes_accessed": lin(c1["bytes_accessed"], c2["bytes_accessed"]),
          "optimal_seconds": float("nan"),
          "collectives": {op: {k: lin(c1["collectives"][op][k], c2["collectives"][op][k])
                               for k in ("count", "bytes")} for op in c1["collectives"]}}


def describe(prog: Program, compiled, chip: Chip, num_devices: int,
             timings: tuple[float, float] = (0.0, 0.0), counts: dict | None = None) -> dict:
  """The per-chip report of one compiled program (see the module docstring).

  counts: FLOPs, bytes and collectives to use instead of the program's own
  loop-blind ones (`extrapolate` from the cost twins of `build`).
  """
  mem = compiled.memory_analysis()
  args_b, out_b = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
  temp_b, alias_b = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
  code_b = int(getattr(mem, "generated_code_size_in_bytes", 0))
  total = args_b + out_b + temp_b - alias_b + code_b
  own = _counts(compiled)
  used = own if counts is None else counts
  hlo = compiled.as_text()
  coll = used["collectives"]
  flops, bytes_acc = used["flops"], used["bytes_accessed"]
  coll_bytes = sum(v["bytes"] for v in coll.values())
  t_flops, t_hbm, t_ici = flops / chip.bf16_flops, bytes_acc / chip.hbm_bw, coll_bytes / chip.ici_bw
  est = max(t_flops, t_hbm, t_ici)
  model_flops_chip = prog.model_flops / num_devices
  return {
      "program": prog.name,
      "compile_s": round(timings[1], 2), "lower_s": round(timings[0], 2),
      "hbm": {"arguments": args_b, "outputs": out_b, "temps": temp_b, "aliased": alias_b,
              "code": code_b, "total": total, "capacity": int(chip.hbm_bytes),
              "fits": total <= chip.hbm_bytes},
      "flops": flops, "bytes_accessed": bytes_acc,
      "optimal_seconds_xla": own["optimal_seconds"],
      "collectives": coll, "collective_bytes": coll_bytes,
      "estimate": {"label": "ESTIMATE (roofline over compiler counts, not a measurement)",
                   "flops_s": t_flops, "hbm_s": t_hbm, "ici_s": t_ici, "step_s": est,
                   "bound": ("compute", "memory", "collectives")[
                       int(np.argmax([t_flops, t_hbm, t_ici]))],
                   "tokens_per_s": prog.tokens / est if est > 0 else None,
                   "model_flops_per_chip": model_flops_chip,
                   "mfu": model_flops_chip / (est * chip.bf16_flops) if est > 0 else None},
      "checks": hlo_checks(hlo),
      "top_bytes": top_bytes(hlo, 10),  # the program's own HLO: a loop body once
      "counts_from": ("the program" if counts is None else
                      "1- and 2-layer unrolled twins, extrapolated to L layers"),
      "own_counts": {"flops": own["flops"], "bytes_accessed": own["bytes_accessed"]},
      "tokens": prog.tokens,
  }


def _fmt_bytes(n: float) -> str:
  return f"{n / GiB:.2f}"


def report(rows: list[dict], header: dict) -> str:
  """The table printed by `main`."""
  chip = header["chip"]
  lines = [f"{header['topology']} ({header['num_devices']} devices, {chip['name']}: "
           f"{chip['hbm_bytes'] / GiB:.1f} GiB HBM, {chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, "
           f"{chip['hbm_bw'] / 1e9:.0f} GB/s), mesh data={header['mesh']['data']} x "
           f"fsdp={header['mesh']['fsdp']}; step time, tokens/s and MFU are ESTIMATES "
           "(roofline over the compiler's counts), not measurements",
           "| program | HBM/chip GiB (args+out+temps=total / cap) | fits | GFLOP/chip | "
           "GB accessed/chip | collectives (n, MB) | est. step ms (bound) | est. tok/s | "
           "est. MFU | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['program']} | did not compile: {r['error']} |")
      continue
    h, e = r["hbm"], r["estimate"]
    coll = ", ".join(f"{k} {v['count']}/{v['bytes'] / 1e6:.1f}"
                     for k, v in r["collectives"].items() if v["count"]) or "none"
    mfu = "" if e["mfu"] is None else f"{100 * e['mfu']:.1f}%"
    tps = "" if e["tokens_per_s"] is None else f"{e['tokens_per_s']:,.0f}"
    lines.append(
        f"| {r['program']} | {_fmt_bytes(h['arguments'])}+{_fmt_bytes(h['outputs'])}+"
        f"{_fmt_bytes(h['temps'])}={_fmt_bytes(h['total'])} / {_fmt_bytes(h['capacity'])} | "
        f"{'yes' if h['fits'] else 'NO'} | {r['flops'] / 1e9:.1f} | {r['bytes_accessed'] / 1e9:.2f} | "
        f"{coll} | {1e3 * e['step_s']:.2f} ({e['bound']}) | {tps} | {mfu} | {r['compile_s']:.0f} |")
  return "\n".join(lines)


def mesh_for(devices, data: int, fsdp: int):
  tc = TrainConfig(num_steps=1, mesh_data=data, mesh_fsdp=fsdp)
  try:
    return train.make_mesh(tc, devices)
  except errors.PldrError as e:
    raise AotError(str(e)) from None


def device_chip(topology: str, num_devices: int) -> Chip:
  """The figures of one JAX device of the topology: a chip, or half a v4 chip when
  the topology lists each of its two TensorCores as a device."""
  chip_name, shape = parse_topology(topology)
  chip = CHIPS[chip_name]
  chips = math.prod(int(x) for x in shape.split("x"))
  per = num_devices // chips if num_devices % chips == 0 else 1
  if per <= 1:
    return chip
  return Chip(f"{chip.name} core (1/{per} chip)", chip.hbm_bytes / per, chip.bf16_flops / per,
              chip.hbm_bw / per, chip.ici_bw / per)


def run(topology: str, config: PLDRConfig, tc: TrainConfig, *, batch: int, seq_len: int,
        mesh_shape: tuple[int, int] | None = None, programs: Sequence[str] | None = None,
        log: Callable[[str], None] | None = None, **decode_kw) -> dict:
  """Compile `programs` for `topology`; returns {'header', 'programs': [row, ...]}."""
  devices = topology_devices(topology)
  chip = device_chip(topology, len(devices))
  if mesh_shape is None:
    mesh = train.make_mesh(tc, devices)
  else:
    mesh = mesh_for(devices, *mesh_shape)
  header = {"topology": topology, "num_devices": len(devices), "chip": dataclasses.asdict(chip),
            "device_kind": devices[0].device_kind,
            "mesh": {"data": mesh.shape["data"], "fsdp": mesh.shape["fsdp"]},
            "batch": batch, "seq_len": seq_len, "config": dataclasses.asdict(config),
            "jax": jax.__version__, "libtpu": _libtpu_version(),
            "estimate": "roofline max(flops/peak, bytes/HBM bw, collective bytes/ICI bw) "
                        "over the compiler's per-chip counts; not a measurement"}
  rows = []
  with backend.target("tpu"):
    progs = build(config, tc, mesh, batch=batch, seq_len=seq_len, programs=programs,
                  **decode_kw)
    for p in progs:
      if log:
        log(f"compiling {p.name} ...")
      try:
        compiled, lower_s, total_s = compile_program(p)
      except Exception as e:  # noqa: BLE001 - one program failing keeps the others' rows
        first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        rows.append({"program": p.name, "error": f"{type(e).__name__}: {first}"})
        if log:
          log(f"{p.name} did not compile: {rows[-1]['error']}")
        continue
      counts = None
      if p.cost_twins is not None:
        if log:
          log(f"compiling {p.name} with 1 and 2 layers unrolled, for its counts ...")
        c1, c2 = (_counts(compile_program(t)[0]) for t in p.cost_twins)
        counts = extrapolate(c1, c2, p.num_layers)
      rows.append(describe(p, compiled, chip, len(devices), (lower_s, total_s), counts))
  return {"header": header, "programs": rows}


def _libtpu_version() -> str | None:
  try:
    from importlib import metadata
    return metadata.version("libtpu")
  except Exception:  # noqa: BLE001
    return None


# ---------------------------------------------------------------- command line


def _parse_mesh(text: str | None) -> tuple[int, int] | None:
  if text is None:
    return None
  m = re.fullmatch(r"(-?\d+)x(-?\d+)", text)
  if not m:
    raise AotError(f"--mesh {text!r} is not DATAxFSDP, e.g. 256x1 or 16x16")
  return int(m.group(1)), int(m.group(2))


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m pldr_jax.aot",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--topology", required=True, help="e.g. v5e:16x16, v4:4x4x4, v5p:2x2x1")
  parser.add_argument("--gin_file", action="append", required=True)
  parser.add_argument("--gin_param", action="append", default=[])
  parser.add_argument("--json", default=None, help="write the report as JSON here")
  parser.add_argument("--mesh", default=None,
                      help="DATAxFSDP (default: TrainConfig.mesh_data x mesh_fsdp)")
  parser.add_argument("--batch", type=int, default=None,
                      help="global training batch (default: DataConfig.batch_size)")
  parser.add_argument("--programs", default=None,
                      help=f"comma-separated subset of {','.join(program_names())} (default: all)")
  parser.add_argument("--decode_batch", type=int, default=None)
  parser.add_argument("--prompt_len", type=int, default=None)
  parser.add_argument("--budget", type=int, default=None,
                      help="slots of a fixed-size decode cache (decode_less; default max_len/8)")
  parser.add_argument("--top_ops", type=int, default=0,
                      help="also list the N JAX ops that move the most bytes per program")
  args = parser.parse_args(argv)
  try:
    from pldr_jax import gin_configs
    run_cfg = gin_configs.parse(args.gin_file, args.gin_param)
    config, tc, data = run_cfg["model"], run_cfg["train"], run_cfg["data"]
    batch = args.batch or data.batch_size
    result = run(args.topology, config, tc, batch=batch, seq_len=data.seq_len,
                 mesh_shape=_parse_mesh(args.mesh),
                 programs=None if args.programs is None else
                 [p for p in args.programs.split(",") if p],
                 decode_batch=args.decode_batch, prompt_len=args.prompt_len,
                 budget=args.budget,
                 log=lambda s: print(s, file=sys.stderr, flush=True))
  except errors.PldrError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(report(result["programs"], result["header"]))
  failed = [r for r in result["programs"] if "error" in r]
  if args.top_ops:
    for r in result["programs"]:
      if "error" in r:
        continue
      print(f"\n{r['program']}: the JAX ops moving the most bytes (per device; a loop body once)")
      for g in r["top_bytes"][:args.top_ops]:
        print(f"  {g['bytes'] / 1e9:9.3f} GB  x{g['count']:<4} {g['op']}")
  if args.json:
    from etils import epath
    path = epath.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
  for r in failed:
    print(f"{r['program']} did not compile: {r['error']}", file=sys.stderr)
  if failed:
    return 1
  over = [r for r in result["programs"] if not r["hbm"]["fits"]]
  for r in over:
    print(f"{r['program']} does not fit: needs {r['hbm']['total'] / GiB:.2f} GiB per chip, "
          f"a {result['header']['chip']['name']} chip has "
          f"{r['hbm']['capacity'] / GiB:.2f} GiB", file=sys.stderr)
  return 3 if over else 0


if __name__ == "__main__":
  sys.exit(main())

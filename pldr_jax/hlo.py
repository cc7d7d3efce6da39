"""What the optimised HLO text of a compiled program says: its collectives
(count and bytes), the JAX ops that move the most bytes, and a few structural
checks. Plain text parsing, used by `pldr_jax.aot` (`--top_ops`)."""

from __future__ import annotations

import math
import re

__all__ = ["collectives", "top_bytes", "hlo_checks"]

_COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_OP_RE = re.compile(r"=\s*(.*?)\s+(" + "|".join(_COLLECTIVES) + r")(-start)?\(")
_SHAPE_RE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|"
                       r"f8e4m3fn|f8e5m2|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
          "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
          "f8e4m3fn": 1, "f8e5m2": 1, "c64": 8, "c128": 16}


def _shape_bytes(text: str) -> list[float]:
  return [_BYTES[d] * math.prod(int(x) for x in dims.split(",") if x)
          for d, dims in _SHAPE_RE.findall(text)]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """{op: {'count', 'bytes'}} of the collectives in an optimised HLO module.

  Async pairs count once (the `-start`; its tuple type holds operand and result,
  of which the largest is counted). Bytes are the result's size per device; an
  op inside a loop body counts once, however many times the loop runs.
  """
  out = {op: {"count": 0, "bytes": 0.0} for op in _COLLECTIVES}
  for line in hlo_text.splitlines():
    m = _OP_RE.search(line)
    if not m:
      continue
    type_text, op, start = m.groups()
    sizes = _shape_bytes(type_text)
    out[op]["count"] += 1
    out[op]["bytes"] += (max(sizes) if start else sum(sizes)) if sizes else 0.0
  return out


_SKIP = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "call",
         "conditional", "after-all", "partition-id", "replica-id", "opt-barrier"}
_INSTR_RE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\(")
_OPNAME_RE = re.compile(r'op_name="([^"]*)"')


def top_bytes(hlo_text: str, n: int = 12) -> list[dict]:
  """The HLO ops that move the most bytes: a per-op reading of an optimised module.

  Each instruction outside fused computations counts its result's and its
  operands' sizes (what `bytes accessed` sums; a fusion's insides stay on chip).
  Grouped by the JAX operation that made them (metadata op_name, its last two
  parts), largest first: [{'op', 'bytes', 'count', 'example'}]. Loop bodies count
  once.
  """
  fused = set(re.findall(r"calls=%?([\w.\-]+)", hlo_text)) - set(
      re.findall(r"(?:body|condition|to_apply)=%?([\w.\-]+)", hlo_text))
  sizes: dict[str, float] = {}
  rows = []  # instructions outside fused computations: (name, opcode, rest, line)
  current_fused = False
  for line in hlo_text.splitlines():
    header = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$", line)
    if header and " = " not in line:
      current_fused = header.group(1) in fused
      continue
    m = _INSTR_RE.match(line)
    if not m:
      continue
    name, type_text, opcode = m.groups()
    sizes[name] = sum(_shape_bytes(type_text))
    if not current_fused:
      rows.append((name, opcode, line[m.end():], line))
  groups: dict[str, dict] = {}
  for name, opcode, rest, line in rows:
    if opcode in _SKIP or opcode.endswith("-done"):
      continue
    if opcode.endswith("-start"):  # async copy/slice/collective: (operand, result, ctx)
      arrays = [b for b in _shape_bytes(line.split(f" {opcode}(")[0].split("=", 1)[1]) if b > 8]
      size = 2 * min(arrays) if arrays else 0.0  # the part moved, read once, written once
    else:
      operands = rest.split(")", 1)[0]
      size = sizes[name] + sum(sizes.get(o, 0.0) for o in re.findall(r"%([\w.\-]+)", operands))
    op_name = _OPNAME_RE.search(line)
    key = "/".join(op_name.group(1).split("/")[-2:]) if op_name else opcode
    g = groups.setdefault(key, {"op": key, "bytes": 0.0, "count": 0, "example": name})
    g["bytes"] += size
    g["count"] += 1
  return sorted(groups.values(), key=lambda g: -g["bytes"])[:n]


def hlo_checks(hlo_text: str) -> dict[str, bool]:
  """What a TPU program must not hold: f64 arrays, host callbacks."""
  return {"f64": bool(re.search(r"\bf64\[", hlo_text)),
          "host_callback": bool(re.search(r"custom_call_target=\"[^\"]*(callback|host)",
                                          hlo_text, re.IGNORECASE))}

"""LESS / H2O decode vs the full KV+G cache, step by step in alternation (110M).

  python -m benchmarks.less_vs_full [--preset pldrv51_110m] [--lengths 1024 4096 8192]
      [--batches 1 8] [--rounds 20] [--out FILE.json]

For each batch size and context length, times a decode step of the full cache
(kv+g: KV-cache + G-cache, reads `length` slots), of H2O alone and of LESS
(budget 256 slots, rank 8), alternating the three round by round
(decode_bench.paired) so that a shared machine's drift hits all alike.
Prints one JSON row per case and the LESS / full speed ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks import common, decode_bench


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--preset", default="pldrv51_110m")
  ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
  ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  ap.add_argument("--rounds", type=int, default=20)
  ap.add_argument("--out", default=None)
  a = ap.parse_args(argv)
  rows = []
  for batch in a.batches:
    for length in a.lengths:
      cases = [decode_bench.DecodeCase(a.preset, mode, batch, length)
               for mode in ("kv+g", "h2o", "less")]
      got = decode_bench.paired(cases, rounds=a.rounds)
      full = got[0]["latency_ms"]
      for r in got:
        r["speed_vs_full"] = full / r["latency_ms"]
        print(json.dumps({k: r[k] for k in ("mode", "batch", "length", "latency_ms",
                                            "speed_vs_full")}), flush=True)
      rows += got
  record = {"environment": common.environment(), "rows": rows}
  if a.out:
    Path(a.out).write_text(json.dumps(record, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())

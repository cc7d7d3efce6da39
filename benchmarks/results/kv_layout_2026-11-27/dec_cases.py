import sys, json
from benchmarks import decode_bench
out = {}
for spec in sys.argv[1:]:
  b, L, mode = spec.split(':')
  r = decode_bench.run_case(decode_bench.DecodeCase('pldrv51_110m', mode, int(b), int(L), 'float32', steps=32))
  out[spec] = round(r['latency_ms'], 3)
print(json.dumps(out))

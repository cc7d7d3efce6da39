#!/bin/bash
# Before (a worktree of eef0a38, KV cache [B, H, T, dk]) against after ([B, H, dk, T]),
# alternating fresh processes, two rounds: per-token latency (ms) of the 110M fp32
# decode step from benchmarks/decode_bench.run_case (32 timed steps, median).
#   git worktree add /tmp/before eef0a38
#   bash benchmarks/results/kv_layout_2026-11-27/ab.sh > benchmarks/results/kv_layout_2026-11-27/ab.jsonl
here=$(cd "$(dirname "$0")" && pwd); repo=$(cd "$here/../../.." && pwd)
cases="1:1024:kv+g 1:4096:kv+g 1:8192:kv+g 1:8192:sdpa 1:8192:less 8:1024:kv+g 8:8192:kv+g 8:8192:less"
for r in 1 2; do
  for side in before after; do
    dir=$repo; [ $side = before ] && dir=/tmp/before
    res=$(cd $dir && PYTHONPATH=$dir "$repo/.venv/bin/python" "$here/dec_cases.py" $cases 2>/dev/null | tail -1)
    echo "{\"round\": $r, \"side\": \"$side\", \"latency_ms\": $res}"
  done
done

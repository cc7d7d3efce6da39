#!/bin/bash
# alternating before / after-without-malloc / after, fresh process each
cd /work/main
for r in 1 2; do
  for v in before nomalloc after; do
    if [ $v = before ]; then dir=/tmp/before; env=""; else dir=/work/main; env=""; fi
    if [ $v = nomalloc ]; then env="PLDR_JAX_SYSTEM_MALLOC=1"; fi
    out=$(cd $dir && env $env /work/main/.venv/bin/python -m benchmarks.train_bench --preset pldrv51_110m --batch 4 --seq 256 --steps 6 2>&1 | grep RESULT)
    echo "$v $r ${out#RESULT }"
  done
done

#!/usr/bin/env bash
# The GPU suite in one command, for a lent GPU machine (the device tool's `run`,
# where $OUT is the folder that comes back):
#
#   bash benchmarks/gpu_session.sh [OUT_DIR [BUDGET_S]]
#
# Prints the machine (nvidia-smi, Python, JAX and its devices), checks that what
# the suite imports is installed, then runs
#   python -m benchmarks.run --suite gpu --budget_s BUDGET_S --out OUT_DIR --no_report
# with its log in OUT_DIR/gpu_suite.log. No case starts after BUDGET_S seconds
# (default 390: with the start-up and the last case, the run ends within about
# 8 minutes), and the suite's JSON is rewritten after every case, so a run cut
# short still returns what it measured. It needs no install: the repository is
# put on PYTHONPATH, and the suite imports only jax, flax, optax, chex, etils and
# ml_dtypes (all in the lent machines' image).
#
# Back on the development machine: copy OUT_DIR/suite_gpu_<date>.json into
# benchmarks/results/ and run `python -m benchmarks.report suite_gpu_<date>.json`,
# which writes benchmarks/results/RESULTS_gpu.md and plots/gpu_*.png.
# `python -m benchmarks.run --suite gpu_rehearsal` runs the same cases on the tiny
# config on a CPU (tests/test_benchmarks.py does), so a code path that breaks is
# found before device time is spent; `SUITE=gpu_rehearsal PYTHON=... bash
# benchmarks/gpu_session.sh DIR` runs this script that way.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/results}}"
budget="${2:-390}"
py="${PYTHON:-python3}"
suite="${SUITE:-gpu}"  # SUITE=gpu_rehearsal: the same script on a CPU
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# XLA's client would otherwise take 75% of the GPU's memory in the suite's process,
# leaving the rest to the training cases' processes.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo "nvidia-smi: not found"
  "$py" - <<'EOF' || exit 3
import importlib.util, sys
missing = [m for m in ("jax", "flax", "optax", "chex", "etils", "ml_dtypes")
           if importlib.util.find_spec(m) is None]
if missing:
  sys.exit(f"gpu_session: not installed: {', '.join(missing)} (carry them as wheels: "
           "/work/.library/device/README.md)")
import jax
print(f"python {sys.version.split()[0]}, jax {jax.__version__}, devices {jax.devices()}")
if jax.devices()[0].platform != "gpu":
  print("gpu_session: warning: no GPU; the suite runs on", jax.devices()[0].platform)
EOF
  "$py" -m benchmarks.run --suite "$suite" --budget_s "$budget" --out "$out" --no_report
} 2>&1 | tee "$out/gpu_suite.log"
exit "${PIPESTATUS[0]}"

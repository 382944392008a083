#!/usr/bin/env bash
# qexport report for the offline MiniLM on this machine's CPU: PTQ integer checkpoint (preset full,
# calibrated on random token ids), then PyTorch FP32 / ORT FP32 / ORT INT8 / TVM FP32 / TVM INT8 latency at
# batch 1 and 8, sequence length 128 (each grid point capped at 60 s). Writes report.json, report.md,
# latency.png, speedup.png, size.png and artifacts/ to OUT. About 10 minutes on 2 cores.
#   bench/report_cpu.sh [OUT] [extra qexport report options, e.g. --backends torch,ort --iters 50]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-artifacts/report-cpu-minilm}
shift || true
QEXPORT=${QEXPORT:-.venv/bin/qexport}
[ -x "$QEXPORT" ] || QEXPORT=qexport
exec "$QEXPORT" report --model minilm --backends torch,ort,tvm --device cpu \
    --batch 1,8 --seq 128 --iters 20 -o "$OUT" "$@"

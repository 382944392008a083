#!/usr/bin/env bash
# qexport report on one CUDA GPU (inside docker/Dockerfile.trt, or any env with torch+CUDA,
# onnxruntime-gpu, apache-tvm and tensorrt): random RoBERTa-base and the offline MiniLM, batch 1/8/32,
# sequence length 128 and 256, PyTorch FP32/FP16, ORT FP32/FP16/INT8, TVM FP32/INT8 and TensorRT
# FP32/FP16/INT8 (a runtime that is missing becomes a "skipped" row with its reason).
# One `qexport report` per model, each under 10 minutes (each grid point is capped at 60 s).
#   bench/report_gpu.sh [OUT_ROOT] [extra qexport report options, e.g. --torch-compile]
# Environment: MODELS (default "random:roberta-base minilm"), BACKENDS (default torch,ort,tvm,trt),
#              ITERS (default 20), QEXPORT (default .venv/bin/qexport, else qexport on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-artifacts/report-gpu}
shift || true
QEXPORT=${QEXPORT:-.venv/bin/qexport}
[ -x "$QEXPORT" ] || QEXPORT=qexport
for spec in ${MODELS:-random:roberta-base minilm}; do
    name=${spec#random:}
    "$QEXPORT" report --model "$spec" --backends "${BACKENDS:-torch,ort,tvm,trt}" --device cuda \
        --batch 1,8,32 --seq 128,256 --iters "${ITERS:-20}" -o "$ROOT/$name" "$@"
done

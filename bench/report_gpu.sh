#!/usr/bin/env bash
# qexport report on one CUDA GPU (docker/Dockerfile.gpu or Dockerfile.trt image): random RoBERTa-base and
# the offline MiniLM, batch 1/8/32, sequence length 128 and 256, every backend that is installed
# (PyTorch FP32/FP16, ORT FP32/FP16/INT8, TVM FP32/INT8, TensorRT FP32/FP16/INT8; missing ones become
# "skipped" rows). Each model is one `qexport report` run; budget about 10 minutes for both.
#   bench/report_gpu.sh [OUT_ROOT] [extra options, e.g. --torch-compile or --backends torch,ort,trt]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-artifacts/report-gpu}
shift || true
QEXPORT=${QEXPORT:-.venv/bin/qexport}
command -v "$QEXPORT" >/dev/null 2>&1 || QEXPORT=qexport
for spec in random:roberta-base minilm; do
    name=${spec#random:}
    "$QEXPORT" report --model "$spec" --backends torch,ort,tvm,trt --device cuda \
        --batch 1,8,32 --seq 128,256 --iters 20 -o "$ROOT/$name" "$@"
done

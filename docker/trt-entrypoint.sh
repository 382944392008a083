#!/usr/bin/env bash
# Entry point of the qexport:trt image (docker/Dockerfile.trt).
#
#   no arguments:  self-test on the GPU given with --gpus: TensorRT and the GPU are visible; the
#                  offline MiniLM goes quantize -> flat QDQ ONNX -> `qexport trt` (engine for this
#                  GPU) -> `qexport verify --backend trt` (bit-exact against the integer reference);
#                  then the TensorRT test suite, `pytest -m trt`.
#   arguments:     passed to qexport, e.g. `trt artifacts/model.onnx -o artifacts/model.plan`.
set -euo pipefail

if [[ $# -gt 0 ]]; then
    exec qexport "$@"
fi

step() {
    echo "+ $*" >&2
    "$@"
}

python -c "import tensorrt as trt; print(f'TensorRT {trt.__version__}')"
if ! nvidia-smi -L; then
    echo "error: no GPU visible in the container: run it with 'docker run --gpus all ...'" >&2
    exit 2
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
step qexport quantize --model minilm --data rt --calib-batches 2 -o "$work/ckpt"
step qexport onnx "$work/ckpt" --form flat --linear qdq -o "$work/model.onnx"
step qexport trt "$work/model.onnx" --check
step qexport trt "$work/model.onnx" --target auto -o "$work/model.plan"
step qexport verify "$work/ckpt" --backend trt --model "$work/model.plan" --limit 64
step python -m pytest -m trt -p no:cacheprovider tests

#!/usr/bin/env bash
# GPU check (bench/gpu_check.py): TVM CUDA parity vs the integer reference + latency grid.
#
#   bash bench/gpu_check.sh prepare    # here (TVM + nvcc, no GPU): sm_90 libraries, checkpoints,
#                                      # runtime-only TVM -> artifacts/gpu, cut into artifacts/gpu-carry/part-K
#   bash bench/gpu_check.sh rehearse   # here: the same run on CPU (llvm libraries, MiniLM, few iterations)
#   bash bench/gpu_check.sh            # the GPU machine, once per part, back to back, each call carrying
#                                      # artifacts/gpu-carry/part-K: parts are collected in /tmp; the call
#                                      # that completes them runs the check (results under $OUT)
# Environment: MODELS (default "minilm,roberta-base"), ITERS (default 20), BUDGET_S (default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "${1:-}" != "" ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
MODELS=${MODELS:-minilm,roberta-base}

case "${1:-run}" in
prepare)
    mkdir -p artifacts/gpu-wheels
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        -d artifacts/gpu-wheels apache-tvm==0.27.0.post1 apache-tvm-ffi==0.1.14.post0
    nice -n 10 "$PY" bench/gpu_check.py prepare --device cuda --models "$MODELS" -o artifacts/gpu \
        --wheels artifacts/gpu-wheels
    "$PY" bench/gpu_check.py pack -o artifacts/gpu
    ;;
rehearse)
    nice -n 10 "$PY" bench/gpu_check.py prepare --device cpu --models "${MODELS/,roberta-base/}" -o artifacts/gpu-cpu
    TVM_USE_RUNTIME_LIB=1 nice -n 10 "$PY" bench/gpu_check.py run --device cpu --art artifacts/gpu-cpu \
        --out "${OUT:-artifacts/gpu-cpu-out}" --models "${MODELS/,roberta-base/}" --batch 1,2 --seq 32,64 \
        --parity-seq 32,64 --iters "${ITERS:-3}" --budget-s "${BUDGET_S:-480}"
    ;;
run)
    : "${OUT:=artifacts/gpu-out}"
    ART=artifacts/gpu
    if compgen -G "artifacts/gpu-carry/part-*" >/dev/null; then
        STAGE=/tmp/qexport-gpu
        mkdir -p "$STAGE/parts"
        for d in artifacts/gpu-carry/part-*; do cp -n "$d"/bundle.tar.* "$STAGE/parts/" 2>/dev/null || true; done
        manifest=$(ls artifacts/gpu-carry/part-*/manifest | head -1)
        need=$(wc -l <"$manifest")
        have=0
        while read -r f; do [ -f "$STAGE/parts/$f" ] && have=$((have + 1)); done <"$manifest"
        echo "gpu_check: $have of $need parts on this machine"
        if [ "$have" -lt "$need" ]; then exit 0; fi
        if [ ! -f "$STAGE/gpu/prepare.json" ]; then
            (cd "$STAGE/parts" && cat $(cat "$OLDPWD/$manifest") | tar -x -C "$STAGE")
        fi
        ART=$STAGE/gpu
    fi
    export PYTHONPATH="$ART/tvm-runtime:$PYTHONPATH" TVM_USE_RUNTIME_LIB=1 PYTHONUNBUFFERED=1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    mkdir -p "$OUT"
    set -o pipefail
    "$PY" bench/gpu_check.py run --device cuda --art "$ART" --out "$OUT" --models "$MODELS" \
        --iters "${ITERS:-20}" --budget-s "${BUDGET_S:-480}" 2>&1 | tee "$OUT/gpu_check.log"
    ;;
*)
    echo "usage: bash bench/gpu_check.sh [prepare|rehearse|run]" >&2
    exit 2
    ;;
esac

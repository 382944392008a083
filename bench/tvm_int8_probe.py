"""Probe which int8 GEMM strategy the TVM backend gets for a CUDA arch (no GPU needed).

    python bench/tvm_int8_probe.py --arch sm_75 [--dynamic] [--k 768 --n 768]

Builds a one-node MatMulInteger (int8 x int8 -> int32) ONNX graph, compiles it with
``TVMBackend`` for ``{"kind": "cuda", "arch": ARCH}`` and prints the sidecar's strategy line,
whether tensorize was usable, and the build time. Each build runs in a subprocess so a TVM
crash (e.g. the Tensorize segfault) is reported, not fatal.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = r"""
import json, sys
import numpy as np, onnx
from onnx import helper as h, TensorProto as T, numpy_helper as nh
from qexport.backends.tvm import TVMBackend
k, n, dyn, arch, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], sys.argv[5]
rng = np.random.default_rng(0)
w = nh.from_array(rng.integers(-127, 128, (k, n)).astype(np.int8), "w")
x = h.make_tensor_value_info("x", T.INT8, ["batch", "seq", k])
y = h.make_tensor_value_info("y", T.INT32, ["batch", "seq", n])
m = h.make_model(h.make_graph([h.make_node("MatMulInteger", ["x", "w"], ["y"])], "g", [x], [y], [w]),
                 opset_imports=[h.make_opsetid("", 18)])
m.ir_version = 8
onnx.save(m, out + ".onnx")
shapes = None if dyn else {"batch": 8, "seq": 128}
tgt = json.dumps({"kind": "cuda", "arch": arch})
art = TVMBackend().compile(out + ".onnx", out, target=tgt, shapes=shapes)
meta = json.loads((art / "tvm.json").read_text())
print(json.dumps({k: meta[k] for k in ("int8_matmul_strategy", "tensorize", "build_seconds", "library_bytes",
                                       "tvm_ffi_version")}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="sm_75")
    ap.add_argument("--k", type=int, default=768)
    ap.add_argument("--n", type=int, default=768)
    ap.add_argument("--dynamic", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(
            [
                sys.executable,
                "-c",
                _CHILD,
                str(args.k),
                str(args.n),
                "1" if args.dynamic else "0",
                args.arch,
                str(Path(tmp) / "mm"),
            ],
            capture_output=True,
            text=True,
        )
    if res.returncode != 0:
        print(json.dumps({"rc": res.returncode, "stderr_tail": res.stderr[-1500:]}))
        sys.exit(1)
    print(res.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()

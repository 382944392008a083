"""Single int8 GEMM on this CPU: qexport's TVM kernel vs ONNX Runtime and numpy (issue 14).

    python bench/tvm_gemm.py [--shapes 1024x768x3072 128x768x3072 ...] [--threads 1 2]
                             [--iters 20] [--strategy vnni512|vnni256|madd512|madd256|scalar]

For each ``MxKxN`` (default: M = 1024, 128, 8 at K=768, N=3072, and M = 1024, 128 at the
MiniLM / RoBERTa linear shapes 384x384, 384x1536, 1536x384, 768x768, 768x3072) and each thread
count (a fresh subprocess per count: ``TVM_NUM_THREADS``, OpenMP/BLAS thread variables and ORT's
``intra_op_num_threads``), times, interleaved (each contender in turn: a 250 ms pause, one
untimed call, then three timed; ``iters`` timed calls each, medians):

* ``tvm``: :func:`qexport.backends.tvm_gemm.gemm_primfunc` for the host's strategy (or
  ``--strategy``), int8 activations (as the kernel takes them in a model: widened to int16 for
  the madd strategies) x packed int8 weights (the +128 shift and its correction
  included), built for the host target (:func:`qexport.backends.tvm_cpu.llvm_target_spec`);
* ``ort-u8s8``: ORT ``MatMulInteger`` with uint8 activations and int8 weights (its VNNI path);
* ``ort-fp32``: ORT ``MatMul`` in float32;
* ``np-fp32``: ``numpy.matmul`` in float32 (BLAS).

and prints ms, GOPS (2*M*K*N / time) and the ratios ``ort-u8s8 / tvm`` and ``ort-fp32 / tvm``
(> 1: the TVM kernel is faster), and whether ORT's u8s8 result is exact (on AVX2 without VNNI
its kernel's ``vpmaddubsw`` saturates int16 pair sums: ``NO`` for full-range operands).
``peak`` is a tight register loop, per thread, of the exact kernel's own step: ``vpdpbusd`` (VNNI
hosts) or ``vpmaddwd`` + ``vpaddd`` (every int16 product pair needs its add into the int32
accumulator); ``%peak`` = tvm GOPS / peak GOPS. On madd hosts ``mult peak`` is a loop of
``vpmaddwd`` alone: the multiplier ports' limit, which a kernel with fewer adds per multiply
(ORT's saturating u8s8: ``vpmaddubsw`` + ``vpmaddwd`` + ``vpaddd`` per 32 products) can approach
and the exact kernel cannot (the adds share the vector ports).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_SHAPES = [
    "1024x768x3072",
    "128x768x3072",
    "8x768x3072",
    "1024x384x384",
    "1024x384x1536",
    "1024x1536x384",
    "1024x768x768",
    "128x384x384",
    "128x768x768",
]


def _ort_session(w8: np.ndarray, m: int, kind: str, threads: int, work: Path) -> Any:
    """One-node ORT model: ``MatMulInteger(uint8 a, w8)`` (u8s8) or ``MatMul`` in float32 of
    ``w8``'s values."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    k, n = w8.shape
    if kind == "u8s8":
        w = nh.from_array(w8, "w")
        node = h.make_node("MatMulInteger", ["a", "w"], ["y"])
        a_t, y_t = T.UINT8, T.INT32
    else:
        w = nh.from_array(w8.astype(np.float32), "w")
        node = h.make_node("MatMul", ["a", "w"], ["y"])
        a_t, y_t = T.FLOAT, T.FLOAT
    graph = h.make_graph(
        [node],
        "g",
        [h.make_tensor_value_info("a", a_t, [m, k])],
        [h.make_tensor_value_info("y", y_t, [m, n])],
        [w],
    )
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 18)])
    model.ir_version = 8
    path = work / f"{kind}_{m}_{k}_{n}.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _peak_func(st: Any, threads: int, iters: int, add: bool = True) -> Any:
    """``threads`` x ``iters`` x 12 independent vpdpbusd / vpmaddwd(+ vpaddd unless ``add`` is
    false) on registers (L1 operands)."""
    from tvm.script import tirx as T

    lanes, g = st.lanes, st.group
    vec = f"int32x{lanes}"
    intrin, vnni = st.intrin, st.kind == "vnni"
    nacc = 12

    def step(acc: Any, a: Any, w: Any) -> Any:
        if vnni:
            return T.call_llvm_pure_intrin(vec, intrin, acc, a, w)
        # the operand is the accumulator itself: a vpmaddwd of loop-invariant operands is hoisted
        # out of the loop by LLVM (the "peak" was then a vector add: 2,040 GOPS on AVX2)
        prod = T.call_llvm_pure_intrin(vec, intrin, T.reinterpret(acc, dtype=f"int16x{lanes * g}"), w)
        return acc + prod if add else prod

    @T.prim_func(s_tir=True)
    def peak(xh: T.handle, wh: T.handle):
        x = T.match_buffer(xh, (threads, nacc * lanes), "int32")
        w = T.match_buffer(wh, (lanes * g * 2,), st.weight_dtype)
        with T.sblock("root"):
            for t in T.parallel(threads):
                with T.sblock("thr"):
                    T.reads(w[0 : lanes * g * 2])
                    T.writes(x[t, 0 : nacc * lanes])
                    acc = T.alloc_buffer((nacc * lanes,), "int32", scope="global")
                    for j in T.unroll(nacc):
                        acc[T.ramp(j * lanes, 1, lanes)] = T.broadcast(T.int32(0), lanes)
                    for _ in range(iters):
                        for j in T.unroll(nacc):
                            acc[T.ramp(j * lanes, 1, lanes)] = step(
                                acc[T.ramp(j * lanes, 1, lanes)],
                                w[T.ramp((j % 2) * lanes * g, 1, lanes * g)],
                                w[T.ramp(((j + 1) % 2) * lanes * g, 1, lanes * g)],
                            )
                    for j in T.unroll(nacc):
                        x[t, T.ramp(j * lanes, 1, lanes)] = acc[T.ramp(j * lanes, 1, lanes)]

    return peak


def _interleaved(fns: dict[str, tuple[Any, tuple]], iters: int) -> dict[str, float]:
    """Median milliseconds of each ``fn(*args)``, in turns (:func:`qexport.report.timing.interleaved_ms`)."""
    from qexport.report.timing import interleaved_ms

    return interleaved_ms({name: (lambda f=fn, a=fargs: f(*a)) for name, (fn, fargs) in fns.items()}, iters)


def child(shapes: list[tuple[int, int, int]], threads: int, iters: int, strategy: str | None) -> list[dict]:
    import tvm

    from qexport.backends import tvm_gemm as G
    from qexport.backends.tvm_cpu import llvm_target_spec
    from qexport.host import cpu_flags

    st = G.STRATEGIES[strategy] if strategy else G.select_strategy(cpu_flags())
    target = tvm.target.Target(llvm_target_spec({"kind": "llvm"}))
    dev = tvm.cpu()
    rows: list[dict] = []

    def peak(add: bool) -> float:
        n_it = 200_000
        x = tvm.runtime.tensor(np.zeros((threads, 12 * st.lanes), np.int32), dev)
        w = tvm.runtime.tensor(np.ones(st.lanes * st.group * 2, st.weight_dtype), dev)
        func = _peak_func(st, threads, n_it, add=add).with_attr("global_symbol", "peak")
        t = tvm.compile(func, target).mod.time_evaluator("peak", dev, number=3, repeat=5)(x, w)
        return 2 * threads * n_it * 12 * st.lanes * st.group / min(t.results) / 1e9

    peak_gops = peak(add=True) if st.kind != "scalar" else None
    mult_peak_gops = peak(add=False) if st.kind == "madd" else None
    with tempfile.TemporaryDirectory() as tmp:
        for m, k, n in shapes:
            rng = np.random.default_rng(1)
            a8 = rng.integers(-128, 128, (1, m, k)).astype(np.int8)
            w8 = rng.integers(-128, 128, (k, n)).astype(np.int8)
            packed, corr = G.pack_weight(w8, st, a_signed=True)
            a_dt = st.kernel_a_dtype("int8")  # what the kernel takes in a model (madd: int16)
            func = G.gemm_primfunc(st, k=k, n=n, a_dtype=a_dt, shared_b=True)
            lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
            targs = [tvm.runtime.tensor(x, dev)
                     for x in (a8.astype(a_dt), packed, corr, np.zeros((1, m, n), np.int32))]
            lib["main"](*targs)
            ref = a8[0].astype(np.int64) @ w8.astype(np.int64)
            exact = bool(np.array_equal(targs[3].numpy()[0], ref))
            su8 = _ort_session(w8, m, "u8s8", threads, Path(tmp))
            sf32 = _ort_session(w8, m, "fp32", threads, Path(tmp))
            au8 = (a8[0].astype(np.int16) + 128).astype(np.uint8)
            af = a8[0].astype(np.float32)
            wf = w8.astype(np.float32)
            # (a + 128) . w = a . w + 128 * colsum(w)
            ort_exact = bool(np.array_equal(su8.run(None, {"a": au8})[0],
                                            ref + 128 * w8.sum(axis=0, dtype=np.int64)))
            ms = _interleaved(
                {
                    "tvm": (lib["main"], tuple(targs)),
                    "ort-u8s8": (su8.run, (None, {"a": au8})),
                    "ort-fp32": (sf32.run, (None, {"a": af})),
                    "np-fp32": (np.matmul, (af, wf)),
                },
                iters,
            )
            ops = 2 * m * k * n
            rows.append(
                {
                    "shape": f"{m}x{k}x{n}",
                    "threads": threads,
                    "strategy": st.name,
                    "exact": exact,
                    "ms": ms,
                    "gops": {name: ops / v / 1e6 for name, v in ms.items()},
                    "peak_gops": peak_gops,
                    "mult_peak_gops": mult_peak_gops,
                    "ort_u8s8_exact": ort_exact,
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="MxKxN")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--strategy", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes]
    if args.child:
        rows = child(shapes, args.threads[0], args.iters, args.strategy)  # type: ignore[arg-type]
        print("ROWS " + json.dumps(rows))
        return
    rows = []
    for threads in args.threads:
        env = dict(os.environ)
        for var in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(threads)
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, __file__, "--child", "--threads", str(threads), "--iters", str(args.iters)]
        cmd += ["--shapes", *args.shapes] + (["--strategy", args.strategy] if args.strategy else [])
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("ROWS ")]
        if res.returncode != 0 or not line:
            sys.exit(f"benchmark child failed (threads={threads}):\n{res.stderr[-3000:]}")
        rows += json.loads(line[-1][5:])
    head = (
        f"{'MxKxN':>15} {'thr':>3} {'strategy':>8} {'exact':>5} | {'tvm ms':>8} {'GOPS':>6} {'%peak':>5} | "
        f"{'ort-u8s8':>8} {'exact':>5} {'ort-fp32':>8} {'np-fp32':>8} | {'u8s8/tvm':>8} {'fp32/tvm':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        ms, gops = r["ms"], r["gops"]
        pk = f"{100 * gops['tvm'] / r['peak_gops']:.0f}" if r["peak_gops"] else "-"
        print(
            f"{r['shape']:>15} {r['threads']:>3} {r['strategy']:>8} {'yes' if r['exact'] else 'NO':>5} | "
            f"{ms['tvm']:8.3f} {gops['tvm']:6.0f} {pk:>5} | "
            f"{ms['ort-u8s8']:8.3f} {'yes' if r['ort_u8s8_exact'] else 'NO':>5} "
            f"{ms['ort-fp32']:8.3f} {ms['np-fp32']:8.3f} | "
            f"{ms['ort-u8s8'] / ms['tvm']:8.2f} {ms['ort-fp32'] / ms['tvm']:8.2f}"
        )
    peaks = {r["threads"]: (r["peak_gops"], r["mult_peak_gops"]) for r in rows if r["peak_gops"]}
    for threads, (p, mp) in sorted(peaks.items()):
        extra = f"; mult peak (vpmaddwd alone): {mp:.0f} GOPS" if mp else ""
        print(f"peak ({rows[0]['strategy']}, tight register loop): {p:.0f} GOPS on {threads} "
              f"thread(s){extra}")


if __name__ == "__main__":
    main()

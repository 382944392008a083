"""Exact int8 GEMM kernels for TVM on x86 CPUs: a Relax pass that swaps int8 matmuls for call_tir.

:func:`lower_int8_matmuls` runs on an imported Relax module after
:func:`qexport.backends.tvm._int8_matmul_rewrite` and before ``LegalizeOps``. It replaces every
int8/uint8 x int8 -> int32 matmul it recognises by ``call_tir`` to a hand-scheduled PrimFunc:

* ``matmul(a:int8, b:int8, out_dtype=int32)`` (the ``--linear integer`` form after the rewrite);
* ``matmul(astype(a:int8|uint8, int32), astype(b:int8, int32))`` (the attention ``P @ V`` with
  uint8 probabilities, which the int8 rewrite leaves alone);
* ``matmul(dequantize(a, 1, 0), dequantize(b, 1, 0))`` in float32 (the ``--linear qdq`` form): the
  integer product replaces the float one and is cast back to float32, so the float->int32 chain
  that follows is unchanged. Exact wherever the ONNX graph is (accumulators below 2^24).

Constant weights (linears) are packed at build time; activation right-hand sides (``Q @ K^T``,
``P @ V``) are packed by a small PrimFunc per call.

Strategies (chosen from the CPU ``features``, see :func:`select_strategy`):

``vnni512`` / ``vnni256``
    ``vpdpbusd`` (AVX-512 VNNI, 16 int32 lanes; AVX-VNNI or AVX-512VL, 8 lanes): u8 x s8 dot
    products of 4, accumulated into int32. Packed weights ``[N/NR, ceil(K/4), NR*4]`` int8 (each
    16-column group stores 4 consecutive k per column). int8 activations are shifted to uint8 by
    ``a ^ 0x80`` (= a + 128) on the broadcast 4-byte group, and ``-128 * colsum(W)`` (folded at
    build time for constant weights) initialises the accumulators: ``(a + 128) . w - 128 * sum(w)
    = a . w``. uint8 activations need neither.
``madd512`` / ``madd256``
    No VNNI: activations and weights widened to int16, ``vpmaddwd`` (int16 x int16 pair sums into
    int32; AVX-512BW or AVX2). Packed weights ``[N/NR, ceil(K/2), NR*2]`` int16. No shift needed.
    ``vpmaddubsw`` is not used: it saturates its int16 pair sums (2 * 255 * 127 > 32767).
``scalar``
    Plain int32 multiply-accumulate loops (LLVM auto-vectorises); any target.

Exactness: each ``vpdpbusd`` / ``vpmaddwd`` step computes its 4 (2) products and their sum exactly
(|sum| <= 4 * 255 * 128 < 2^31) and adds it to the int32 accumulator modulo 2^32, without
saturation; the correction term is also added modulo 2^32. The result is therefore the exact
integer product reduced modulo 2^32: identical to any int32-accumulating reference (ONNX
``MatMulInteger``) for every K, and equal to the true product whenever it fits in int32
(always for |a|, |w| <= 128 and K < 131072; uint8 activations: K <= 65793).

Tiling: every PrimFunc runs ``parallel(batch x N/NR)`` panels, ``M`` in blocks of ``MR`` rows (the
last block clamps its row index, recomputing a row rather than branching), an ``MR x NR``
register tile of int32 accumulators, and the full K loop inside. ``M`` (batch*seq), the batch
and, for activation right-hand sides, ``K``/``N`` may be symbolic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEDULED_ATTR = "qexport.scheduled"
OPAQUE_PATTERN = 8  # relay/relax OpPatternKind kOpaque: FuseOps leaves the call alone
_XOR_0x80 = -2139062144  # 0x80808080 as int32: adds 128 to each of 4 packed int8 bytes

# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Strategy:
    """One GEMM code path: vector lanes (int32 outputs per vector), k per dot, tile, intrinsic."""

    name: str
    kind: str  # "vnni" | "madd" | "scalar"
    lanes: int
    group: int  # k values per multiply-accumulate step (4 vnni, 2 madd, 1 scalar)
    intrin: str
    mr: int  # rows per register tile
    nv: int  # vectors per row in a register tile

    @property
    def nr(self) -> int:
        return self.lanes * self.nv

    @property
    def weight_dtype(self) -> str:
        return "int16" if self.kind == "madd" else "int8"


STRATEGIES: dict[str, Strategy] = {
    "vnni512": Strategy("vnni512", "vnni", 16, 4, "llvm.x86.avx512.vpdpbusd.512", 3, 4),
    "vnni256": Strategy("vnni256", "vnni", 8, 4, "llvm.x86.avx512.vpdpbusd.256", 3, 4),
    "madd512": Strategy("madd512", "madd", 16, 2, "llvm.x86.avx512.pmaddw.d.512", 3, 4),
    "madd256": Strategy("madd256", "madd", 8, 2, "llvm.x86.avx2.pmadd.wd", 3, 4),
    "scalar": Strategy("scalar", "scalar", 1, 1, "", 1, 1),
}


def select_strategy(features: Iterable[str]) -> Strategy:
    """The fastest exact path the CPU flags allow (``/proc/cpuinfo`` spelling)."""
    f = set(features)
    if {"avx512f", "avx512_vnni"} <= f:
        return STRATEGIES["vnni512"]
    if "avx_vnni" in f or {"avx512_vnni", "avx512vl"} <= f:
        return STRATEGIES["vnni256"]
    if {"avx512f", "avx512bw"} <= f:
        return STRATEGIES["madd512"]
    if "avx2" in f:
        return STRATEGIES["madd256"]
    return STRATEGIES["scalar"]


def _ceil_div(a: Any, b: int) -> Any:
    return (a + b - 1) // b


# --------------------------------------------------------------------------------------------
# weight packing (numpy, build time)
# --------------------------------------------------------------------------------------------
def pack_weight(w: np.ndarray, st: Strategy, a_signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Pack a constant ``[K, N]`` int8 weight for ``st``; returns ``(packed, corr)``.

    ``packed`` is ``[1, ceil(N/NR), ceil(K/G), NR*G]`` (zero padded: padding adds nothing), ``corr``
    is ``[1, ceil(N/NR)*NR]`` int32: ``-128 * colsum(w)`` when int8 activations are shifted to uint8
    (``vnni`` with ``a_signed``), zeros otherwise. The scalar path keeps ``[1, K, N]``.
    """
    if w.ndim != 2 or w.dtype != np.int8:
        raise ValueError(f"weight must be a 2-D int8 array, got {w.dtype} {w.shape}")
    k, n = w.shape
    if st.kind == "scalar":
        return w.reshape(1, k, n).copy(), np.zeros((1, n), np.int32)
    g, lanes, nv, nr = st.group, st.lanes, st.nv, st.nr
    kg, nb = _ceil_div(k, g), _ceil_div(n, nr)
    wp = np.zeros((kg * g, nb * nr), dtype=np.int16 if st.kind == "madd" else np.int8)
    wp[:k, :n] = w
    packed = wp.reshape(kg, g, nb, nv, lanes).transpose(2, 0, 3, 4, 1).reshape(1, nb, kg, nr * g)
    corr = np.zeros((1, nb * nr), np.int64)
    if st.kind == "vnni" and a_signed:
        corr[0, :n] = -128 * w.astype(np.int64).sum(axis=0)
    return np.ascontiguousarray(packed), corr.astype(np.int32)


# --------------------------------------------------------------------------------------------
# PrimFuncs (TVMScript)
# --------------------------------------------------------------------------------------------
def _var(name: str) -> Any:
    from tvm import tirx

    return tirx.Var(name, "int64")


def _dim(value: int | None, name: str) -> Any:
    """A static extent as a Python int, a dynamic one as a fresh int64 var."""
    return value if value is not None else _var(name)


def _finish(func: Any, name: str) -> Any:
    return func.with_attrs(
        {
            "global_symbol": name,
            "tir.noalias": True,
            "tir.is_scheduled": True,
            SCHEDULED_ATTR: True,
            "op_pattern": OPAQUE_PATTERN,
        }
    )


def gemm_primfunc(
    st: Strategy,
    *,
    k: int | None,
    n: int | None,
    a_dtype: str,
    shared_b: bool,
    name: str = "qexport_gemm",
) -> Any:
    """``C[b, m, n] = sum_k A[b, m, k] * W[b or 0, k, n]`` in int32 over a packed ``W``.

    Arguments: ``A [Bt, M, K]`` (``a_dtype`` int8/uint8), packed ``W`` and ``corr`` as
    :func:`pack_weight` (first dim ``1`` when ``shared_b`` else ``Bt``), output ``C [Bt, M, N]``.
    ``k``/``n`` ``None`` = symbolic; ``Bt`` and ``M`` are always symbolic.
    """
    from qexport.backends.tvm import _cheap_inspect_stack

    with _cheap_inspect_stack():
        if st.kind == "scalar":
            func = _scalar_gemm(k=k, n=n, a_dtype=a_dtype, shared_b=shared_b)
        else:
            func = _simd_gemm(st, k=k, n=n, a_dtype=a_dtype, shared_b=shared_b)
    return _finish(func, name)


def _simd_gemm(st: Strategy, *, k: int | None, n: int | None, a_dtype: str, shared_b: bool) -> Any:
    from tvm.script import tirx as T

    lanes, g, nv, mr, nr = st.lanes, st.group, st.nv, st.mr, st.nr
    vnni = st.kind == "vnni"
    shift = vnni and a_dtype == "int8"
    wdt = st.weight_dtype
    vec = f"int32x{lanes}"
    bcast = f"{'int8' if vnni else 'int16'}x{lanes * g}"
    intrin = st.intrin
    xor = _XOR_0x80 if shift else 0
    bt, m = _var("bt"), _var("m")
    kk, nn = _dim(k, "k"), _dim(n, "n")
    kg = _ceil_div(kk, g)
    kf = kk // g  # full k groups
    nb = _ceil_div(nn, nr)
    bb = 1 if shared_b else bt
    sb = 0 if shared_b else 1
    mb = _ceil_div(m, mr)
    acc_n = mr * nr
    assert acc_n * 4 < 1024, "register tile must stay below the stack-alloca limit"

    def mac(accv: Any, word: Any, wv: Any) -> Any:
        """accv + dot(broadcast k-group word, packed weight vector), int32 lanes, no saturation."""
        av = T.reinterpret(T.broadcast(T.bitwise_xor(word, T.int32(xor)), lanes), dtype=bcast)
        if vnni:
            return T.call_llvm_pure_intrin(vec, intrin, accv, av, wv)
        return accv + T.call_llvm_pure_intrin(vec, intrin, av, wv)

    @T.prim_func(private=True)
    def gemm(a: T.handle, w: T.handle, c_in: T.handle, c: T.handle):
        A = T.match_buffer(a, (bt, m, kk), a_dtype)
        W = T.match_buffer(w, (bb, nb, kg, nr * g), wdt)
        CORR = T.match_buffer(c_in, (bb, nb * nr), "int32")
        C = T.match_buffer(c, (bt, m, nn), "int32")
        for p in T.parallel(bt * nb):
            for blk in range(mb):
                acc = T.alloc_buffer((acc_n,), "int32", scope="global")
                tail = T.alloc_buffer((mr,), "int32", scope="global")
                for i in T.unroll(mr):
                    for v in T.unroll(nv):
                        acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = CORR[
                            (p // nb) * sb, T.ramp((p % nb) * nr + v * lanes, 1, lanes)
                        ]
                for q in range(kf):
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = mac(
                                acc[T.ramp((i * nv + v) * lanes, 1, lanes)],
                                _load_group(T, A, p // nb, T.min(blk * mr + i, m - 1), q * g, vnni),
                                W[(p // nb) * sb, p % nb, q, T.ramp(v * lanes * g, 1, lanes * g)],
                            )
                if kf < kg:
                    # last, partial k group: bytes beyond K are zero (weights are zero there)
                    for i in T.unroll(mr):
                        tail[i] = 0
                        for t in range(kk - kf * g):
                            tail[i] = tail[i] | _tail_elem(
                                T, A, p // nb, T.min(blk * mr + i, m - 1), kf * g + t, t, vnni
                            )
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = mac(
                                acc[T.ramp((i * nv + v) * lanes, 1, lanes)],
                                tail[i],
                                W[(p // nb) * sb, p % nb, kf, T.ramp(v * lanes * g, 1, lanes * g)],
                            )
                if (p % nb) * nr + nr <= nn:
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            C[
                                p // nb,
                                T.min(blk * mr + i, m - 1),
                                T.ramp((p % nb) * nr + v * lanes, 1, lanes),
                            ] = acc[T.ramp((i * nv + v) * lanes, 1, lanes)]
                else:
                    spill = T.alloc_buffer((acc_n,), "int32", scope="global")
                    for i in T.unroll(mr):
                        for v in T.unroll(nv):
                            spill[T.ramp((i * nv + v) * lanes, 1, lanes)] = acc[
                                T.ramp((i * nv + v) * lanes, 1, lanes)
                            ]
                    for i in T.unroll(mr):
                        for j in range(nn - (p % nb) * nr):
                            C[p // nb, T.min(blk * mr + i, m - 1), (p % nb) * nr + j] = spill[i * nr + j]

    return gemm


def _load_group(T: Any, A: Any, b: Any, row: Any, k0: Any, vnni: bool) -> Any:
    """One k group of a row of A as an int32: 4 bytes (vnni) or 2 sign/zero-extended int16."""
    if vnni:
        return T.reinterpret(A[b, row, T.ramp(k0, 1, 4)], dtype="int32")
    lo = T.bitwise_and(T.Cast("int32", A[b, row, k0]), T.int32(0xFFFF))
    hi = T.shift_left(T.Cast("int32", A[b, row, k0 + 1]), T.int32(16))
    return T.bitwise_or(lo, hi)


def _tail_elem(T: Any, A: Any, b: Any, row: Any, k: Any, t: Any, vnni: bool) -> Any:
    """Element ``k`` of a row placed at slot ``t`` of the last (partial) k group word."""
    if vnni:
        byte = T.Cast("int32", T.Cast("uint8", A[b, row, k]))
        return T.shift_left(byte, T.Cast("int32", t) * 8)
    half = T.bitwise_and(T.Cast("int32", A[b, row, k]), T.int32(0xFFFF))
    return T.shift_left(half, T.Cast("int32", t) * 16)


def _scalar_gemm(*, k: int | None, n: int | None, a_dtype: str, shared_b: bool) -> Any:
    from tvm.script import tirx as T

    bt, m = _var("bt"), _var("m")
    kk, nn = _dim(k, "k"), _dim(n, "n")
    bb = 1 if shared_b else bt
    sb = 0 if shared_b else 1

    @T.prim_func(private=True)
    def gemm(a: T.handle, w: T.handle, c_in: T.handle, c: T.handle):
        A = T.match_buffer(a, (bt, m, kk), a_dtype)
        W = T.match_buffer(w, (bb, kk, nn), "int8")
        CORR = T.match_buffer(c_in, (bb, nn), "int32")
        C = T.match_buffer(c, (bt, m, nn), "int32")
        for p in T.parallel(bt * m):
            for j in range(nn):
                C[p // m, p % m, j] = CORR[(p // m) * sb, j]
            for q in range(kk):
                for j in range(nn):
                    C[p // m, p % m, j] = C[p // m, p % m, j] + T.Cast("int32", A[p // m, p % m, q]) * T.Cast(
                        "int32", W[(p // m) * sb, q, j]
                    )

    return gemm


def pack_primfunc(st: Strategy, *, k: int | None, n: int | None, shift: bool, name: str = "qexport_pack") -> Any:
    """Run-time packing of an activation right-hand side ``B [Bt, K, N]`` int8 for ``st``.

    Outputs the packed operand and ``corr`` with the layouts of :func:`pack_weight`
    (``corr = -128 * colsum(B)`` when ``shift``, else zeros).
    """
    from tvm.script import tirx as T

    from qexport.backends.tvm import _cheap_inspect_stack

    bt = _var("bt")
    kk, nn = _dim(k, "k"), _dim(n, "n")
    if st.kind == "scalar":
        with _cheap_inspect_stack():

            @T.prim_func(private=True)
            def copy(b: T.handle, o: T.handle, c_out: T.handle):
                B = T.match_buffer(b, (bt, kk, nn), "int8")
                O = T.match_buffer(o, (bt, kk, nn), "int8")
                CORR = T.match_buffer(c_out, (bt, nn), "int32")
                for p in T.parallel(bt):
                    for q, j in T.grid(kk, nn):
                        O[p, q, j] = B[p, q, j]
                    for j in range(nn):
                        CORR[p, j] = 0

        return _finish(copy, name)

    lanes, g, nv, nr = st.lanes, st.group, st.nv, st.nr
    wdt = st.weight_dtype
    kg, nb = _ceil_div(kk, g), _ceil_div(nn, nr)
    scale = -128 if shift else 0
    with _cheap_inspect_stack():

        @T.prim_func(private=True)
        def pack(b: T.handle, o: T.handle, c_out: T.handle):
            B = T.match_buffer(b, (bt, kk, nn), "int8")
            O = T.match_buffer(o, (bt, nb, kg, nr * g), wdt)
            CORR = T.match_buffer(c_out, (bt, nb * nr), "int32")
            for p in T.parallel(bt):
                for j in range(nb * nr):
                    CORR[p, j] = 0
                for q, j in T.grid(kk, nn):
                    CORR[p, j] = CORR[p, j] + T.Cast("int32", B[p, q, j])
                for j in range(nb * nr):
                    CORR[p, j] = CORR[p, j] * scale
                for x, q, v, ln, t in T.grid(nb, kg, nv, lanes, g):
                    O[p, x, q, (v * lanes + ln) * g + t] = T.if_then_else(
                        q * g + t < kk and x * nr + v * lanes + ln < nn,
                        T.Cast(wdt, B[p, T.min(q * g + t, kk - 1), T.min(x * nr + v * lanes + ln, nn - 1)]),
                        T.Cast(wdt, 0),
                    )

    return _finish(pack, name)

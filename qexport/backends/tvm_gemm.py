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
    In a model the activations arrive as int16 (:func:`lower_int8_matmuls` casts them; FuseOps
    folds the cast into the producer), so a k pair of a row is one 32-bit broadcast load.
    ``vpmaddubsw`` is not used: it saturates its int16 pair sums (2 * 255 * 127 > 32767).
``scalar``
    Plain int32 multiply-accumulate loops (LLVM auto-vectorises); any target.

Exactness: each ``vpdpbusd`` / ``vpmaddwd`` step computes its 4 (2) products and their sum exactly
(|sum| <= 4 * 255 * 128 < 2^31) and adds it to the int32 accumulator modulo 2^32, without
saturation; the correction term is also added modulo 2^32. The result is therefore the exact
integer product reduced modulo 2^32: identical to any int32-accumulating reference (ONNX
``MatMulInteger``) for every K, and equal to the true product whenever it fits in int32
(always for |a|, |w| <= 128 and K < 131072; uint8 activations: K <= 65793).

Tiling: the parallel work items are (batch, NR-column weight panel, chunk of ~192 Ki elements of A),
chunks innermost, so that the threads' contiguous shares of the items split the weight panels
between them (with the chunks outermost, at M = 1024 each of 2 threads took one chunk and walked
all the panels: a 1024x384x1536 GEMM ran 1.3x faster on 2 threads instead of 1.8x; for large M
both orders are within a few percent); inside, ``MR``-row
blocks (the last block clamps its row index, recomputing a row rather than branching) hold an
``MR x NR`` register tile of int32 accumulators (3 x 64 for AVX-512: 12 zmm; 6 x 16 for AVX2,
whose 16 ymm registers also hold 2 weight vectors, the broadcast and a product) over the full K loop;
N tails are stored through a guarded copy. ``M`` (batch*seq), the batch and, for activation
right-hand sides, ``K``/``N`` may be symbolic. The tile stays below 1 KiB so TVM keeps it on the
stack (larger local buffers become heap workspaces) and LLVM promotes it to registers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

SCHEDULED_ATTR = "qexport.scheduled"
GEMM_ATTR = "qexport.gemm"  # JSON: the gemm_primfunc arguments a kernel was built from
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

    def kernel_a_dtype(self, a_dtype: str) -> str:
        """The activations' dtype in a model's kernel: int16 for madd (widened by the producer:
        one broadcast load per k pair), else ``a_dtype`` (int8/uint8) itself."""
        return "int16" if self.kind == "madd" else a_dtype


STRATEGIES: dict[str, Strategy] = {
    "vnni512": Strategy("vnni512", "vnni", 16, 4, "llvm.x86.avx512.vpdpbusd.512", 3, 4),
    # AVX-VNNI without AVX-512 has 16 ymm registers: 4 x 3 accumulators + 3 weight vectors + the
    # broadcast (the k loop of a 3 x 4 tile, compiled for alderlake, had 28 stack accesses)
    "vnni256": Strategy("vnni256", "vnni", 8, 4, "llvm.x86.avx512.vpdpbusd.256", 4, 3),
    "madd512": Strategy("madd512", "madd", 16, 2, "llvm.x86.avx512.pmaddw.d.512", 3, 4),
    # 16 ymm registers: 6 x 2 accumulators + 2 weight vectors + the broadcast + a product (3 x 4
    # spilled accumulators to the stack, a store-to-load chain in the k loop: 0.6x the speed)
    "madd256": Strategy("madd256", "madd", 8, 2, "llvm.x86.avx2.pmadd.wd", 6, 2),
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


def target_features(target: Any, features: Iterable[str]) -> frozenset[str]:
    """The CPU ``features`` (``/proc/cpuinfo`` spelling) the llvm ``target`` lets LLVM emit.

    LLVM answers for the target's ``mcpu`` and ``mattr`` (plain ``llvm`` is baseline x86-64:
    none; a host ``mcpu`` with ``-avx512f``: no AVX-512); a non-x86 ``mtriple`` gets none (the
    scalar path). Flags LLVM has no name for are kept.
    """
    from tvm.target.codegen import llvm_cpu_has_features

    from qexport.backends.tvm_cpu import is_x86
    from qexport.host import LLVM_FEATURES

    if not is_x86(target):
        return frozenset()
    return frozenset(f for f in features
                     if f not in LLVM_FEATURES or llvm_cpu_has_features(LLVM_FEATURES[f], target))


def _chunk_rows(k: int | None, mr: int) -> int:
    """Rows of A per parallel work item: about 192 Ki elements of A (L2 with one weight panel)."""
    rows = (192 * 1024) // (k if k is not None else 768)
    return max(mr, rows // mr * mr)


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


def _finish(func: Any) -> Any:
    """Mark a PrimFunc as scheduled and opaque (no global symbol: the module names it)."""
    return func.with_attrs(
        {
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
) -> Any:
    """``C[b, m, n] = sum_k A[b, m, k] * W[b or 0, k, n]`` in int32 over a packed ``W``.

    Arguments: ``A [Bt, M, K]`` (``a_dtype`` int8/uint8, or int16 for the madd strategies),
    packed ``W`` and ``corr`` as :func:`pack_weight` (first dim ``1`` when ``shared_b`` else
    ``Bt``), output ``C [Bt, M, N]``.
    ``k``/``n`` ``None`` = symbolic; ``Bt`` and ``M`` are always symbolic. Every store of ``C``
    is one element (in a vectorised loop for full tiles), the form into which
    :mod:`qexport.backends.tvm_epilogue` substitutes the consumer's elementwise chain; the
    function carries :data:`GEMM_ATTR` (what it was built from).
    """
    from qexport.backends.tvm import _cheap_inspect_stack

    with _cheap_inspect_stack():
        if st.kind == "scalar":
            func = _scalar_gemm(k=k, n=n, a_dtype=a_dtype, shared_b=shared_b)
        else:
            func = _simd_gemm(st, k=k, n=n, a_dtype=a_dtype, shared_b=shared_b)
    key = json.dumps({"strategy": st.name, "k": k, "n": n, "a_dtype": a_dtype, "shared_b": shared_b})
    return _finish(func).with_attr(GEMM_ATTR, key)


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
    mcr = _chunk_rows(k, mr)  # rows of A per chunk: A chunk + a weight panel stay in L2
    mcn = _ceil_div(m, mcr)
    acc_n = mr * nr
    assert acc_n * 4 < 1024, "register tile must stay below the stack-alloca limit"

    def mac(accv: Any, word: Any, wv: Any) -> Any:
        """accv + dot(broadcast k-group word, packed weight vector), int32 lanes, no saturation.

        ``word``: the k group as an int32 (vnni; the partial last group), or an ``int16xL`` pair
        broadcast already (:func:`_load_group`)."""
        if str(getattr(word, "ty", "")) == bcast:
            av = word
        else:
            av = T.reinterpret(T.broadcast(T.bitwise_xor(word, T.int32(xor)), lanes), dtype=bcast)
        if vnni:
            return T.call_llvm_pure_intrin(vec, intrin, accv, av, wv)
        return accv + T.call_llvm_pure_intrin(vec, intrin, av, wv)

    @T.prim_func(private=True, s_tir=True)
    def gemm(a: T.handle, w: T.handle, c_in: T.handle, c: T.handle):
        A = T.match_buffer(a, (bt, m, kk), a_dtype)
        W = T.match_buffer(w, (bb, nb, kg, nr * g), wdt)
        CORR = T.match_buffer(c_in, (bb, nb * nr), "int32")
        C = T.match_buffer(c, (bt, m, nn), "int32")
        with T.sblock("root"):
            for p in T.parallel(bt * mcn * nb):
                for blk in range(_ceil_div(T.min(mcr, m - (p % mcn) * mcr), mr)):
                    with T.sblock("tile"):
                        T.reads(A[0:bt, 0:m, 0:kk], W[0:bb, 0:nb, 0:kg, 0 : nr * g], CORR[0:bb, 0 : nb * nr])
                        T.writes(C[0:bt, 0:m, 0:nn])
                        acc = T.alloc_buffer((acc_n,), "int32", scope="global")
                        tail = T.alloc_buffer((mr,), "int32", scope="global")
                        for i in T.unroll(mr):
                            for v in T.unroll(nv):
                                acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = CORR[
                                    (p // (mcn * nb)) * sb,
                                    T.ramp(((p // mcn) % nb) * nr + v * lanes, 1, lanes),
                                ]
                        for q in range(kf):
                            for i in T.unroll(mr):
                                for v in T.unroll(nv):
                                    acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = mac(
                                        acc[T.ramp((i * nv + v) * lanes, 1, lanes)],
                                        _load_group(
                                            T,
                                            A,
                                            p // (mcn * nb),
                                            T.min((p % mcn) * mcr + blk * mr + i, m - 1),
                                            q * g,
                                            vnni,
                                            lanes,
                                            a_dtype,
                                        ),
                                        W[
                                            (p // (mcn * nb)) * sb,
                                            (p // mcn) % nb,
                                            q,
                                            T.ramp(v * lanes * g, 1, lanes * g),
                                        ],
                                    )
                        if kf < kg:
                            # last, partial k group: bytes beyond K are zero (weights are zero there)
                            for i in T.unroll(mr):
                                tail[i] = 0
                                for t in range(kk - kf * g):
                                    tail[i] = tail[i] | _tail_elem(
                                        T,
                                        A,
                                        p // (mcn * nb),
                                        T.min((p % mcn) * mcr + blk * mr + i, m - 1),
                                        kf * g + t,
                                        t,
                                        vnni,
                                    )
                            for i in T.unroll(mr):
                                for v in T.unroll(nv):
                                    acc[T.ramp((i * nv + v) * lanes, 1, lanes)] = mac(
                                        acc[T.ramp((i * nv + v) * lanes, 1, lanes)],
                                        tail[i],
                                        W[
                                            (p // (mcn * nb)) * sb,
                                            (p // mcn) % nb,
                                            kf,
                                            T.ramp(v * lanes * g, 1, lanes * g),
                                        ],
                                    )
                        if ((p // mcn) % nb) * nr + nr <= nn:
                            # one scalar store per element in a vectorised loop (vectorised to the
                            # same ramp store): the form into which an epilogue is substituted
                            for i in T.unroll(mr):
                                for v in T.unroll(nv):
                                    for ln in T.vectorized(lanes):
                                        C[
                                            p // (mcn * nb),
                                            T.min((p % mcn) * mcr + blk * mr + i, m - 1),
                                            ((p // mcn) % nb) * nr + v * lanes + ln,
                                        ] = acc[(i * nv + v) * lanes + ln]
                        else:
                            spill = T.alloc_buffer((acc_n,), "int32", scope="global")
                            for i in T.unroll(mr):
                                for v in T.unroll(nv):
                                    spill[T.ramp((i * nv + v) * lanes, 1, lanes)] = acc[
                                        T.ramp((i * nv + v) * lanes, 1, lanes)
                                    ]
                            for i in T.unroll(mr):
                                for j in range(nn - ((p // mcn) % nb) * nr):
                                    C[
                                        p // (mcn * nb),
                                        T.min((p % mcn) * mcr + blk * mr + i, m - 1),
                                        ((p // mcn) % nb) * nr + j,
                                    ] = spill[i * nr + j]

    return gemm


def _load_group(T: Any, A: Any, b: Any, row: Any, k0: Any, vnni: bool, lanes: int = 8,
                a_dtype: str = "int8") -> Any:
    """One k group of a row of A: 4 bytes as an int32 (vnni); int16 ``A`` (the madd kernels in a
    model: widened by its producer): the pair ``(a[k0], a[k0+1])`` as an int32, one broadcast
    load; int8/uint8 ``A`` in a madd kernel: the pair widened in registers, repeated over
    ``lanes`` int32 lanes (a 2-byte broadcast and one ``vpmovsxbw``/``vpmovzxbw``; building it in
    scalar registers took 7 instructions per row and k pair, and the kernel was front-end bound)."""
    if vnni:
        return T.reinterpret(A[b, row, T.ramp(k0, 1, 4)], dtype="int32")
    if a_dtype == "int16":  # widened by the producer: the pair is one 32-bit broadcast load
        return T.reinterpret(A[b, row, T.ramp(k0, 1, 2)], dtype="int32")
    pair = T.reinterpret(A[b, row, T.ramp(k0, 1, 2)], dtype="int16")
    widen = T.reinterpret(T.broadcast(pair, lanes), dtype=f"{a_dtype}x{2 * lanes}")
    return T.Cast(f"int16x{2 * lanes}", widen)


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

    @T.prim_func(private=True, s_tir=True)
    def gemm(a: T.handle, w: T.handle, c_in: T.handle, c: T.handle):
        A = T.match_buffer(a, (bt, m, kk), a_dtype)
        W = T.match_buffer(w, (bb, kk, nn), "int8")
        CORR = T.match_buffer(c_in, (bb, nn), "int32")
        C = T.match_buffer(c, (bt, m, nn), "int32")
        with T.sblock("root"):
            for p in T.parallel(bt * m):
                for j in range(nn):
                    C[p // m, p % m, j] = CORR[(p // m) * sb, j]
                for q in range(kk):
                    for j in range(nn):
                        C[p // m, p % m, j] = C[p // m, p % m, j] + T.Cast(
                            "int32", A[p // m, p % m, q]
                        ) * T.Cast("int32", W[(p // m) * sb, q, j])

    return gemm


def pack_primfunc(st: Strategy, *, k: int | None, n: int | None, shift: bool) -> Any:
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

            @T.prim_func(private=True, s_tir=True)
            def copy(b: T.handle, o: T.handle, c_out: T.handle):
                B = T.match_buffer(b, (bt, kk, nn), "int8")
                PK = T.match_buffer(o, (bt, kk, nn), "int8")
                CORR = T.match_buffer(c_out, (bt, nn), "int32")
                with T.sblock("root"):
                    for p in T.parallel(bt):
                        for q, j in T.grid(kk, nn):
                            PK[p, q, j] = B[p, q, j]
                        for j in range(nn):
                            CORR[p, j] = 0

        return _finish(copy)

    lanes, g, nv, nr = st.lanes, st.group, st.nv, st.nr
    wdt = st.weight_dtype
    kg, nb = _ceil_div(kk, g), _ceil_div(nn, nr)
    scale = -128 if shift else 0
    with _cheap_inspect_stack():

        @T.prim_func(private=True, s_tir=True)
        def pack(b: T.handle, o: T.handle, c_out: T.handle):
            B = T.match_buffer(b, (bt, kk, nn), "int8")
            PK = T.match_buffer(o, (bt, nb, kg, nr * g), wdt)
            CORR = T.match_buffer(c_out, (bt, nb * nr), "int32")
            with T.sblock("root"):
                for p in T.parallel(bt):
                    for j in range(nb * nr):
                        CORR[p, j] = 0
                    for q, j in T.grid(kk, nn):
                        CORR[p, j] = CORR[p, j] + T.Cast("int32", B[p, q, j])
                    for j in range(nb * nr):
                        CORR[p, j] = CORR[p, j] * scale
                    for x, q, v, ln, t in T.grid(nb, kg, nv, lanes, g):
                        PK[p, x, q, (v * lanes + ln) * g + t] = T.if_then_else(
                            q * g + t < kk and x * nr + v * lanes + ln < nn,
                            T.Cast(
                                wdt, B[p, T.min(q * g + t, kk - 1), T.min(x * nr + v * lanes + ln, nn - 1)]
                            ),
                            T.Cast(wdt, 0),
                        )

    return _finish(pack)


# --------------------------------------------------------------------------------------------
# the Relax pass
# --------------------------------------------------------------------------------------------
@dataclass
class _Operand:
    expr: Any  # the int8/uint8 Relax expression (or the Constant for weights)
    dtype: str
    const: np.ndarray | None  # the int8 values when the operand is a constant


def _dtype_of(expr: Any) -> str:
    dt = getattr(expr.ty, "dtype", "")
    return str(getattr(dt, "dtype", dt))


def _const_value(expr: Any, var2val: dict[Any, Any]) -> np.ndarray | None:
    import tvm
    from tvm import relax

    while isinstance(expr, relax.Var) and expr in var2val:
        expr = var2val[expr]
    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return np.asarray(expr.value.numpy())
    return None


def _is_const_all(expr: Any, value: float, var2val: dict[Any, Any]) -> bool:
    v = _const_value(expr, var2val)
    return v is not None and bool(np.all(v == value))


def _int_operand(expr: Any, var2val: dict[Any, Any], *, float_form: bool) -> _Operand | None:
    """See through ``astype(x, int32)`` (integer form) or ``dequantize(x, 1, 0)`` (qdq form)."""
    from tvm import relax

    src = expr
    if isinstance(src, relax.Var) and src in var2val:
        src = var2val[src]
    inner = None
    if isinstance(src, relax.Call):
        op_name = getattr(src.op, "name", "")
        if (
            not float_form
            and op_name == "relax.astype"
            and _dtype_of(src) == "int32"
            or (
                float_form
                and op_name == "relax.dequantize"
                and _is_const_all(src.args[1], 1.0, var2val)
                and _is_const_all(src.args[2], 0, var2val)
            )
        ):
            inner = src.args[0]
    if inner is None:
        if float_form:
            return None
        inner = expr  # already int8 / uint8 (after the int8 rewrite)
    dt = _dtype_of(inner)
    if dt not in ("int8", "uint8"):
        return None
    cv = _const_value(inner, var2val)
    return _Operand(inner, dt, cv if cv is not None and cv.dtype == np.int8 else None)


def _shape(expr: Any) -> list[Any] | None:
    from tvm import relax

    ty = expr.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = ty.shape
    values = getattr(shape, "values", None)
    return list(values) if values is not None else None


def _static(x: Any) -> int | None:
    from tvm import tirx

    return int(x.value) if isinstance(x, tirx.IntImm) else (int(x) if isinstance(x, int) else None)


def _prod(xs: list[Any]) -> Any:
    out: Any = 1
    for x in xs:
        out = out * x
    return out


def lower_int8_matmuls(mod: Any, target: Any, features: frozenset[str]) -> tuple[Any, list[dict]]:
    """Relax pass, run after ``_int8_matmul_rewrite`` and BEFORE ``LegalizeOps``.

    Replaces int8/uint8 x int8 -> int32 matmuls (linears with constant weights, attention
    batch-matmuls ``Q @ K^T`` and ``P @ V``, in the integer and the qdq form) by ``call_tir`` to
    PrimFuncs that are already scheduled; they carry ``qexport.scheduled`` = True,
    ``tir.is_scheduled`` and ``op_pattern`` kOpaque (8), so FuseOps and default schedules leave
    them alone. ``features``: the CPU flags (``/proc/cpuinfo`` spelling) that choose the kernel
    (:func:`select_strategy`) among those the ``target`` lets LLVM emit (:func:`target_features`:
    ``-mcpu`` = the host CPU keeps them all, a non-x86 target gets the scalar path). Returns the
    module and one record per matmul: name, operand shapes/dtypes, form, kind (linear /
    batch_matmul), strategy, weight layout, or ``skipped`` with the reason it was left untouched
    (then the generic schedule handles it). :func:`summarize` condenses them for a sidecar.
    """
    from tvm import relax

    kind = getattr(getattr(target, "kind", None), "name", "llvm")
    keys = {str(k) for k in getattr(target, "keys", [])}
    if kind != "llvm":
        return mod, [{"skipped": f"target {kind} is not a CPU llvm target"}]
    if keys and "cpu" not in keys:
        return mod, [{"skipped": f"target keys {sorted(keys)} are not cpu"}]
    usable = target_features(target, features)
    st = select_strategy(usable)
    rewriter = _Rewriter(mod, st)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            rewriter.var2val = relax.analysis.get_var2val(func)
            new_func = rewriter.visit_expr(func)
            rewriter.builder_.update_func(gv, new_func)
    out = rewriter.builder_.get()
    return out, rewriter.records


def summarize(records: list[dict]) -> str:
    """One line for a build sidecar, e.g. ``vnni512: 48 linear, 24 batch_matmul; 0 left``."""
    done = [r for r in records if "skipped" not in r]
    left = [r for r in records if "skipped" in r]
    if not records:
        return "no int8 matmuls"
    kinds: dict[str, int] = {}
    for r in done:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    strategies = sorted({r["strategy"] for r in done}) or ["none"]
    body = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items())) or "nothing lowered"
    why = sorted({str(r["skipped"]) for r in left})
    return f"{'/'.join(strategies)}: {body}; {len(left)} left" + (f" ({'; '.join(why)})" if why else "")


def _make_rewriter() -> Any:
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Rewriter(PyExprMutator):
        def __init__(self, mod: Any, st: Strategy) -> None:
            super().__init__(mod)
            self.st = st
            self.records: list[dict] = []
            self.var2val: dict[Any, Any] = {}
            self.funcs: dict[tuple, Any] = {}

        def visit_call_(self, op: Any) -> Any:
            call = super().visit_call_(op)
            if getattr(call.op, "name", "") != "relax.matmul":
                return call
            try:
                new = self._lower(call)
            except Exception as exc:  # noqa: BLE001 - leave the matmul to the generic schedule
                self.records.append({"name": f"matmul{len(self.records)}", "skipped": f"error: {exc}"})
                return call
            return call if new is None else new

        def _func(self, key: tuple, build: Any, name: str) -> Any:
            if key not in self.funcs:
                self.funcs[key] = self.builder_.add_func(build(), name)
            return self.funcs[key]

        def _lower(self, call: Any) -> Any:
            st = self.st
            rec: dict[str, Any] = {"name": f"matmul{len(self.records)}"}
            out_dt = _dtype_of(call)
            float_form = out_dt == "float32"
            if out_dt not in ("int32", "float32"):
                return None
            a = _int_operand(call.args[0], self.var2val, float_form=float_form)
            b = _int_operand(call.args[1], self.var2val, float_form=float_form)
            if a is None or b is None:
                if out_dt == "int32" and {_dtype_of(call.args[0]), _dtype_of(call.args[1])} <= {
                    "int8",
                    "uint8",
                }:
                    rec["skipped"] = "operand dtypes not int8/uint8 x int8"
                    self.records.append(rec)
                return None
            rec["form"] = "qdq" if float_form else "integer"
            rec["dtypes"] = [a.dtype, b.dtype]
            sa, sb = _shape(a.expr), _shape(b.expr)
            so = _shape(call)
            rec["shapes"] = [[str(x) for x in s] if s is not None else None for s in (sa, sb)]
            rec["strategy"] = st.name
            if sa is None or sb is None or so is None or len(sa) < 2 or len(sb) < 2:
                rec["skipped"] = "unknown rank"
            elif b.dtype != "int8":
                rec["skipped"] = "right-hand side must be int8"
            elif _static(sa[-1]) is None and b.const is not None:
                rec["skipped"] = "symbolic K with a constant weight"
            if "skipped" in rec:
                self.records.append(rec)
                return None
            assert sa is not None and sb is not None and so is not None
            k, n = sa[-1], sb[-1]
            ks, ns = _static(k), _static(n)
            shift = st.kind == "vnni" and a.dtype == "int8"
            bb = self.builder_
            if b.const is not None and len(sb) == 2:
                # linear: [.., M, K] x [K, N] constant
                mtot = _prod(sa[:-1])
                packed, corr = pack_weight(b.const, st, a.dtype == "int8")
                wexpr, cexpr = relax.const(packed), relax.const(corr)
                shared = True
                batch: Any = 1
                m_rows: Any = mtot
                rec["kind"] = "linear"
                rec["weight_layout"] = f"packed {list(packed.shape)} {packed.dtype}" + (
                    " + corr -128*colsum" if shift else ""
                )
            elif (
                len(sa) == len(sb)
                and len(sa) >= 3
                and all(_same(x, y) for x, y in zip(sa[:-2], sb[:-2], strict=True))
            ):
                batch = _prod(sa[:-2])
                m_rows = sa[-2]
                b3 = bb.emit(relax.op.reshape(b.expr, [batch, sb[-2], n]))
                pk = self._func(
                    ("pack", st.name, ks, ns, shift),
                    lambda: pack_primfunc(st, k=ks, n=ns, shift=shift),
                    f"qexport_pack_{st.name}",
                )
                if st.kind == "scalar":
                    pshape: list[Any] = [batch, k, n]
                    cshape: list[Any] = [batch, n]
                else:
                    nbk = _ceil_div(n, st.nr)
                    pshape = [batch, nbk, _ceil_div(k, st.group), st.nr * st.group]
                    cshape = [batch, nbk * st.nr]
                packed_t = bb.emit(
                    relax.call_tir(
                        pk,
                        [b3],
                        [
                            relax.TensorType(pshape, st.weight_dtype),
                            relax.TensorType(cshape, "int32"),
                        ],
                    )
                )
                wexpr = bb.emit(relax.TupleGetItem(packed_t, 0))
                cexpr = bb.emit(relax.TupleGetItem(packed_t, 1))
                shared = False
                rec["kind"] = "batch_matmul"
                rec["weight_layout"] = "packed per call" + (" + corr -128*colsum" if shift else "")
            else:
                rec["skipped"] = "batch dims differ (broadcasting matmul)"
                self.records.append(rec)
                return None
            a_expr, a_dt = a.expr, st.kernel_a_dtype(a.dtype)
            if a_dt != a.dtype:
                # int16 activations (exact: int8/uint8 widen): FuseOps folds the cast into the
                # producer, and each k pair is one broadcast load in the kernel
                a_expr = relax.op.astype(a.expr, a_dt)
                rec["activations"] = "int16 (widened by the producer)"
            gemm = self._func(
                ("gemm", st.name, ks, ns, a_dt, shared),
                lambda: gemm_primfunc(st, k=ks, n=ns, a_dtype=a_dt, shared_b=shared),
                f"qexport_gemm_{st.name}_{a_dt}",
            )
            a3 = bb.emit(relax.op.reshape(a_expr, [batch, m_rows, k]))
            c3 = bb.emit(
                relax.call_tir(gemm, [a3, wexpr, cexpr], relax.TensorType([batch, m_rows, n], "int32"))
            )
            out: Any = relax.op.reshape(c3, so)
            if float_form:
                out = relax.op.astype(bb.emit(out), "float32")
            self.records.append(rec)
            return out

    return Rewriter


def _same(x: Any, y: Any) -> bool:
    """Equal batch extents: equal ints, or the same symbolic expression."""
    sx, sy = _static(x), _static(y)
    if sx is not None or sy is not None:
        return sx == sy
    return str(x) == str(y)


_REWRITER: Any = None


def _Rewriter(mod: Any, st: Strategy) -> Any:  # noqa: N802 - a lazily built class
    global _REWRITER
    if _REWRITER is None:
        _REWRITER = _make_rewriter()
    return _REWRITER(mod, st)

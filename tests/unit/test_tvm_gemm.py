"""Exact int8 GEMM kernels for TVM on CPU (qexport.backends.tvm_gemm) against numpy int64.

Every path this CPU can execute is forced by name (the AVX2 path runs on an AVX-512 VNNI host
too); operands use the extreme values -128/127/0 (int8) and 0/255 (uint8), shapes are odd (K and
N not multiples of 4/16, M=1) and M is symbolic (one build, several M). The module tests import a
small integer ONNX graph (integer and qdq linears, Q @ K^T and uint8 P @ V attention matmuls,
dynamic batch/seq), lower it and compare with onnxruntime element for element.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.tiny import save_checked_graph

tvm = pytest.importorskip("tvm")

from qexport.backends import tvm_gemm as G  # noqa: E402
from qexport.host import cpu_flags  # noqa: E402

pytestmark = pytest.mark.tvm

HOST = frozenset(cpu_flags())
_NEEDS = {
    "vnni512": {"avx512f", "avx512_vnni"},
    "vnni256": {"avx512_vnni", "avx512vl"},
    "madd512": {"avx512f", "avx512bw"},
    "madd256": {"avx2"},
    "scalar": set(),
}
RUNNABLE = [
    name for name, need in _NEEDS.items() if need <= HOST or (name == "vnni256" and "avx_vnni" in HOST)
]


def _target() -> Any:
    from qexport.backends.tvm_cpu import llvm_target_spec

    return tvm.target.Target(llvm_target_spec({"kind": "llvm"}))


def _extreme(rng: np.random.Generator, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Mostly extreme values (the corners of the range and 0), some random ones."""
    lo, hi = (-128, 127) if dtype == "int8" else (0, 255)
    pick = rng.integers(0, 4, shape)
    rand = rng.integers(lo, hi + 1, shape)
    return np.choose(pick, [np.full(shape, lo), np.full(shape, hi), np.zeros(shape, np.int64), rand]).astype(
        dtype
    )


def _wrap32(x: np.ndarray) -> np.ndarray:
    """int64 -> int32 modulo 2^32 (what an int32-accumulating MatMulInteger returns)."""
    return ((x + 2**31) % 2**32 - 2**31).astype(np.int32)


def _build(func: Any) -> Any:
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), _target())


def _run_gemm(lib: Any, a: np.ndarray, packed: np.ndarray, corr: np.ndarray, n: int) -> np.ndarray:
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros((a.shape[0], a.shape[1], n), np.int32), dev)
    args = [tvm.runtime.tensor(x, dev) for x in (a, packed, corr)]
    lib["main"](*args, out)
    return out.numpy()


def test_select_strategy() -> None:
    assert G.select_strategy({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vl"}).name == "vnni512"
    assert G.select_strategy({"avx2", "avx_vnni"}).name == "vnni256"
    assert G.select_strategy({"avx2", "avx512f", "avx512bw"}).name == "madd512"
    assert G.select_strategy({"avx2", "fma"}).name == "madd256"
    assert G.select_strategy(set()).name == "scalar"


def test_pack_weight_layout_and_correction() -> None:
    st = G.STRATEGIES["vnni512"]
    w = np.arange(-60, 70, dtype=np.int64).reshape(5, 26).astype(np.int8)  # K=5, N=26: both padded
    packed, corr = G.pack_weight(w, st, a_signed=True)
    assert packed.shape == (1, 1, 2, st.nr * 4) and packed.dtype == np.int8
    # column n, k group q, slot t lives at [0, n // NR, q, (n % NR) * 4 + t]
    for k in range(5):
        for n in range(26):
            assert packed[0, 0, k // 4, n * 4 + k % 4] == w[k, n]
    assert not packed[0, 0, 1, 3::4].any()  # k = 7 is padding
    np.testing.assert_array_equal(corr[0, :26], -128 * w.astype(np.int64).sum(0))
    assert not corr[0, 26:].any()
    _, corr_u8 = G.pack_weight(w, st, a_signed=False)
    assert not corr_u8.any()  # uint8 activations need no shift
    p16, _ = G.pack_weight(w, G.STRATEGIES["madd256"], a_signed=True)
    assert p16.dtype == np.int16 and p16[0, 0, 2, 1 * 2 + 0] == w[4, 1]


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8", "int16"])
@pytest.mark.parametrize("k,n", [(5, 3), (13, 70), (64, 48), (130, 129)])
def test_gemm_exact_dynamic_m(name: str, a_dtype: str, k: int, n: int) -> None:
    st = G.STRATEGIES[name]
    if a_dtype == "int16" and st.kind != "madd":
        pytest.skip("int16 activations are the madd kernels' form")
    lib = _build(G.gemm_primfunc(st, k=k, n=n, a_dtype=a_dtype, shared_b=True))
    rng = np.random.default_rng(k * 1000 + n)
    w = _extreme(rng, (k, n), "int8")
    packed, corr = G.pack_weight(w, st, a_signed=a_dtype == "int8")
    for m in (1, 2, 7, 13):  # one build, symbolic M: full tiles and clamped tails
        if a_dtype == "int16":  # widened int8 and uint8 values side by side
            a = np.where(rng.integers(0, 2, (1, m, k)), _extreme(rng, (1, m, k), "int8"),
                         _extreme(rng, (1, m, k), "uint8")).astype(np.int16)
        else:
            a = _extreme(rng, (1, m, k), a_dtype)
        got = _run_gemm(lib, a, packed, corr, n)
        np.testing.assert_array_equal(got, a.astype(np.int64) @ w.astype(np.int64))


@pytest.mark.parametrize("name", RUNNABLE)
def test_gemm_extreme_corners(name: str) -> None:
    """All-corner operands: the largest |sums| of each sign (the +128 shift's worst case), M > 2 chunks."""
    st = G.STRATEGIES[name]
    k, n = 771, 35
    lib = _build(G.gemm_primfunc(st, k=k, n=n, a_dtype="int8", shared_b=True))
    rows = np.stack([np.full(k, -128), np.full(k, 127), np.full(k, -128), np.zeros(k)]).astype(np.int8)
    a = np.tile(rows, (131, 1))[None, :521]  # 521 rows: three row chunks of the parallel loop
    assert G._chunk_rows(k, st.mr) < 521 // 2
    w = np.tile(np.array([-128, 127], np.int8), (k, n))[:, :n].copy()
    w[:, 0] = -128
    packed, corr = G.pack_weight(w, st, a_signed=True)
    ref = a.astype(np.int64) @ w.astype(np.int64)
    assert ref.max() == 128 * 128 * k
    np.testing.assert_array_equal(_run_gemm(lib, a, packed, corr, n), ref)


@pytest.mark.parametrize("name", RUNNABLE)
def test_gemm_wraps_like_int32_accumulation(name: str) -> None:
    """Past int32 the result is the exact sum modulo 2^32, as MatMulInteger's int32 accumulator."""
    st = G.STRATEGIES[name]
    k, n = 70000, 17  # 255 * -128 * 70000 < -2^31
    lib = _build(G.gemm_primfunc(st, k=k, n=n, a_dtype="uint8", shared_b=True))
    a = np.full((1, 1, k), 255, np.uint8)
    w = np.full((k, n), -128, np.int8)
    packed, corr = G.pack_weight(w, st, a_signed=False)
    ref = a.astype(np.int64) @ w.astype(np.int64)
    assert ref.min() < -(2**31)
    np.testing.assert_array_equal(_run_gemm(lib, a, packed, corr, n), _wrap32(ref))


@pytest.mark.parametrize("name", RUNNABLE)
@pytest.mark.parametrize("a_dtype", ["int8", "uint8"])
def test_batched_activation_rhs_dynamic_k_n(name: str, a_dtype: str) -> None:
    """Run-time packing + GEMM per batch with symbolic batch, M, K and N (attention shapes)."""
    st = G.STRATEGIES[name]
    shift = st.kind == "vnni" and a_dtype == "int8"
    pack = _build(G.pack_primfunc(st, k=None, n=None, shift=shift))
    gemm = _build(G.gemm_primfunc(st, k=None, n=None, a_dtype=a_dtype, shared_b=False))
    dev = tvm.cpu()
    rng = np.random.default_rng(7)
    for bt, m, k, n in ((3, 5, 32, 9), (2, 1, 7, 33), (1, 17, 18, 32)):
        a = _extreme(rng, (bt, m, k), a_dtype)
        b = _extreme(rng, (bt, k, n), "int8")
        pshape: tuple[int, ...]
        if st.kind == "scalar":
            pshape, cshape = (bt, k, n), (bt, n)
        else:
            nb = -(-n // st.nr)
            pshape, cshape = (bt, nb, -(-k // st.group), st.nr * st.group), (bt, nb * st.nr)
        packed = tvm.runtime.tensor(np.zeros(pshape, st.weight_dtype), dev)
        corr = tvm.runtime.tensor(np.zeros(cshape, np.int32), dev)
        pack["main"](tvm.runtime.tensor(b, dev), packed, corr)
        got = _run_gemm(gemm, a, packed.numpy(), corr.numpy(), n)
        np.testing.assert_array_equal(got, a.astype(np.int64) @ b.astype(np.int64))


# --------------------------------------------------------------------------------------------
# the Relax pass on imported ONNX graphs
# --------------------------------------------------------------------------------------------
HID, HEADS, HD, FF = 40, 2, 20, 37


def _attn_graph(path: Path, linear: str) -> Path:
    """Linear (int8 x const) -> Q @ K^T (int8 x int8) -> uint8 P @ V -> linear to FF=37 columns.

    ``linear``: ``integer`` (MatMulInteger) or ``qdq`` (DequantizeLinear scale 1 -> MatMul ->
    Cast int32), the two forms of ``qexport onnx --linear``.
    """
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(_extreme(rng, (HID, HID), "int8"), "wq"),
        nh.from_array(_extreme(rng, (HID, HID), "int8"), "wk"),
        nh.from_array(_extreme(rng, (HID, FF), "int8"), "wo"),
        nh.from_array(np.array(1.0, np.float32), "one_f"),
        nh.from_array(np.array(0, np.int8), "zp8"),
        nh.from_array(np.array(0, np.uint8), "zpu8"),
        nh.from_array(np.array([0, 0, HEADS, HD], np.int64), "split_shape"),
        nh.from_array(np.array(2048, np.int32), "d_q"),
        nh.from_array(np.array(4096, np.int32), "d_s"),
        nh.from_array(np.array(64, np.int32), "d_c"),
        nh.from_array(np.array(255, np.int32), "i255"),
        nh.from_array(np.array(0, np.int32), "i0"),
        nh.from_array(np.array(127, np.int32), "i127"),
        nh.from_array(np.array(-128, np.int32), "im128"),
    ]
    n = h.make_node
    nodes: list[Any] = []

    def mm(a: str, b: str, out: str, a_u8: bool = False) -> None:
        if linear == "integer":
            nodes.append(n("MatMulInteger", [a, b], [out]))
            return
        nodes.append(n("DequantizeLinear", [a, "one_f", "zpu8" if a_u8 else "zp8"], [out + "_af"]))
        nodes.append(n("DequantizeLinear", [b, "one_f", "zp8"], [out + "_bf"]))
        nodes.append(n("MatMul", [out + "_af", out + "_bf"], [out + "_f"]))
        nodes.append(n("Cast", [out + "_f"], [out], to=T.INT32))

    def to_i8(x: str, div: str, out: str) -> None:
        nodes.extend(
            [
                n("Div", [x, div], [out + "_d"]),
                n("Min", [out + "_d", "i127"], [out + "_a"]),
                n("Max", [out + "_a", "im128"], [out + "_b"]),
                n("Cast", [out + "_b"], [out], to=T.INT8),
            ]
        )

    mm("x", "wq", "q32")
    mm("x", "wk", "k32")
    to_i8("q32", "d_q", "q8")
    to_i8("k32", "d_q", "k8")
    nodes += [
        n("Reshape", ["q8", "split_shape"], ["q4"]),
        n("Reshape", ["k8", "split_shape"], ["k4"]),
        n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),  # [B,H,S,D]
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),  # [B,H,D,S]
        n("Transpose", ["k4"], ["vh"], perm=[0, 2, 1, 3]),  # V = K heads: [B,H,S,D]
    ]
    mm("qh", "kt", "s32")
    nodes += [
        n("Abs", ["s32"], ["s_abs"]),
        n("Div", ["s_abs", "d_s"], ["s_d"]),
        n("Min", ["s_d", "i255"], ["s_c"]),
        n("Cast", ["s_c"], ["p8"], to=T.UINT8),  # uint8 "probabilities" in [0, 255]
    ]
    mm("p8", "vh", "ctx32", a_u8=True)
    to_i8("ctx32", "d_c", "ctx8")
    nodes += [
        n("Transpose", ["ctx8"], ["ctx_t"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ctx_t", "flat_shape"], ["ctx_f"]),
    ]
    inits.append(nh.from_array(np.array([0, 0, HID], np.int64), "flat_shape"))
    mm("ctx_f", "wo", "y")
    graph = h.make_graph(
        nodes,
        "attn",
        [h.make_tensor_value_info("x", T.INT8, ["batch", "seq", HID])],
        [
            h.make_tensor_value_info("y", T.INT32, ["batch", "seq", FF]),
            h.make_tensor_value_info("s32", T.INT32, ["batch", HEADS, "seq", "seq"]),
        ],
        inits,
    )
    return save_checked_graph(graph, path)


def _lowered(
    path: Path, features: frozenset[str], shapes: tuple[int, int] | None = None
) -> tuple[Any, list[dict]]:
    import onnx
    from tvm.relax.frontend.onnx import from_onnx

    from qexport.backends.tvm import _flatten_onnx, _int8_matmul_rewrite

    shape_dict = None if shapes is None else {"x": [shapes[0], shapes[1], HID]}
    mod = from_onnx(_flatten_onnx(onnx.load(str(path))), shape_dict=shape_dict, keep_params_in_input=False)
    mod, _ = _int8_matmul_rewrite(mod)
    return G.lower_int8_matmuls(mod, _target(), features)


def _check_against_ort(
    path: Path, mod: Any, sizes: tuple[tuple[int, int], ...] = ((2, 9), (1, 1), (3, 20))
) -> None:
    import onnxruntime as ort
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, _target()), tvm.cpu())
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(3)
    for batch, seq in sizes:
        x = _extreme(rng, (batch, seq, HID), "int8")
        got = vm["main"](tvm.runtime.tensor(x, tvm.cpu()))
        ref = sess.run(["y", "s32"], {"x": x})
        assert len(np.unique(ref[0])) > FF or batch * seq == 1  # a live graph, not all zeros
        for g, r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(g.numpy(), r)


@pytest.mark.parametrize("linear", ["integer", "qdq"])
def test_lower_module_host_matches_ort(tmp_path: Path, linear: str) -> None:
    path = _attn_graph(tmp_path / f"{linear}.onnx", linear)
    mod, records = _lowered(path, HOST)
    assert [r["kind"] for r in records] == ["linear", "linear", "batch_matmul", "batch_matmul", "linear"]
    assert all(r["form"] == linear and "skipped" not in r for r in records)
    assert records[3]["dtypes"] == ["uint8", "int8"]
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]
    assert funcs and all(f.attrs[G.SCHEDULED_ATTR] and int(f.attrs["op_pattern"]) == 8 for f in funcs)
    _check_against_ort(path, mod)


@pytest.mark.parametrize("features", [frozenset({"avx2"}), frozenset()], ids=["avx2", "scalar"])
def test_lower_module_forced_paths_match_ort(tmp_path: Path, features: frozenset[str]) -> None:
    if not features <= HOST:
        pytest.skip("this CPU lacks AVX2")
    path = _attn_graph(tmp_path / "integer.onnx", "integer")
    mod, records = _lowered(path, features)
    assert {r["strategy"] for r in records} == {G.select_strategy(features).name}
    # the madd kernels take int16 activations (one broadcast load per k pair), the others bytes
    widened = {r.get("activations") for r in records}
    assert widened == ({"int16 (widened by the producer)"} if G.select_strategy(features).kind == "madd"
                       else {None})
    _check_against_ort(path, mod)


def test_lower_module_static_shapes_matches_ort(tmp_path: Path) -> None:
    """``qexport tvm --shapes`` imports static batch/seq: the same kernels, M a constant."""
    path = _attn_graph(tmp_path / "integer.onnx", "integer")
    mod, records = _lowered(path, HOST, shapes=(2, 9))
    assert len(records) == 5 and all("skipped" not in r for r in records)
    assert records[0]["shapes"][0] == ["T.int64(2)", "T.int64(9)", f"T.int64({HID})"]
    _check_against_ort(path, mod, sizes=((2, 9),))


def test_broadcasting_batch_matmul_is_left_alone() -> None:
    from tvm import relax

    bsz = tvm.tirx.Var("b", "int64")
    x = relax.Var("x", relax.TensorType([bsz, 3, 4, 8], "int8"))
    y = relax.Var("y", relax.TensorType([3, 8, 5], "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x, y]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.matmul(x, y, out_dtype="int32")))
        bb.emit_func_output(out)
    mod, records = G.lower_int8_matmuls(bb.get(), _target(), HOST)
    assert records == [
        {
            "name": "matmul0",
            "form": "integer",
            "dtypes": ["int8", "int8"],
            "shapes": [
                ["b", "T.int64(3)", "T.int64(4)", "T.int64(8)"],
                ["T.int64(3)", "T.int64(8)", "T.int64(5)"],
            ],
            "strategy": G.select_strategy(HOST).name,
            "skipped": "batch dims differ (broadcasting matmul)",
        }
    ]
    assert not [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_non_cpu_target_is_untouched() -> None:
    from tvm import relax

    x = relax.Var("x", relax.TensorType([4, 8], "int8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        out = bb.emit(relax.op.matmul(x, relax.const(np.ones((8, 3), np.int8)), out_dtype="int32"))
        bb.emit_func_output(out)
    mod = bb.get()
    new, records = G.lower_int8_matmuls(mod, tvm.target.Target({"kind": "cuda", "arch": "sm_75"}), HOST)
    assert new is mod and records == [{"skipped": "target cuda is not a CPU llvm target"}]


def test_target_features_and_summary() -> None:
    flags = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512vl"})
    host = tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})
    assert G.target_features(host, flags) == flags
    assert G.target_features(tvm.target.Target("llvm"), flags) == frozenset()  # baseline x86-64
    only_avx2 = tvm.target.Target({"kind": "llvm", "mattr": ["+avx2"]})
    assert G.select_strategy(G.target_features(only_avx2, flags)).name == "madd256"
    no_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": ["-avx512vnni"]})
    assert G.select_strategy(G.target_features(no_vnni, flags)).name == "madd512"
    arm = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    assert G.target_features(arm, flags) == frozenset()
    records = [
        {"kind": "linear", "strategy": "vnni512"},
        {"kind": "linear", "strategy": "vnni512"},
        {"kind": "batch_matmul", "strategy": "vnni512"},
        {"skipped": "batch dims differ (broadcasting matmul)"},
    ]
    assert G.summarize(records) == (
        "vnni512: 1 batch_matmul, 2 linear; 1 left (batch dims differ (broadcasting matmul))"
    )
    assert G.summarize([]) == "no int8 matmuls"


def test_a_host_cpu_name_never_promises_more_than_its_flags() -> None:
    """A VM reporting a Zen 4 model with AVX-512 hidden: LLVM's name ``znver4`` implies AVX-512,
    and code built for it dies of SIGILL; the host target switches off what the flags lack."""
    from qexport.backends.tvm_cpu import host_mattr, vector_bits

    avx2_only = {"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"}
    off = host_mattr("znver4", avx2_only)
    assert {"-avx512f", "-avx512bw", "-avx512vl", "-avx512vnni"} <= set(off)
    assert not {"-avx2", "-avx", "-fma", "-bmi2"} & set(off)
    target = tvm.target.Target({"kind": "llvm", "mcpu": "znver4", "mattr": off})
    assert G.select_strategy(G.target_features(target, avx2_only)).name == "madd256"
    assert vector_bits(target) == 256
    assert vector_bits(tvm.target.Target({"kind": "llvm", "mcpu": "znver4"})) == 512
    assert vector_bits(tvm.target.Target("llvm")) == 128  # baseline x86-64: SSE2
    full = avx2_only | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512_vnni",
                        "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bf16", "avx512_bitalg",
                        "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq"}
    assert host_mattr("znver4", full) == []
    assert host_mattr("znver4", set()) == []  # no /proc/cpuinfo: nothing to compare


@pytest.mark.parametrize(("name", "mcpu", "instr"), [("vnni256", "alderlake", "vpdpbusd"),
                                                     ("madd256", "haswell", "vpmaddwd")])
def test_16_register_tiles_stay_in_registers(name: str, mcpu: str, instr: str) -> None:
    """AVX2 / AVX-VNNI have 16 vector registers: the k loop of their tiles holds the accumulators,
    weight vectors and broadcast without a vector stack access (a spilled accumulator puts a store
    and a reload on the loop's critical path: the 3x32 AVX2 tile ran at 0.6x). Compiled, not run."""
    import re

    st = G.STRATEGIES[name]
    func = G.gemm_primfunc(st, k=768, n=3072, a_dtype=st.kernel_a_dtype("int8"), shared_b=True)
    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target)
    mod = lib.mod.imports[0] if lib.mod.imports else lib.mod
    asm = mod.inspect_source("asm")
    # the k loop is one basic block (no branch inside): the block with the most dot products
    k_loop = max(re.split(r"\n(?=\.LBB)", asm), key=lambda block: block.count(instr))
    assert k_loop.count(instr) >= st.mr * st.nv
    spills = [line for line in k_loop.splitlines() if "(%rsp)" in line and "%ymm" in line]
    assert spills == []

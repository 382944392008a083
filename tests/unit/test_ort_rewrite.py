"""Each ORT load-time rewrite alone (qexport.backends.ort_rewrite), on edge inputs, atol=0.

Every case builds a tiny graph around one qexport function (or matmul), rewrites it, checks that
the rewrite it is about did fire, and compares ORT's output with the qexport.ops reference kernel
(or numpy's exact integer product) on edge values: the ends of the input contract, the points
where a clamp or a table starts, constant / fully masked rows, and out-of-contract values that a
function clamps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qexport.backends.ort_rewrite import (
    REWRITES,
    RewriteOptions,
    exact_int8_gemms,
    rewrite_for_ort,
)
from qexport.export.constants import to_onnx_inputs
from qexport.export.functions import DOMAIN, DOMAIN_VERSION, function_protos
from qexport.ops import kernels as K

I32_MAX = 2**31 - 1


class Graph:
    """A small model: named initializers + nodes, one input ``x``, one output ``y``."""

    def __init__(self, x_type: int = TensorProto.INT32, shape: Sequence[int | str] = ("n",)) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.x_type, self.shape = x_type, list(shape)
        self.n = 0

    def const(self, arr: np.ndarray) -> str:
        self.n += 1
        name = f"k{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, *inputs: str, domain: str = "", **attrs: object) -> str:
        self.n += 1
        out = f"v{self.n}"
        self.nodes.append(helper.make_node(op, list(inputs), [out], domain=domain, **attrs))
        return out

    def fn(self, name: str, x: str, consts: Sequence[np.ndarray]) -> str:
        return self.node(name, x, *(self.const(c) for c in consts), domain=DOMAIN)

    def model(self, y: str, y_type: int = TensorProto.INT32, y_shape: Sequence[int | str] | None = None,
              ) -> onnx.ModelProto:
        nodes = [*self.nodes, helper.make_node("Identity", [y], ["y"])]
        used = sorted({n.op_type for n in nodes if n.domain == DOMAIN})
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", self.x_type, self.shape)],
                              [helper.make_tensor_value_info("y", y_type, y_shape or self.shape)], self.inits)
        opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)]
        m = helper.make_model(g, opset_imports=opsets, functions=function_protos(used), ir_version=10)
        onnx.checker.check_model(m, full_check=True)
        return m


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def rewritten(model: onnx.ModelProto, expect: Sequence[str], **opts: object) -> onnx.ModelProto:
    new, report = rewrite_for_ort(model, RewriteOptions(**opts))  # type: ignore[arg-type]
    missing = [k for k in expect if not report.applied[k]]
    assert not missing, f"{missing} did not fire: {report.summary()}"
    assert not report.kept, report.summary()
    onnx.checker.check_model(new)
    return new


def edges(lo: int, hi: int, *extra: int, n: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pts = [lo, lo + 1, -1, 0, 1, hi - 1, hi, *extra]
    chosen = np.asarray([p for p in pts if lo <= p <= hi])
    return np.concatenate([chosen, rng.integers(lo, hi + 1, n)]).astype(np.int32)


def ref(fn, x: np.ndarray) -> np.ndarray:  # type: ignore[no-untyped-def]
    return fn(torch.from_numpy(x.astype(np.int64))).numpy()


# --------------------------------------------------------------------------- lut


def test_lut_requant_of_an_int8_value() -> None:
    """Requant (per tensor) of a value proven to be int8: a 256-entry table, no clamp."""
    p = K.requant_from_ratio(97.3, 16)
    g = Graph(TensorProto.INT8)
    y = g.fn("Requant", g.node("Cast", "x", to=TensorProto.INT32), to_onnx_inputs(p))
    new = rewritten(g.model(y), ["lut"])
    assert "Clip" not in {n.op_type for n in new.graph.node}
    x = np.arange(-128, 128).astype(np.int8)
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.requantize_int(t, p), x))


@pytest.mark.parametrize("ratio", [0.4, 3e-3])
def test_lut_requant_clamped_to_its_bound(ratio: float) -> None:
    """An unbounded input: the table covers [-bound, bound] and a Clip applies the function's clamp."""
    p = K.requant_from_ratio(ratio, 8)
    assert 2 * p.bound + 1 <= 1 << 17
    g = Graph()
    new = rewritten(g.model(g.fn("Requant", "x", to_onnx_inputs(p))), ["lut"])
    x = edges(-I32_MAX, I32_MAX, p.bound, p.bound + 1, -p.bound, -p.bound - 1, p.bound - 1)
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.requantize_int(t, p), x))


def test_lut_gelu_then_requant_compose_into_one_int8_table() -> None:
    """IGelu (clamped to 16 bits) followed by its requantization: one table of the composition."""
    c = K.gelu_constants(3e-4)
    rq = K.requant_from_ratio(K.gelu_out_scale(3e-4, c) / 0.02, 8)
    g = Graph()
    y = g.fn("Requant", g.fn("IGelu", "x", to_onnx_inputs(c)), to_onnx_inputs(rq))
    new = rewritten(g.model(y), ["lut", "lut-compose"])
    assert sum(n.op_type == "GatherElements" for n in new.graph.node) == 1
    every16 = np.arange(-(2**15) + 1, 2**15, dtype=np.int32)
    x = np.concatenate([every16, edges(-I32_MAX, I32_MAX, 2**15, -(2**15))])
    expect = ref(lambda t: K.requantize_int(K.i_gelu_int(t, c), rq), x)
    np.testing.assert_array_equal(run(new, x), expect)


def test_lut_tanh() -> None:
    c = K.tanh_constants(0.002)
    consts = to_onnx_inputs(c)
    g = Graph()
    new = rewritten(g.model(g.fn("ITanh", "x", consts)), ["lut"])
    x = np.concatenate([np.arange(-(2**15) + 1, 2**15, dtype=np.int32), edges(-I32_MAX, I32_MAX)])
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.i_tanh_int(t, c), x))


# --------------------------------------------------------------------------- requant


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("ratio", [2e-6, 1e-4, 3e-3, 0.4])
def test_requant_per_channel(ratio: float, bits: int) -> None:
    """Per-channel constants: pre-shifts in float32 (bounds < 2**24) or int32, or none."""
    c = K.ChannelRequant.from_ratios([ratio * (1 + 0.37 * i) for i in range(6)], bits=bits)
    g = Graph(shape=["n", 6])
    new = rewritten(g.model(g.fn("Requant", "x", to_onnx_inputs(c))), ["requant"])
    f32_pre = any(c.pre) and max(b + (1 << p) // 2 for b, p in zip(c.bound, c.pre, strict=True)) < 2**24
    casts = {helper.get_attribute_value(a) for n in new.graph.node if n.op_type == "Cast"
             for a in n.attribute}
    assert (TensorProto.FLOAT in casts) == f32_pre
    x = edges(-I32_MAX, I32_MAX, *c.bound, *(b + 1 for b in c.bound), *(-b - 1 for b in c.bound), n=600)
    x = np.resize(x, (len(x) // 6 + 1) * 6).reshape(-1, 6)
    bound = np.asarray(c.bound)
    x[0], x[1], x[2] = bound, bound - 1, -bound - 1  # each channel at its own bound
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.requantize_channels(t, c), x))


def test_requant_per_tensor_too_wide_for_a_table() -> None:
    p = K.requant_from_ratio(2e-6, 16)
    assert 2 * p.bound + 1 > 1 << 17
    g = Graph()
    new = rewritten(g.model(g.fn("Requant", "x", to_onnx_inputs(p))), ["requant"])
    x = edges(-I32_MAX, I32_MAX, p.bound, p.bound + 1, -p.bound - 1)
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.requantize_int(t, p), x))


# --------------------------------------------------------------------------- softmax


def softmax_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**20), 2**20, size=(6, n)).astype(np.int32)
    x[0] = -K.MASK_FILL  # fully masked
    x[1] = 12345  # constant
    x[2, ::2] = -K.MASK_FILL  # half masked
    x[3, 0], x[3, -1] = K.SCORE_MAX, -K.SCORE_MAX  # the contract's ends
    x[4] = rng.integers(-300, 300, n)  # close scores: all in the table
    x[5, 0] = I32_MAX  # out of contract: clamped
    return x


@pytest.mark.parametrize(("scale", "lut_max"),
                         [(1e-6, 1 << 17), (1e-4, 1 << 20), (2e-4, 1 << 17), (0.05, 1 << 17)],
                         ids=["pre8-div", "pre1-table", "pre0", "coarse"])
def test_softmax(scale: float, lut_max: int) -> None:
    """i-exp as a table indexed by max - q (pre-shift folded into the table, or a Div first)."""
    c = K.softmax_constants(scale)
    assert (c.exp.pre > 0) == (scale < 1.5e-4)
    g = Graph(shape=[6, "n"])
    new = rewritten(g.model(g.fn("ISoftmax", "x", to_onnx_inputs(c))),
                    ["softmax"], lut_max=lut_max)
    for n in (1, 7, 128):
        x = softmax_rows(n, n)
        np.testing.assert_array_equal(run(new, x), ref(lambda t: K.i_softmax_int(t, c), x))


def test_mask_folds_into_a_min_and_drops_the_softmax_clamp() -> None:
    """The exporter's arithmetic mask, scores from an int8 matmul (|s| <= K 127 128 < 2**28)."""
    c = K.softmax_constants(2e-4)
    g = Graph(TensorProto.INT8, [2, 3, 4])
    w = np.random.default_rng(0).integers(-128, 128, (4, 5)).astype(np.int8)
    w[0] = -128
    s = g.node("MatMulInteger", "x", g.const(w))
    mask = np.asarray([[[1, 1, 0, 1, 0]], [[0, 0, 0, 0, 0]]], np.int32)  # second batch fully masked
    one, zero = g.const(np.asarray(1, np.int32)), g.const(np.asarray(0, np.int32))
    keep = g.node("Max", g.node("Min", g.const(mask), one), zero)
    fill = g.node("Mul", g.node("Sub", keep, one), g.const(np.asarray(K.MASK_FILL, np.int32)))
    masked = g.node("Add", g.node("Mul", s, keep), fill)
    y = g.fn("ISoftmax", masked, to_onnx_inputs(c))
    new = rewritten(g.model(y, y_shape=[2, 3, 5]), ["mask", "softmax"])
    assert "Clip" not in {n.op_type for n in new.graph.node}
    x = np.random.default_rng(1).integers(-128, 128, (2, 3, 4)).astype(np.int8)
    x[0, 0] = -128
    scores = torch.from_numpy(x.astype(np.int64)) @ torch.from_numpy(w.astype(np.int64))
    scores = torch.where(torch.from_numpy(mask) > 0, scores, torch.full_like(scores, -K.MASK_FILL))
    np.testing.assert_array_equal(run(new, x), K.i_softmax_int(scores, c).numpy())


# --------------------------------------------------------------------------- layernorm


def ln_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**15), 2**15, size=(7, n)).astype(np.int32)
    x[0] = 0  # constant rows: variance 0, the sqrt >= 1 guard
    x[1] = -(2**17)
    x[2, ::2], x[2, 1::2] = 2**17, -(2**17)  # the contract's ends: |y| = 2**17, largest shift
    x[3] = rng.integers(-3, 4, n)  # tiny variance: no shift
    x[4, 0] = I32_MAX  # out of contract: clamped
    x[5] = np.arange(n) * 37 - 5000
    return x


@pytest.mark.parametrize("n", [6, 384], ids=["short-rows", "hidden-384"])
def test_layernorm(n: int) -> None:
    gen = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, generator=gen) * 2, torch.randn(n, generator=gen)
    c = K.layernorm_constants(w, b, out_scale=0.03)
    g = Graph(shape=[7, n])
    new = rewritten(g.model(g.fn("ILayerNorm", "x", to_onnx_inputs(c))), ["layernorm"])
    x = ln_rows(n, 0)
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.i_layernorm_int(t, c), x))


# --------------------------------------------------------------------------- matmuls


def matmul_cases(k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(k)
    a = rng.integers(-128, 128, (9, k)).astype(np.int8)
    a[0], a[1] = -128, 127
    w = rng.integers(-127, 128, (k, 7)).astype(np.int8)
    w[:, 0], w[:, 1] = -128, 127
    return a, w


@pytest.mark.parametrize("u8s8", ["auto", "bounded"])
@pytest.mark.parametrize("form", ["integer", "qdq"])
def test_matmul_int8_weights(u8s8: str, form: str) -> None:
    """x (int8) @ W (int8, extreme columns): u8 x s8 if this CPU's kernel is exact, else u8 x u8."""
    a, w = matmul_cases(259)
    g = Graph(TensorProto.INT8, [9, 259])
    if form == "integer":
        y = g.node("MatMulInteger", "x", g.const(w))
    else:
        one, zp = g.const(np.asarray(1.0, np.float32)), g.const(np.asarray(0, np.int8))
        x32 = g.node("Cast", "x", to=TensorProto.INT32)
        xq = g.node("QuantizeLinear", g.node("Cast", x32, to=TensorProto.FLOAT), one, zp)
        dq_w = g.node("DequantizeLinear", g.const(w), one, zp)
        f = g.node("MatMul", g.node("DequantizeLinear", xq, one, zp), dq_w)
        y = g.node("Cast", f, to=TensorProto.INT32)
    full = u8s8 == "auto" and "u8s8" in exact_int8_gemms()
    new = rewritten(g.model(y, y_shape=[9, 7]), ["matmul-u8s8" if full else "matmul-u8u8"], u8s8=u8s8)
    np.testing.assert_array_equal(run(new, a), a.astype(np.int64) @ w.astype(np.int64))


def test_matmul_small_weights_use_u8s8_even_on_avx2() -> None:
    """|w| <= 64 (4-bit weights here): no AVX2 int16 pair sum 255 (|w0| + |w1|) can saturate."""
    a, w = matmul_cases(64)
    w = np.clip(w, -7, 7).astype(np.int8)
    g = Graph(TensorProto.INT8, [9, 64])
    new = rewritten(g.model(g.node("MatMulInteger", "x", g.const(w)), y_shape=[9, 7]), ["matmul-u8s8"],
                    u8s8="bounded")
    np.testing.assert_array_equal(run(new, a), a.astype(np.int64) @ w.astype(np.int64))


def test_matmul_of_two_activations_through_transposes() -> None:
    """Both operands are int32 values cast to int8 (QK^T): the byte operands are transposed."""
    g = Graph(TensorProto.INT32, [2, 5, 8])
    k = g.node("Transpose", g.node("Mul", "x", g.const(np.asarray(-1, np.int32))), perm=[0, 2, 1])
    q8, k8 = g.node("Cast", "x", to=TensorProto.INT8), g.node("Cast", k, to=TensorProto.INT8)
    y = g.node("MatMulInteger", q8, k8)
    new = rewritten(g.model(y, y_shape=[2, 5, 5]), ["bytes"])
    x = np.random.default_rng(0).integers(-127, 128, (2, 5, 8)).astype(np.int32)
    x[0, 0] = -127
    xs = x.astype(np.int64)
    np.testing.assert_array_equal(run(new, x), xs @ np.swapaxes(-xs, 1, 2))


# --------------------------------------------------------------------------- fallbacks, switches


def test_a_function_with_runtime_constants_is_kept() -> None:
    """Constants that are not initializers cannot be folded: the call stays, with its FunctionProto."""
    p = K.requant_from_ratio(0.4, 8)
    g = Graph()
    arrs = to_onnx_inputs(p)
    m_input = g.node("Identity", g.const(arrs[3]))  # m through an op: not a constant to the rewriter
    y = g.node("Requant", "x", *(g.const(a) for a in arrs[:3]), m_input, *(g.const(a) for a in arrs[4:]),
               domain=DOMAIN)
    new, report = rewrite_for_ort(g.model(y))
    assert report.kept["Requant"] == 1 and [f.name for f in new.functions] == ["Requant"]
    x = edges(-I32_MAX, I32_MAX)
    np.testing.assert_array_equal(run(new, x), ref(lambda t: K.requantize_int(t, p), x))


def test_options_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QEXPORT_ORT_REWRITE", "0")
    assert RewriteOptions.from_env() is None
    monkeypatch.setenv("QEXPORT_ORT_REWRITE", "matmul, lut")
    monkeypatch.setenv("QEXPORT_ORT_U8S8", "bounded")
    opts = RewriteOptions.from_env()
    assert opts is not None and opts.enabled == {"matmul", "lut"} and opts.u8s8 == "bounded"
    monkeypatch.setenv("QEXPORT_ORT_REWRITE", "lut,warp")
    with pytest.raises(ValueError, match="warp"):
        RewriteOptions.from_env()
    monkeypatch.delenv("QEXPORT_ORT_REWRITE")
    monkeypatch.delenv("QEXPORT_ORT_U8S8")
    opts = RewriteOptions.from_env()
    assert opts is not None and opts.enabled == set(REWRITES)


def test_the_probe_finds_an_exact_kernel() -> None:
    kinds = exact_int8_gemms()
    assert kinds <= {"u8s8", "u8u8"}
    assert "u8u8" in kinds  # 16-bit products (or dot products into int32) on every MLAS kernel


def test_graphs_with_subgraphs_are_left_alone() -> None:
    """A subgraph may name an outer value that a rewrite renames: such a model is not rewritten."""
    p = K.requant_from_ratio(0.4, 8)
    g = Graph()
    y = g.fn("Requant", "x", to_onnx_inputs(p))
    branch = helper.make_graph([helper.make_node("Identity", [y], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.INT32, None)])
    cond = g.const(np.asarray(True))
    out = g.node("If", cond, then_branch=branch, else_branch=branch)
    model = g.model(out)
    new, report = rewrite_for_ort(model)
    assert new is model and not report.applied

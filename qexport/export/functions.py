"""The qexport integer ops as ONNX FunctionProtos (domain ``qexport``), standard ops inside.

Each function mirrors its reference kernel in :mod:`qexport.ops.kernels` node
for node, under the integer-graph contract: int32 only; ``Div`` only with a
non-negative dividend and a positive divisor (so truncation == floor in ORT,
TVM and TensorRT); shifts are divisions by a power of two looked up in a
Gather table (no ``BitShift``); no integer Floor/Round/Sqrt/Pow/Mod; every
divisor that could be zero is guarded with ``Max(x, 1)``.

All folded constants are function *inputs* (int32 initializers, scalars or
per-channel vectors), so the same function serves every call site and the
flat form folds them with ordinary constant folding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qexport.ops.intmath import POW2_MAX_EXP
from qexport.ops.kernels import ISQRT_ITERS_32, LN_G, LN_IN_MAX, SCORE_MAX

DOMAIN = "qexport"
DOMAIN_VERSION = 1
#: ai.onnx opset of the function bodies (ReduceMax/ReduceSum take ``axes`` as an input from 18); a
#: model that imports a newer opset gets bodies importing the same one (ONNX requires them to match).
BODY_OPSET = 18


class Body:
    """A tiny node list builder with unique value names (one per function body or graph)."""

    def __init__(self, prefix: str = "") -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.prefix = prefix
        self.n = 0

    def fresh(self, hint: str) -> str:
        self.n += 1
        return f"{self.prefix}{hint}_{self.n}"

    def op(
        self, op_type: str, *inputs: str, domain: str = "", hint: str | None = None, **attrs: Any
    ) -> str:
        out = self.fresh(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], domain=domain, **attrs))
        return out

    def const(self, value: int | Sequence[int], hint: str = "c", dtype: type = np.int32) -> str:
        out = self.fresh(hint)
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        self.nodes.append(helper.make_node("Constant", [], [out], value=numpy_helper.from_array(arr, out)))
        return out

    # small idioms -------------------------------------------------------------------------
    def clamp(self, x: str, lo: int, hi: int) -> str:
        return self.op("Max", self.op("Min", x, self.const(hi)), self.const(lo))

    def signed(self, x: str, mag: str) -> str:
        """``sign(x) * mag``: equals the reference's ``where(x < 0, -mag, mag)`` because every
        kernel maps ``x == 0`` to ``mag == 0`` (Mul by Sign is far cheaper than Where in ORT)."""
        return self.op("Mul", mag, self.op("Sign", x))

    def pow2_lut(self) -> str:
        return self.const([1 << i for i in range(POW2_MAX_EXP + 1)], "pow2")

    def bitlen(self, n: str, bits: int) -> str:
        """``sum_i [n >= 2**i]`` over ``i < bits`` (n >= 0), as comparisons + ReduceSum."""
        thr = self.const([1 << i for i in range(bits)], "thr")
        ge = self.op("GreaterOrEqual", self.op("Unsqueeze", n, self.const([-1], dtype=np.int64)), thr)
        as_int = self.op("Cast", ge, to=TensorProto.INT32)
        return self.op("ReduceSum", as_int, self.const([-1], dtype=np.int64), keepdims=0)

    def reduce(self, op: str, x: str) -> str:
        return self.op(op, x, self.const([-1], dtype=np.int64), keepdims=1)


def _function(name: str, inputs: list[str], outputs: list[str], body: Body, doc: str,
              opset: int = BODY_OPSET) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, name, inputs, outputs, body.nodes,
        opset_imports=[helper.make_opsetid("", opset)], doc_string=doc,
    )


# --------------------------------------------------------------------------- bodies (also used inline)


def requant_body(b: Body, q: str, bound: str, half_pre: str, pow2_pre: str, m: str, half_post: str,
                 pow2_post: str, qmax: str) -> str:
    """:func:`qexport.ops.kernels.requantize_channels`."""
    a = b.op("Min", b.op("Abs", q), bound)
    a = b.op("Div", b.op("Add", a, half_pre), pow2_pre)
    r = b.op("Div", b.op("Add", b.op("Mul", a, m), half_post), pow2_post)
    return b.signed(q, b.op("Min", r, qmax))


def isqrt_body(b: Body, n: str) -> str:
    """:func:`qexport.ops.kernels.i_sqrt` for ``0 <= n < 2**31``."""
    one, two = b.const(1), b.const(2)
    m = b.op("Max", n, one)
    half = b.op("Div", b.op("Add", b.bitlen(m, 31), one), two)
    x = b.op("Gather", b.pow2_lut(), half)
    for _ in range(ISQRT_ITERS_32):
        x = b.op("Min", x, b.op("Div", b.op("Add", x, b.op("Div", m, x)), two))
    return b.op("Mul", x, b.op("Min", n, one))  # n == 0 -> 0 (n >= 0)


def iexp_body(b: Body, x: str, pow2_pre: str, ln2: str, eb: str, ec: str, ee: str) -> str:
    """:func:`qexport.ops.kernels.i_exp_int` (``x <= 0``)."""
    nx = b.op("Div", b.op("Neg", x), pow2_pre)
    z = b.op("Div", nx, ln2)
    p = b.op("Sub", b.op("Mul", z, ln2), nx)
    pb = b.op("Add", p, eb)
    poly = b.op("Add", b.op("Mul", pb, pb), ec)
    idx = b.op("Min", b.op("Add", z, ee), b.const(POW2_MAX_EXP))
    return b.op("Div", poly, b.op("Gather", b.pow2_lut(), idx))


def isoftmax_body(b: Body, q: str, pow2_pre: str, ln2: str, eb: str, ec: str, ee: str, out_max: str) -> str:
    """:func:`qexport.ops.kernels.i_softmax_int` over the last axis."""
    q = b.clamp(q, -SCORE_MAX, SCORE_MAX)
    x = b.op("Sub", q, b.reduce("ReduceMax", q))
    e = iexp_body(b, x, pow2_pre, ln2, eb, ec, ee)
    total = b.op("Max", b.reduce("ReduceSum", e), b.const(1))
    return b.op("Div", b.op("Add", b.op("Mul", e, out_max), b.op("Div", total, b.const(2))), total)


def igelu_body(b: Body, q: str, in_max: str, half_pre: str, pow2_pre: str, clip: str, one: str,
               half_shift: str, pow2_shift: str, one_s: str) -> str:
    """:func:`qexport.ops.kernels.i_gelu_int`."""
    q = b.op("Max", b.op("Min", q, in_max), b.op("Neg", in_max))
    a = b.op("Div", b.op("Add", b.op("Abs", q), half_pre), pow2_pre)
    d = b.op("Sub", clip, b.op("Min", a, clip))
    t = b.op("Sub", one, b.op("Mul", d, d))
    t = b.op("Div", b.op("Add", t, half_shift), pow2_shift)
    return b.op("Mul", q, b.op("Add", one_s, b.signed(q, t)))


def itanh_body(b: Body, q: str, in_max: str, pow2_pre: str, ln2: str, eb: str, ec: str, ee: str, one: str,
               out_max: str) -> str:
    """:func:`qexport.ops.kernels.i_tanh_int`."""
    q = b.op("Max", b.op("Min", q, in_max), b.op("Neg", in_max))
    a = b.op("Abs", q)
    e = b.op("Min", iexp_body(b, b.op("Neg", a), pow2_pre, ln2, eb, ec, ee), one)
    den = b.op("Add", one, e)
    num = b.op("Add", b.op("Mul", b.op("Sub", one, e), out_max), b.op("Div", den, b.const(2)))
    return b.signed(q, b.op("Div", num, den))


def ilayernorm_body(b: Body, q: str, n: str, half_n: str, keep: str, gamma: str, beta: str, bound: str,
                    half_pre: str, pow2_pre: str, m: str, half_post: str, pow2_post: str, qmax: str) -> str:
    """:func:`qexport.ops.kernels.i_layernorm_int` over the last axis."""
    q = b.clamp(q, -LN_IN_MAX, LN_IN_MAX)
    s = b.reduce("ReduceSum", q)
    mean = b.signed(s, b.op("Div", b.op("Add", b.op("Abs", s), half_n), n))
    y = b.op("Sub", q, mean)
    a = b.op("Abs", y)
    amax = b.reduce("ReduceMax", a)
    k = b.op("Max", b.op("Sub", b.bitlen(amax, 20), keep), b.const(0))
    p2 = b.op("Gather", b.pow2_lut(), k)
    ys = b.op("Div", a, p2)
    ssq = b.reduce("ReduceSum", b.op("Mul", ys, ys))
    sd = b.op("Max", isqrt_body(b, ssq), b.const(1))
    den = b.op("Mul", sd, p2)
    norm = b.op("Div", b.op("Add", b.op("Mul", a, b.const(1 << LN_G)), b.op("Div", den, b.const(2))), den)
    acc = b.op("Add", b.op("Mul", b.signed(y, norm), gamma), beta)
    return requant_body(b, acc, bound, half_pre, pow2_pre, m, half_post, pow2_post, qmax)


# --------------------------------------------------------------------------- FunctionProtos

REQUANT_INPUTS = ["q", "bound", "half_pre", "pow2_pre", "m", "half_post", "pow2_post", "qmax"]
EXP_INPUTS = ["pow2_pre", "ln2", "b", "c", "e"]
SIGNATURES: dict[str, list[str]] = {
    "Requant": REQUANT_INPUTS,
    "ISqrt": ["n"],
    "IExp": ["x", *EXP_INPUTS],
    "ISoftmax": ["q", *EXP_INPUTS, "out_max"],
    "IGelu": ["q", "in_max", "half_pre", "pow2_pre", "clip", "one", "half_shift", "pow2_shift", "one_s"],
    "ITanh": ["q", "in_max", *EXP_INPUTS, "one", "out_max"],
    "ILayerNorm": ["q", "n", "half_n", "keep", "gamma", "beta", *REQUANT_INPUTS[1:]],
}
_BODIES: dict[str, Callable[..., str]] = {
    "Requant": requant_body,
    "ISqrt": isqrt_body,
    "IExp": iexp_body,
    "ISoftmax": isoftmax_body,
    "IGelu": igelu_body,
    "ITanh": itanh_body,
    "ILayerNorm": ilayernorm_body,
}
_DOCS = {
    "Requant": "round(q * m / 2^shift) into qmax, ties away from zero, int32 only (see RequantParams)",
    "ISqrt": "floor(sqrt(n)) for 0 <= n < 2^31: I-BERT's integer Newton iteration, unrolled",
    "IExp": "I-BERT i-exp of x <= 0: (p + b)^2 + c shifted right by z + e",
    "ISoftmax": "I-BERT integer softmax over the last axis, output in [0, out_max]",
    "IGelu": "I-BERT i-GELU: q * (one_s + sign(q) * erf-polynomial)",
    "ITanh": "integer tanh from i-exp: sign(q) (1 - e) / (1 + e)",
    "ILayerNorm": "I-BERT integer LayerNorm over the last axis (per-row shift, ISqrt), requantized",
}


def function_protos(names: Sequence[str] | None = None, opset: int = BODY_OPSET) -> list[onnx.FunctionProto]:
    """The FunctionProtos of the qexport domain (all, or those named), their bodies importing ai.onnx
    ``opset`` (the calling model's: >= 18; the body ops mean the same in every opset from 18 on)."""
    if opset < BODY_OPSET:
        raise ValueError(f"qexport function bodies need ai.onnx opset >= {BODY_OPSET}, got {opset}")
    out = []
    for name in names or SIGNATURES:
        ins = SIGNATURES[name]
        b = Body(prefix="t_")
        res = _BODIES[name](b, *ins)
        b.nodes.append(helper.make_node("Identity", [res], ["y"]))
        out.append(_function(name, ins, ["y"], b, _DOCS[name], opset))
    return out

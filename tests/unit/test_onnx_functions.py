"""Each qexport ONNX function alone, in ONNX Runtime, against the qexport.ops reference (atol=0).

Table-driven: one row per function: an input generator, the constants it is called with
(folded by the same ``*_constants`` the exporter uses) and the reference kernel. Every row is
checked in the functions form (a ``qexport.*`` node + its FunctionProto) and in the flat form
(inlined and constant-folded: ``ai.onnx`` only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qexport.export.constants import to_onnx_inputs
from qexport.export.exporter import inline_and_fold
from qexport.export.functions import DOMAIN, DOMAIN_VERSION, function_protos
from qexport.ops import kernels as K


@dataclass
class OpCase:
    fn: str
    consts: Callable[[float], tuple[list[np.ndarray], Any]]  # scale -> (const inputs, consts obj)
    ref: Callable[[torch.Tensor, Any], torch.Tensor]
    gen: Callable[[np.random.Generator], np.ndarray]
    scales: tuple[float, ...]


def _gelu(scale: float) -> tuple[list[np.ndarray], Any]:
    c = K.gelu_constants(scale)
    return to_onnx_inputs(c), c


def _softmax(scale: float) -> tuple[list[np.ndarray], Any]:
    c = K.softmax_constants(scale)
    return to_onnx_inputs(c), c


def _exp(scale: float) -> tuple[list[np.ndarray], Any]:
    c = K.exp_constants(scale)
    return to_onnx_inputs(c), c


def _tanh(scale: float) -> tuple[list[np.ndarray], Any]:
    c = K.tanh_constants(scale)
    return to_onnx_inputs(c), c


def _requant(ratio: float) -> tuple[list[np.ndarray], Any]:
    c = K.ChannelRequant.from_ratios([ratio * (1 + 0.37 * i) for i in range(6)], bits=8)
    return to_onnx_inputs(c), c


def _requant16(ratio: float) -> tuple[list[np.ndarray], Any]:
    p = K.requant_from_ratio(ratio, 16)
    return to_onnx_inputs(p), p


def _layernorm(scale: float) -> tuple[list[np.ndarray], Any]:
    g = torch.Generator().manual_seed(int(scale * 1e6) % 1000)
    w, b = torch.randn(6, generator=g) * 2, torch.randn(6, generator=g)
    c = K.layernorm_constants(w, b, out_scale=scale)
    return to_onnx_inputs(c), c


def _edges(lo: int, hi: int) -> Callable[[np.random.Generator], np.ndarray]:
    def gen(rng: np.random.Generator) -> np.ndarray:
        x = rng.integers(lo, hi + 1, size=(4, 6), dtype=np.int64)
        x[0, :3] = [lo, hi, 0]
        x[1] = x[1, 0]  # a constant row
        return x.astype(np.int32)

    return gen


CASES = [
    OpCase("Requant", _requant, lambda q, c: K.requantize_channels(q, c), _edges(-(2**31) + 1, 2**31 - 1),
           (1e-6, 3e-3, 0.4, 25.0)),
    OpCase("Requant", _requant16, lambda q, c: K.requantize_int(q, c), _edges(-(2**30), 2**30),
           (1e-5, 0.02, 3.0)),
    OpCase("ISqrt", lambda s: ([], None), lambda q, c: K.i_sqrt(q), _edges(0, 2**31 - 1), (1.0,)),
    OpCase("IExp", _exp, lambda q, c: K.i_exp_int(q, c), _edges(-(2**30), 0), (1e-6, 1e-3, 0.3)),
    OpCase("ISoftmax", _softmax, lambda q, c: K.i_softmax_int(q, c), _edges(-(2**28), 2**28),
           (1e-6, 2e-4, 0.05)),
    OpCase("IGelu", _gelu, lambda q, c: K.i_gelu_int(q, c), _edges(-(2**15) + 1, 2**15 - 1),
           (1e-5, 3e-4, 0.01)),
    OpCase("ITanh", _tanh, lambda q, c: K.i_tanh_int(q, c), _edges(-(2**15) + 1, 2**15 - 1), (1e-4, 0.002)),
    OpCase("ILayerNorm", _layernorm, lambda q, c: K.i_layernorm_int(q, c), _edges(-(2**17), 2**17),
           (0.01, 0.3)),
]


def _model(case: OpCase, consts: list[np.ndarray], shape: tuple[int, ...]) -> onnx.ModelProto:
    names = [f"k{i}" for i in range(len(consts))]
    node = helper.make_node(case.fn, ["x", *names], ["y"], domain=DOMAIN)
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info("x", TensorProto.INT32, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT32, list(shape))],
        initializer=[numpy_helper.from_array(a, n) for a, n in zip(consts, names, strict=True)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=function_protos([case.fn]), ir_version=10,
    )


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.mark.parametrize("form", ["functions", "flat"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.fn)
def test_function_matches_reference(case: OpCase, form: str) -> None:
    rng = np.random.default_rng(0)
    for scale in case.scales:
        consts, c = case.consts(scale)
        x = case.gen(rng)
        model = _model(case, consts, x.shape)
        onnx.checker.check_model(model, full_check=True)
        if form == "flat":
            model = inline_and_fold(model)
            assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
            assert not model.functions
        got = _run(model, x)
        ref = case.ref(torch.from_numpy(x.astype(np.int64)), c).numpy()
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ref, err_msg=f"{case.fn} scale={scale} form={form}")


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-6, 0.2), seed=st.integers(0, 2**16), n=st.integers(1, 64))
def test_isoftmax_random_rows(scale: float, seed: int, n: int) -> None:
    case = CASES[4]
    consts, c = case.consts(scale)
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**28), 2**28, size=(3, n)).astype(np.int32)
    x[1] = -K.MASK_FILL  # fully masked
    got = _run(_model(case, consts, x.shape), x)
    np.testing.assert_array_equal(got, K.i_softmax_int(torch.from_numpy(x.astype(np.int64)), c).numpy())


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(1e-5, 0.05), seed=st.integers(0, 2**16))
def test_igelu_random(scale: float, seed: int) -> None:
    case = CASES[5]
    consts, c = case.consts(scale)
    x = np.random.default_rng(seed).integers(-(2**15) + 1, 2**15, size=(5, 7)).astype(np.int32)
    got = _run(_model(case, consts, x.shape), x)
    np.testing.assert_array_equal(got, K.i_gelu_int(torch.from_numpy(x.astype(np.int64)), c).numpy())


def test_no_forbidden_ops_in_function_bodies() -> None:
    forbidden = {"BitShift", "Floor", "Round", "Sqrt", "Pow", "Mod", "Ceil"}
    for fp in function_protos():
        assert not {n.op_type for n in fp.node} & forbidden, fp.name

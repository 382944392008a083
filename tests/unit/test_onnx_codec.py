"""The functions' constants codec (qexport.export.constants) and the shared ONNX helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto, helper

from qexport.export.constants import FUNCTION_CONSTS, from_onnx_inputs, to_onnx_inputs
from qexport.export.onnx_utils import Constants, constant_tensor, dtype_name
from qexport.ops import kernels as K


def _examples() -> list[object]:
    g = torch.Generator().manual_seed(0)
    return [
        K.requant_from_ratio(3e-4, 8),
        K.requant_from_ratio(0.7, 16),
        K.ChannelRequant.from_ratios([1e-5, 2e-3, 0.3], bits=8),
        K.exp_constants(0.01),
        K.softmax_constants(0.002),
        K.gelu_constants(3e-4),
        K.tanh_constants(0.002),
        K.layernorm_constants(torch.randn(6, generator=g), torch.randn(6, generator=g), out_scale=0.03),
    ]


@pytest.mark.parametrize("c", _examples(), ids=lambda c: type(c).__name__)
def test_round_trip(c: object) -> None:
    arrs = to_onnx_inputs(c)  # type: ignore[arg-type]
    assert all(a.dtype == np.int32 for a in arrs)
    assert from_onnx_inputs(type(c), arrs) == c


def test_every_function_has_a_codec_and_the_arity_it_declares() -> None:
    from qexport.export.functions import function_protos

    protos = {f.name: f for f in function_protos(sorted(FUNCTION_CONSTS))}
    by_cls = {type(c): c for c in _examples()}
    for fn, cls in FUNCTION_CONSTS.items():
        assert len(protos[fn].input) == 1 + len(to_onnx_inputs(by_cls[cls])), fn  # type: ignore[arg-type]


def test_per_tensor_requant_reads_as_one_channel() -> None:
    p = K.requant_from_ratio(3e-4, 8)
    cr = from_onnx_inputs(K.ChannelRequant, to_onnx_inputs(p))
    assert cr == K.ChannelRequant(m=(p.m,), bound=(p.bound,), pre=(p.pre,), post=(p.post,), bits=8)
    two = to_onnx_inputs(K.ChannelRequant.from_ratios([1e-3, 2e-3]))
    assert from_onnx_inputs(K.RequantParams, two) is None


@pytest.mark.parametrize("index, value", [(2, 3), (1, 5), (6, 100), (3, 0)],
                         ids=["pow2-not-a-power", "half-inconsistent", "qmax-not-2^k-1", "m-zero"])
def test_inconsistent_requant_arrays_are_not_read(index: int, value: int) -> None:
    arrs = to_onnx_inputs(K.requant_from_ratio(3e-4, 8))
    arrs[index] = np.asarray(value, np.int32)
    assert from_onnx_inputs(K.ChannelRequant, arrs) is None


def test_wrong_arity_and_float_arrays_are_not_read() -> None:
    arrs = to_onnx_inputs(K.softmax_constants(0.002))
    assert from_onnx_inputs(K.SoftmaxConsts, arrs[:-1]) is None
    assert from_onnx_inputs(K.SoftmaxConsts, [a.astype(np.float32) for a in arrs]) is None
    with pytest.raises(TypeError):
        to_onnx_inputs(3)  # type: ignore[arg-type]


def test_constant_nodes_of_every_value_kind() -> None:
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["a"], value_ints=[1, 2]),
         helper.make_node("Constant", [], ["b"], value_float=0.5),
         helper.make_node("Constant", [], ["c"],
                          value=helper.make_tensor("t", TensorProto.INT8, [2], [3, -4])),
         helper.make_node("Add", ["x", "x"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.INT32, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [2])],
        [helper.make_tensor("w", TensorProto.INT32, [1], [7])])
    consts = Constants(g)
    assert consts.get("a").tolist() == [1, 2] and consts.get("b") == np.float32(0.5)  # type: ignore[union-attr]
    assert consts.get("c").tolist() == [3, -4] and consts.dtype("c") == TensorProto.INT8  # type: ignore[union-attr]
    assert consts.get("w").tolist() == [7] and consts.get("y") is None and consts.all(["a", "y"]) is None  # type: ignore[union-attr]
    assert constant_tensor(g.node[3]) is None
    assert dtype_name(TensorProto.INT8) == "int8" and dtype_name(TensorProto.UNDEFINED) == "?"

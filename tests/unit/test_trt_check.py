"""TensorRT lint (qexport.backends.trt_support) and the trt backend's behaviour without TensorRT."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qexport.backends import get_backend
from qexport.backends.trt import MISSING_MESSAGE, TRTBackend, _input_profiles, parse_shapes
from qexport.backends.trt_support import (
    TRT10_OPS,
    Finding,
    check_graph,
    check_onnx_file,
    errors_only,
    format_findings,
)
from qexport.errors import BackendError


def _init(name: str, value: object, dtype: type) -> onnx.TensorProto:
    return nh.from_array(np.asarray(value, dtype=dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    inits: list[onnx.TensorProto],
    functions: list[onnx.FunctionProto] | None = None,
    opset: int = 17,
) -> onnx.ModelProto:
    imports = [h.make_opsetid("", opset)]
    if functions:
        imports.append(h.make_opsetid("qexport", 1))
    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    return h.make_model(g, opset_imports=imports, functions=functions or [])


def _ids_input() -> onnx.ValueInfoProto:
    return h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"])


def clean_model() -> onnx.ModelProto:
    """The TensorRT form of the contract: int32 arithmetic + QDQ(int8, scale 1, zp 0) MatMul."""
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32, name="cast_ids"),
        h.make_node("Cast", ["attention_mask"], ["mask"], to=T.INT32, name="cast_mask"),
        h.make_node("Mul", ["ids", "mask"], ["x"], name="mask_mul"),
        h.make_node("Min", ["x", "c127"], ["xc"], name="clamp_hi"),
        h.make_node("Unsqueeze", ["xc", "ax2"], ["x3"], name="unsq"),
        h.make_node("Cast", ["x3"], ["xf"], to=T.FLOAT, name="to_float"),
        h.make_node("QuantizeLinear", ["xf", "one", "zp"], ["xq"], name="q_act"),
        h.make_node("DequantizeLinear", ["xq", "one", "zp"], ["xd"], name="dq_act"),
        h.make_node("DequantizeLinear", ["w", "one", "zp"], ["wd"], name="dq_w"),
        h.make_node("MatMul", ["xd", "wd"], ["acc_f"], name="linear"),
        h.make_node("Cast", ["acc_f"], ["acc"], to=T.INT32, name="acc_int32"),
        h.make_node("ReduceSum", ["acc", "ax1"], ["s"], keepdims=0, name="pool"),
        h.make_node("Div", ["s", "two"], ["logits_int"], name="requant_div"),
        h.make_node("Abs", ["logits_int"], ["a"], name="abs"),
        h.make_node("Less", ["a", "c127"], ["lt"], name="lt"),
        h.make_node("Where", ["lt", "a", "c127"], ["w_out"], name="where"),
        h.make_node("Cast", ["logits_int"], ["lf"], to=T.FLOAT, name="logits_f"),
        h.make_node("Mul", ["lf", "scale"], ["logits"], name="dequant"),
    ]
    inits = [
        _init("c127", 127, np.int32),
        _init("ax2", [2], np.int64),
        _init("ax1", [1], np.int64),
        _init("one", 1.0, np.float32),
        _init("zp", 0, np.int8),
        _init("w", np.arange(-2, 2).reshape(1, 4), np.int8),
        _init("two", 2, np.int32),
        _init("scale", 0.5, np.float32),
    ]
    inputs = [_ids_input(), h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"])]
    outputs = [
        h.make_tensor_value_info("logits", T.FLOAT, ["batch", 4]),
        h.make_tensor_value_info("logits_int", T.INT32, ["batch", 4]),
        h.make_tensor_value_info("w_out", T.INT32, ["batch", 4]),
    ]
    return _model(nodes, inputs, outputs, inits)


def _labels(findings: list[Finding], severity: str = "error") -> set[str]:
    return {f.node for f in findings if f.severity == severity}


def test_clean_qdq_int32_graph_has_no_findings() -> None:
    model = clean_model()
    onnx.checker.check_model(model)
    assert check_graph(model) == []
    assert format_findings([]) == "TensorRT check: OK (no findings)"


def test_matmulinteger_bitshift_int_floor_are_listed_by_name() -> None:
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32, name="cast_ids"),
        h.make_node("Floor", ["ids"], ["fl"], name="int_floor"),
        h.make_node("Cast", ["input_ids"], ["u"], to=T.UINT32, name="to_u32"),
        h.make_node("BitShift", ["u", "sh"], ["bs"], direction="RIGHT", name="shift_right"),
        h.make_node("Cast", ["input_ids"], ["i8"], to=T.INT8, name="to_i8"),
        h.make_node("MatMulInteger", ["i8", "w"], ["mm"], name="int_linear"),
    ]
    inits = [_init("sh", 1, np.uint32), _init("w", np.ones((4, 3)), np.int8)]
    outs = [
        h.make_tensor_value_info(n, t, None) for n, t in (("fl", T.INT32), ("bs", T.UINT32), ("mm", T.INT32))
    ]
    findings = check_graph(_model(nodes, [_ids_input()], outs, inits))
    errors = _labels(findings)
    assert {"int_floor", "shift_right", "int_linear"} <= errors
    # int8 made by Cast (not QuantizeLinear) is flagged too: INT8 is a Q/DQ-only type in TensorRT
    assert "to_i8" in errors

    by_node = {f.node: f for f in errors_only(findings)}
    assert "TensorRT has no integer MatMul" in by_node["int_linear"].reason
    assert "--linear qdq" in by_node["int_linear"].hint
    assert "BitShift" in by_node["shift_right"].reason and "2^z" in by_node["shift_right"].hint
    assert by_node["int_floor"].reason.startswith("Floor on int32: not supported")
    assert by_node["int_floor"].dtypes == ("int32",)
    text = format_findings(findings)
    for name in ("int_floor", "shift_right", "int_linear"):
        assert name in text
    assert "error(s)" in text.splitlines()[-1]


def _qdq_model(zp: onnx.TensorProto | None, q_name: str = "q") -> onnx.ModelProto:
    q_inputs = ["xf", "one"] + ([zp.name] if zp is not None else [])
    nodes = [
        h.make_node("Cast", ["input_ids"], ["xf"], to=T.FLOAT, name="to_f"),
        h.make_node("QuantizeLinear", q_inputs, ["xq"], name=q_name),
        h.make_node("DequantizeLinear", ["xq", *q_inputs[1:]], ["y"], name="dq"),
    ]
    inits = [_init("one", 1.0, np.float32)] + ([zp] if zp is not None else [])
    return _model(nodes, [_ids_input()], [h.make_tensor_value_info("y", T.FLOAT, None)], inits)


def test_nonzero_zero_point_is_flagged() -> None:
    findings = check_graph(_qdq_model(_init("zp", 3, np.int8)))
    errs = errors_only(findings)
    assert {f.node for f in errs} == {"q", "dq"}
    assert all("zero point 3 != 0" in f.reason for f in errs)
    assert check_graph(_qdq_model(_init("zp", 0, np.int8))) == []


def test_uint8_or_missing_zero_point_is_flagged() -> None:
    errs = errors_only(check_graph(_qdq_model(_init("zp", 0, np.uint8))))
    assert {f.node for f in errs if "uint8 zero point" in f.reason} == {"q", "dq"}
    assert any(f.node == "dq" and f.reason.startswith("DequantizeLinear on uint8") for f in errs)
    errs = errors_only(check_graph(_qdq_model(None)))
    assert [f.node for f in errs] == ["q", "dq"]  # ONNX's default uint8 output then reaches DQ as uint8
    assert "without a zero point" in errs[0].reason


def test_int64_arithmetic_warns_and_cumsum_int32_is_importer_only() -> None:
    nodes = [
        h.make_node("Add", ["input_ids", "one64"], ["p"], name="int64_add"),
        h.make_node("Cast", ["p"], ["p32"], to=T.INT32, name="cast"),
        h.make_node("CumSum", ["p32", "axis"], ["pos"], name="positions"),
        h.make_node("Shape", ["input_ids"], ["shp"], name="shape"),
        h.make_node("Add", ["shp", "one64"], ["shp1"], name="shape_math"),
    ]
    inits = [_init("one64", 1, np.int64), _init("axis", 1, np.int64)]
    outs = [h.make_tensor_value_info("pos", T.INT32, None), h.make_tensor_value_info("shp1", T.INT64, None)]
    findings = check_graph(_model(nodes, [_ids_input()], outs, inits))
    assert errors_only(findings) == []
    warned = {f.node: f for f in findings}
    assert set(warned) == {"int64_add", "positions"}  # shape arithmetic on int64 is fine
    assert "int64" in warned["int64_add"].reason
    assert "doc lists only" in warned["positions"].reason


def test_local_functions_are_inlined_before_checking() -> None:
    good = h.make_function(
        "qexport",
        "Requant",
        ["x", "d"],
        ["y"],
        [h.make_node("Div", ["x", "d"], ["y"])],
        [h.make_opsetid("", 17)],
    )
    bad = h.make_function(
        "qexport",
        "Shift",
        ["x", "s"],
        ["y"],
        [h.make_node("BitShift", ["x", "s"], ["y"], direction="RIGHT")],
        [h.make_opsetid("", 17)],
    )
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32, name="cast"),
        h.make_node("Requant", ["ids", "two"], ["r"], domain="qexport", name="requant"),
    ]
    outs = [h.make_tensor_value_info("r", T.INT32, None)]
    m = _model(nodes, [_ids_input()], outs, [_init("two", 2, np.int32)], functions=[good])
    assert check_graph(m) == []

    nodes_bad = [
        h.make_node("Cast", ["input_ids"], ["u"], to=T.UINT32, name="cast"),
        h.make_node("Shift", ["u", "s"], ["r"], domain="qexport", name="shift"),
    ]
    outs_bad = [h.make_tensor_value_info("r", T.UINT32, None)]
    m_bad = _model(nodes_bad, [_ids_input()], outs_bad, [_init("s", 1, np.uint32)], functions=[bad])
    errs = errors_only(check_graph(m_bad))
    # the inlined body's node is reported (and the uint32 Cast feeding it: TensorRT has no UINT32)
    assert [f.op for f in errs] == ["Cast", "BitShift"]
    assert "TensorRT has no BitShift" in errs[1].reason
    # an un-inlined custom op (no function body) is its own error
    m_custom = _model(nodes, [_ids_input()], outs, [_init("two", 2, np.int32)])
    m_custom.opset_import.append(h.make_opsetid("qexport", 1))
    errs = errors_only(check_graph(m_custom))
    assert any(f.node == "requant" and "custom op qexport::Requant" in f.reason for f in errs)


def test_axes_must_be_initializers() -> None:
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32, name="cast"),
        h.make_node("Shape", ["ids"], ["shp"], name="shape"),
        h.make_node("Slice", ["shp", "zero", "one"], ["n"], name="first_dim"),
        h.make_node("Unsqueeze", ["ids", "n"], ["u"], name="dynamic_axes"),
    ]
    inits = [_init("zero", [0], np.int64), _init("one", [1], np.int64)]
    findings = check_graph(
        _model(nodes, [_ids_input()], [h.make_tensor_value_info("u", T.INT32, None)], inits)
    )
    errs = errors_only(findings)
    assert [f.node for f in errs] == ["dynamic_axes"]
    assert "must be an initializer" in errs[0].reason


def test_support_table_facts() -> None:
    for op in ("MatMulInteger", "BitShift", "ConvInteger", "QLinearMatMul"):
        assert not TRT10_OPS[op].supported
    for op in ("Floor", "Round", "Sqrt", "Pow", "MatMul", "Gemm", "Softmax", "Erf", "Tanh"):
        assert "INT32" not in TRT10_OPS[op].types, op
    for op in ("Add", "Sub", "Mul", "Div", "Min", "Max", "Abs", "Neg", "Where", "Less", "Greater"):
        assert "INT32" in TRT10_OPS[op].types, op
    for op in ("GreaterOrEqual", "Equal", "ReduceSum", "ReduceMax", "Cast", "Gather", "Reshape", "Concat"):
        assert "INT32" in TRT10_OPS[op].types, op
    assert TRT10_OPS["DequantizeLinear"].types >= {"INT8"} and "INT8" not in TRT10_OPS["Cast"].types
    assert "zero" in TRT10_OPS["DequantizeLinear"].restrictions


def test_check_onnx_file_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(clean_model(), str(path))
    assert check_onnx_file(path) == []
    with pytest.raises(BackendError, match="not found"):
        check_onnx_file(tmp_path / "nope.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a protobuf\xff" * 3)
    with pytest.raises(BackendError, match="is not an ONNX model"):
        check_onnx_file(tmp_path / "junk.onnx")


@pytest.fixture
def no_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` now raises ImportError


def test_compile_without_tensorrt_is_a_clear_error(tmp_path: Path, no_tensorrt: None) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(clean_model(), str(path))
    backend = get_backend("trt")
    assert isinstance(backend, TRTBackend)
    assert backend.available() == (False, MISSING_MESSAGE)
    with pytest.raises(BackendError) as exc:
        backend.compile(path, tmp_path / "m.plan", precision="int8")
    assert exc.value.message == "TensorRT is not installed: build in docker/Dockerfile.trt"
    assert not (tmp_path / "m.plan").exists()
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        backend.load(path, device="cuda")
    # the lint alone needs no TensorRT, nor does option validation
    assert backend.compile(path, check_only=True) == path
    with pytest.raises(BackendError, match="unknown precision 'int4'"):
        backend.compile(path, precision="int4")
    with pytest.raises(BackendError, match="bad shape range"):
        backend.compile(path, shapes="batch=4:2:1")


def test_stub_only_tensorrt_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    # tensorrt-stubs installs tensorrt/*.pyi only; Python imports that as an empty namespace package
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    assert TRTBackend.available() == (False, MISSING_MESSAGE)


def test_compile_refuses_unsupported_graph_before_needing_tensorrt(tmp_path: Path, no_tensorrt: None) -> None:
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32, name="cast_ids"),
        h.make_node("Floor", ["ids"], ["fl"], name="int_floor"),
    ]
    path = tmp_path / "bad.onnx"
    onnx.save(_model(nodes, [_ids_input()], [h.make_tensor_value_info("fl", T.INT32, None)], []), str(path))
    with pytest.raises(BackendError, match="int_floor") as exc:
        TRTBackend().compile(path, tmp_path / "bad.plan")
    assert "cannot build" in exc.value.message
    with pytest.raises(BackendError, match="int_floor"):
        TRTBackend().compile(path, check_only=True)


def test_parse_shapes_and_profiles() -> None:
    shapes = parse_shapes("batch=1:8:32, seq=16:128:256")
    assert (shapes["batch"].min, shapes["batch"].opt, shapes["batch"].max) == (1, 8, 32)
    profiles = _input_profiles(clean_model(), shapes)
    assert profiles == {
        "input_ids": ((1, 16), (8, 128), (32, 256)),
        "attention_mask": ((1, 16), (8, 128), (32, 256)),
    }
    for bad in ("batch=8:1:32", "batch=0:1:2", "batch=1:2", "", "batch=1:1:1,batch=2:2:2"):
        with pytest.raises(BackendError):
            parse_shapes(bad)
    with pytest.raises(BackendError, match="no range"):
        _input_profiles(clean_model(), parse_shapes("batch=1:1:1"))
    with pytest.raises(BackendError, match="match no dynamic"):
        _input_profiles(clean_model(), parse_shapes("batch=1:1:1,seq=1:1:1,heads=1:1:1"))

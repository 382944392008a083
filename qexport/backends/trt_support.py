"""TensorRT 10 ONNX-parser support matrix, and a lint that checks a graph against it.

Source of the table
-------------------
``docs/operators.md`` of onnx/onnx-tensorrt, branch ``10.1-GA`` (commit 96e7811,
"ONNX-TensorRT 10.1 GA release", 2024-06-17; the newest 10.x branch in the snapshot
read), whose header says "TensorRT 10.0 supports operators in the inclusive range of
opset 9 to opset 20". Op types, supported data types and restrictions below are copied
from that chart (the doc's ``INF64`` typo for ConstantOfShape read as INT64). Where the
doc and the same branch's importer source disagree, the doc's types stay in ``types``
and the extra types the importer demonstrably accepts go to ``importer_types`` with the
file named in ``note``; :func:`check_graph` reports those as warnings, not errors.

Facts from the doc (and the 10.1-GA importer) that the integer contract relies on:

* No integer matrix product: MatMul and Gemm are FP32/FP16/BF16 only; MatMulInteger,
  ConvInteger, QLinearMatMul, QLinearConv are "N". (``MatMul`` importer:
  ``notInvalidType(inputs.at(0), {"INT32", "INT64"})``.) Linears reach TensorRT only as
  ``DequantizeLinear(int8, scale 1.0, zp 0) -> MatMul (float) -> Cast(int32)``.
* No BitShift, BitwiseAnd/Or/Xor/Not ("N").
* INT32 (and INT64) only for some ops: elementwise Add/Sub/Mul/Div/Min/Max/Sum/Mean/Mod,
  comparisons, Abs/Neg/Sign, Reduce*, Where, Gather, shape/layout ops. Floor, Round,
  Ceil, Sqrt, Pow, Exp, Erf, Tanh, Softmax, Reciprocal are float only; the importer's
  ``unaryHelper`` rejects INT32/INT64 for every unary op except ABS, SIGN and NEG, and
  ``elementwiseCheck`` rejects integer POW.
* INT8/INT4/FP8 are "Quantized Types": a tensor of those types exists only between a
  QuantizeLinear and a DequantizeLinear (or as a DequantizeLinear weight). Cast does not
  list INT8. QuantizeLinear takes FP32/FP16/BF16 and needs ``y_zero_point`` 0;
  DequantizeLinear takes INT8/FP8/INT4 and needs ``x_zero_point`` 0
  (``QuantDequantLinearHelper``: "TensorRT only supports symmetric quantization"; a UINT8
  zero point is replaced by INT8 with a warning; constant scales must be positive).
* UINT8 only as a network input or output type; DOUBLE is cast down to FLOAT.
* TensorRT does not run ONNX shape inference: it derives types layer by layer while
  building the network. :func:`check_graph` approximates this with
  ``onnx.shape_inference.infer_shapes(check_type=True, data_prop=True)`` after inlining
  local functions (``onnx.inliner.inline_local_functions``), i.e. the same type rules
  ``onnx.checker``/``check_model`` apply, then reads every tensor's element type.

Integer division semantics
--------------------------
The parser maps ONNX ``Div`` to ``ElementWiseOperation.DIV`` (``elementwiseHelper(...,
kDIV)``); ``FLOOR_DIV`` ("Floor division of the first element by the second") is a
separate operation that the ONNX parser uses only inside ``Mod`` with ``fmod=0``. For
INT32/INT64, ``DIV`` rounds toward zero (C semantics, -11 / 3 == -3), as stated in
onnx/onnx#4016 ("ONNX runtime and TensorRT (kDiv) are defaulting to rounding towards
zero"); Python/numpy floor division gives -4. The qexport contract uses
Div only with non-negative dividends and positive divisors, where truncation equals
floor, so results do not depend on this choice.

Limitations: only the top-level graph is checked (If/Loop/Scan bodies are not walked);
types that shape inference cannot determine are reported as warnings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import onnx
import onnx.inliner
from onnx import TensorProto, numpy_helper

from qexport.export.onnx_utils import dtype_name, graph_constants

__all__ = [
    "DOC_SOURCE",
    "OPSET_RANGE",
    "TRT10_OPS",
    "Finding",
    "OpSupport",
    "check_graph",
    "check_onnx_file",
    "errors_only",
    "format_findings",
]

DOC_SOURCE = "onnx/onnx-tensorrt docs/operators.md @ 10.1-GA (96e7811)"
OPSET_RANGE = (9, 20)  # "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class OpSupport:
    """One row of the support matrix.

    ``types``: the doc's "Supported Types" (names as in the doc: FP32, FP16, BF16, INT32,
    INT64, INT8, FP8, INT4, UINT8, BOOL). ``inputs``/``outputs``: which input/output
    positions those types describe (``None`` = every input); other positions (indices,
    shapes, axes, conditions) are not type-checked against ``types``.
    ``axes_input``: position of an input that must be an initializer (a Constant counts).
    """

    op: str
    supported: bool
    types: frozenset[str] = frozenset()
    restrictions: str = ""
    inputs: tuple[int, ...] | None = (0,)
    outputs: tuple[int, ...] = ()
    axes_input: int | None = None
    importer_types: frozenset[str] = frozenset()
    note: str = ""


_FP = ("FP32", "FP16", "BF16")
_FPI = (*_FP, "INT32", "INT64")
_FPIB = (*_FPI, "BOOL")


def _y(
    op: str,
    types: Iterable[str],
    restrictions: str = "",
    *,
    inputs: tuple[int, ...] | None = (0,),
    outputs: tuple[int, ...] = (),
    axes_input: int | None = None,
    importer_types: Iterable[str] = (),
    note: str = "",
) -> OpSupport:
    return OpSupport(
        op, True, frozenset(types), restrictions, inputs, outputs, axes_input, frozenset(importer_types), note
    )


def _n(op: str) -> OpSupport:
    return OpSupport(op, False, inputs=())


_AXES = "`axes` must be an initializer"
_ROWS: list[OpSupport] = [
    # --- elementwise binary / n-ary (every input carries the data type) ---
    _y("Add", _FPI, inputs=None),
    _y("Sub", _FPI, inputs=None),
    _y("Mul", _FPI, inputs=None),
    _y("Div", _FPI, inputs=None, note="INT32/INT64 Div is ElementWiseOperation.DIV: rounds toward zero"),
    _y("Mod", _FPI, inputs=None, note="fmod=0 needs integer inputs (floor-division remainder)"),
    _y("Min", _FPI, inputs=None),
    _y("Max", _FPI, inputs=None),
    _y("Sum", _FPI, inputs=None),
    _y("Mean", (*_FPI, "FP8"), inputs=None),
    _y("Pow", _FP, inputs=None),
    _y("Equal", _FPI, inputs=None),
    _y("Less", _FPI, inputs=None),
    _y("LessOrEqual", _FPI, inputs=None),
    _y("Greater", _FPI, inputs=None),
    _y("GreaterOrEqual", _FPI, inputs=None),
    _y("And", ("BOOL",), inputs=None),
    _y("Or", ("BOOL",), inputs=None),
    _y("Xor", ("BOOL",), inputs=None),
    _y("Where", _FPIB, inputs=(1, 2)),
    _y(
        "Clip",
        _FP,
        inputs=None,
        importer_types=("INT32", "INT64"),
        note="10.1-GA onnxOpImporters.cpp Clip: INT32/INT64 inputs take an elementwise max/min path",
    ),
    # --- unary ---
    _y("Abs", _FPI),
    _y("Neg", _FPI),
    _y("Sign", _FPI),
    _y("Not", ("BOOL",)),
    _y("Floor", _FP),
    _y("Ceil", _FP),
    _y("Round", _FP),
    _y("Sqrt", _FP),
    _y("Reciprocal", _FP),
    _y("Exp", _FP),
    _y("Log", _FP),
    _y("Erf", _FP),
    _y("Tanh", _FP),
    _y("Sigmoid", _FP),
    _y("Relu", _FPI),
    _y("Gelu", (*_FPI, "INT8")),
    _y("IsNaN", _FPI),
    _y("IsInf", _FP),
    # --- float compute ---
    _y("MatMul", _FP, inputs=(0, 1)),
    _y("Gemm", _FP, inputs=(0, 1, 2)),
    _y("Einsum", _FP, inputs=None),
    _y("Softmax", _FP),
    _y("LogSoftmax", _FP),
    _y("LayerNormalization", _FP, "Only the first output `Y` is supported.", inputs=(0, 1, 2)),
    _y("Dropout", _FP, "`is_traning` must be an initializer and evaluate to False."),
    # --- reductions ---
    *(
        _y(r, _FPI, _AXES, axes_input=1)
        for r in (
            "ReduceSum",
            "ReduceMax",
            "ReduceMin",
            "ReduceMean",
            "ReduceProd",
            "ReduceL1",
            "ReduceL2",
            "ReduceLogSum",
            "ReduceLogSumExp",
            "ReduceSumSquare",
        )
    ),
    _y("ArgMax", _FPI),
    _y("ArgMin", _FPI),
    _y(
        "CumSum",
        _FP,
        "`axis` must be an initializer",
        axes_input=1,
        importer_types=("INT32", "INT64"),
        note="10.1-GA onnxOpImporters.cpp CumSum: no dtype assertion; built as a Loop of ElementWise SUM",
    ),
    _y("TopK", _FPI, "`sorted` must be 1. `K` input must be less than 3840."),
    # --- shape / layout / data movement ---
    _y("Shape", _FPIB),
    _y("Size", _FPIB),
    _y("Reshape", _FPIB),
    _y("Transpose", _FPIB),
    _y("Flatten", _FPIB),
    _y("Squeeze", _FPIB, _AXES, axes_input=1),
    _y("Unsqueeze", _FPIB, "`axes` must be a constant tensor", axes_input=1),
    _y("Concat", _FPIB, inputs=None),
    _y("Split", _FPIB),
    _y("Slice", _FPIB, _AXES, axes_input=3),
    _y("Expand", _FPIB),
    _y("Tile", _FPIB),
    _y("Gather", _FPIB),
    _y("GatherElements", _FPIB),
    _y("GatherND", _FPIB),
    _y("ScatterElements", _FPI),
    _y("ScatterND", _FPI, "`reduction` is not supported"),
    _y("Pad", _FPI, "`axes` must be an initializer", axes_input=3),
    _y("Trilu", _FPIB),
    _y("Range", _FPI, inputs=None),
    _y("OneHot", _FPIB, "`depth` must be a build-time constant"),
    _y("Identity", _FPIB),
    _y("Cast", (*_FPIB, "UINT8"), inputs=(0,), outputs=(0,)),
    _y("CastLike", (*_FPIB, "UINT8"), inputs=(0, 1)),
    _y(
        "Constant",
        _FPIB,
        "`sparse_value`, `value_string`, and `value_strings` attributes are unsupported.",
        inputs=(),
        outputs=(0,),
    ),
    _y("ConstantOfShape", _FPIB, inputs=(), outputs=(0,)),
    _y("NonZero", ("FP32", "FP16")),
    # --- quantization ---
    _y("QuantizeLinear", _FP, "`y_zero_point` must be 0", inputs=(0,)),
    _y("DequantizeLinear", ("INT8", "FP8", "INT4"), "`x_zero_point` must be zero", inputs=(0,)),
    # --- control flow (bodies not walked here) ---
    _y("If", _FPIB, inputs=()),
    _y("Loop", _FPIB, inputs=()),
    # --- unsupported ("N" in the doc) ---
    *(
        _n(op)
        for op in (
            "BitShift",
            "BitwiseAnd",
            "BitwiseNot",
            "BitwiseOr",
            "BitwiseXor",
            "MatMulInteger",
            "ConvInteger",
            "QLinearMatMul",
            "QLinearConv",
            "DynamicQuantizeLinear",
            "Det",
            "Compress",
            "Unique",
            "StringNormalizer",
            "RegexFullMatch",
            "NegativeLogLikelihoodLoss",
            "SoftmaxCrossEntropyLoss",
            "Multinomial",
            "MaxUnpool",
            "MaxRoiPool",
            "Optional",
            "OptionalGetElement",
            "OptionalHasElement",
            "SequenceAt",
            "SequenceConstruct",
            "SequenceEmpty",
            "SequenceErase",
            "SequenceInsert",
            "SequenceLength",
            "SequenceMap",
            "SplitToSequence",
            "ConcatFromSequence",
        )
    ),
]

TRT10_OPS: dict[str, OpSupport] = {row.op: row for row in _ROWS}

_QDQ_HINT = (
    "export with --linear qdq: DequantizeLinear(int8, scale 1.0, zero point 0) -> float MatMul -> Cast(int32)"
)
_UNSUPPORTED_HINTS: dict[str, tuple[str, str]] = {
    "MatMulInteger": ("TensorRT has no integer MatMul", _QDQ_HINT),
    "ConvInteger": ("TensorRT has no integer convolution", _QDQ_HINT),
    "QLinearMatMul": ("TensorRT does not import QLinearMatMul", _QDQ_HINT),
    "QLinearConv": (
        "TensorRT does not import QLinearConv",
        "use QuantizeLinear/DequantizeLinear around Conv",
    ),
    "BitShift": ("TensorRT has no BitShift", "use Mul/Div by 2^z or a Gather LUT of powers of two"),
    "DynamicQuantizeLinear": ("not supported", "use QuantizeLinear with a constant scale and zero point 0"),
}
for _op in ("BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor"):
    _UNSUPPORTED_HINTS[_op] = ("TensorRT has no bitwise ops", "express the arithmetic with int32 Add/Mul/Div")

# ONNX element type -> the doc's type name.
_DOC_NAME: dict[int, str] = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.INT32: "INT32",
    TensorProto.INT64: "INT64",
    TensorProto.INT8: "INT8",
    TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL",
    TensorProto.FLOAT8E4M3FN: "FP8",
    TensorProto.INT4: "INT4",
}
_QUANTIZED = {"INT8", "FP8", "INT4"}
_INT_MATMUL_OPS = {"MatMul", "Gemm", "Einsum"}
# Ops through which int64 may flow without being "integer arithmetic" (layout and shape plumbing).
_SHAPE_OPS = {
    "Shape",
    "Size",
    "Reshape",
    "Transpose",
    "Flatten",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Split",
    "Slice",
    "Gather",
    "Expand",
    "Tile",
    "Identity",
    "Cast",
    "CastLike",
    "ConstantOfShape",
    "Constant",
}
_CONTRACT_FORBIDDEN = {
    "Mod": "the integer contract has no Mod (sign conventions differ between runtimes)",
}


_dtype_name = dtype_name


@dataclass(frozen=True)
class Finding:
    """One thing TensorRT (or the integer contract on TensorRT) cannot take.

    ``severity`` "error" makes :meth:`TRTBackend.compile` refuse the model; "warning" is
    printed but does not block (doc/importer disagreements, contract advice, unknown types).
    """

    node: str
    op: str
    dtypes: tuple[str, ...]
    reason: str
    hint: str = ""
    severity: Severity = "error"

    def __str__(self) -> str:
        types = f" [{', '.join(self.dtypes)}]" if self.dtypes else ""
        text = f"{self.severity}: {self.node or '<graph>'} ({self.op}){types}: {self.reason}"
        return f"{text}; hint: {self.hint}" if self.hint else text


def errors_only(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def format_findings(findings: Sequence[Finding]) -> str:
    """Human-readable report, one finding per line plus a summary line."""
    if not findings:
        return "TensorRT check: OK (no findings)"
    n_err = len(errors_only(findings))
    lines = [str(f) for f in findings]
    lines.append(
        f"TensorRT check: {n_err} error(s), {len(findings) - n_err} warning(s) (matrix: {DOC_SOURCE})"
    )
    return "\n".join(lines)


class _Add(Protocol):
    """Signature of the per-node ``add`` closure in :func:`check_graph`."""

    def __call__(self, reason: str, hint: str = "", severity: Severity = "error") -> None: ...


@dataclass
class _GraphInfo:
    types: dict[str, int] = field(default_factory=dict)
    consts: dict[str, onnx.TensorProto] = field(default_factory=dict)


def _collect(model: onnx.ModelProto) -> _GraphInfo:
    g = model.graph
    info = _GraphInfo()
    for vi in (*g.input, *g.value_info, *g.output):
        if vi.type.HasField("tensor_type"):
            t = vi.type.tensor_type.elem_type
            if t != TensorProto.UNDEFINED or vi.name not in info.types:
                info.types[vi.name] = t
    for init in g.initializer:
        info.types[init.name] = init.data_type
        info.consts[init.name] = init
    for name, t in graph_constants(g).items():
        info.consts[name] = t
        info.types.setdefault(name, t.data_type)
    return info


def _infer(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[Finding]]:
    findings: list[Finding] = []
    try:
        model = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # onnx raises assorted C++ errors
        findings.append(Finding("", "(model)", (), f"could not inline local functions: {exc}"))
    try:
        model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:
        findings.append(
            Finding(
                "",
                "(model)",
                (),
                f"ONNX type/shape inference failed: {str(exc).splitlines()[0] if str(exc) else exc!r}",
                "the model is not valid ONNX; TensorRT's parser would reject it too",
            )
        )
        with contextlib.suppress(Exception):
            model = onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False)
    return model, findings


def _node_label(node: onnx.NodeProto, idx: int) -> str:
    return node.name or (f"{node.op_type}->{node.output[0]}" if node.output else f"{node.op_type}#{idx}")


def _int64_data_tensors(model: onnx.ModelProto, info: _GraphInfo) -> set[str]:
    """int64 tensors carrying data rather than shapes: graph inputs and what they flow into.

    Shape lineage (outputs of Shape/Size, constants, and anything computed only from those)
    is excluded: TensorRT evaluates it as shape tensors.
    """
    data: set[str] = {
        i.name
        for i in model.graph.input
        if info.types.get(i.name) == TensorProto.INT64 and i.name not in info.consts
    }
    for node in model.graph.node:
        if node.op_type in ("Shape", "Size"):
            continue
        if any(name in data for name in node.input if name):
            for out in node.output:
                if info.types.get(out) == TensorProto.INT64:
                    data.add(out)
    return data


def check_graph(model: onnx.ModelProto) -> list[Finding]:
    """List every node of ``model`` TensorRT 10's ONNX parser (per :data:`TRT10_OPS`) cannot take.

    Inlines local functions, runs ONNX type inference, then checks for each node: op known
    and supported; data-carrying input/output types within the row's ``types``; INT8/FP8/INT4
    only as QuantizeLinear outputs or DequantizeLinear inputs; Q/DQ zero points constant,
    int8 and all zero, constant scales positive; ``axes`` inputs that must be initializers;
    LayerNormalization's extra outputs unused. Contract checks (warnings): int64 data
    tensors in compute ops (only model inputs may be int64, cast to int32 at once), Mod.
    The input model is not modified. Findings come in node order.
    """
    model_copy = onnx.ModelProto()
    model_copy.CopyFrom(model)
    model_i, findings = _infer(model_copy)
    info = _collect(model_i)

    for imp in model_i.opset_import:
        if imp.domain in ("", "ai.onnx") and not (OPSET_RANGE[0] <= imp.version <= OPSET_RANGE[1]):
            findings.append(
                Finding(
                    "",
                    "(model)",
                    (),
                    f"default-domain opset {imp.version} is outside TensorRT 10.0's documented range "
                    f"{OPSET_RANGE[0]}..{OPSET_RANGE[1]}",
                    "export with opset <= 20 unless the TensorRT in docker/Dockerfile.trt documents more",
                    "warning",
                )
            )

    int64_data = _int64_data_tensors(model_i, info)

    for idx, node in enumerate(model_i.graph.node):
        label = _node_label(node, idx)
        in_types = tuple(_dtype_name(info.types.get(n, 0)) if n else "-" for n in node.input)
        op = node.op_type

        def add(reason: str, hint: str = "", severity: Severity = "error") -> None:
            findings.append(Finding(label, op, in_types, reason, hint, severity))  # noqa: B023

        if node.domain not in ("", "ai.onnx"):
            add(
                f"custom op {node.domain}::{op}: TensorRT needs a plugin for it",
                "export the flat (inlined) ONNX form; local functions are inlined before checking",
            )
            continue
        row = TRT10_OPS.get(op)
        if row is None:
            add(f"{op} is not in TensorRT 10's ONNX operator support matrix")
            continue
        if not row.supported:
            reason, hint = _UNSUPPORTED_HINTS.get(op, ("not supported", ""))
            add(f"{op}: {reason} (marked N in the TensorRT 10 support matrix)", hint)
            continue

        _check_types(node, row, info, add)
        _check_constraints(node, row, info, add)

        if op in _CONTRACT_FORBIDDEN:
            add(_CONTRACT_FORBIDDEN[op], "", "warning")
        if op not in _SHAPE_OPS and any(n in int64_data for n in node.input if n):
            add(
                "int64 tensor in a compute op: the integer contract allows int64 only for the model "
                "inputs, cast to int32 at once",
                "Cast input_ids/attention_mask to int32 right after the graph inputs",
                "warning",
            )
    return findings


def _check_types(node: onnx.NodeProto, row: OpSupport, info: _GraphInfo, add: _Add) -> None:
    op = node.op_type
    positions = range(len(node.input)) if row.inputs is None else row.inputs
    checked: list[tuple[str, str]] = []  # (tensor name, "input k"/"output k")
    for k in positions:
        if k < len(node.input) and node.input[k]:
            checked.append((node.input[k], f"input {k}"))
    for k in row.outputs:
        if k < len(node.output) and node.output[k]:
            checked.append((node.output[k], f"output {k}"))

    reported: set[str] = set()
    for name, where in checked:
        elem = info.types.get(name, TensorProto.UNDEFINED)
        if elem == TensorProto.UNDEFINED:
            add(
                f"could not infer the type of {where} '{name}'",
                "run onnx shape inference on the export",
                "warning",
            )
            continue
        doc = _DOC_NAME.get(elem, _dtype_name(elem).upper())
        if doc in reported:
            continue
        if doc == "DOUBLE":
            reported.add(doc)
            add(f"{op} on double: TensorRT casts DOUBLE down to FLOAT", "export float32", "warning")
            continue
        if doc in row.types:
            continue
        reported.add(doc)
        short = _dtype_name(elem)
        allowed = ", ".join(sorted(row.types))
        if doc in row.importer_types:
            add(
                f"{op} on {short}: the TensorRT 10 doc lists only {allowed}; {row.note}",
                "accepted by the importer source; confirm with a build on the TensorRT image",
                "warning",
            )
            continue
        if doc in _QUANTIZED:
            hint = (
                "INT8 exists in TensorRT only as a quantized type: produce it with QuantizeLinear(float, "
                "scale, int8 zero point 0) and consume it with DequantizeLinear"
            )
        elif op in _INT_MATMUL_OPS and doc in ("INT32", "INT64", "UINT8", "BOOL"):
            hint = f"TensorRT has no integer MatMul; {_QDQ_HINT}"
        elif op == "Pow":
            hint = "no integer Pow in TensorRT: use Mul chains or a Gather lookup table"
        elif doc in ("INT32", "INT64"):
            hint = (
                "TensorRT's integer unary ops are only Abs, Neg and Sign; keep integer arithmetic to "
                "Add/Sub/Mul/Div/Min/Max/Where/Gather"
                if row.inputs == (0,) and not row.outputs
                else "compute this in float or restructure with supported integer ops"
            )
        elif doc == "UINT8":
            hint = "UINT8 is allowed only as a network input or output"
        else:
            hint = ""
        add(f"{op} on {short}: not supported (TensorRT 10 lists {allowed})", hint)


def _check_constraints(node: onnx.NodeProto, row: OpSupport, info: _GraphInfo, add: _Add) -> None:
    op = node.op_type
    if row.axes_input is not None and row.axes_input < len(node.input):
        name = node.input[row.axes_input]
        if name and name not in info.consts:
            add(
                f"{op}: input {row.axes_input} ('{name}') must be an initializer for TensorRT",
                row.restrictions,
            )
    if op == "LayerNormalization" and any(o for o in node.output[1:]):
        add(
            "LayerNormalization: only the first output Y is supported by TensorRT",
            "drop Mean/InvStdDev outputs",
        )
    if op == "Constant":
        bad = [a.name for a in node.attribute if a.name in ("sparse_value", "value_string", "value_strings")]
        if bad:
            add(f"Constant with {bad[0]} is not supported by TensorRT")
    if op in ("QuantizeLinear", "DequantizeLinear"):
        _check_qdq(node, info, add)


def _check_qdq(node: onnx.NodeProto, info: _GraphInfo, add: _Add) -> None:
    op = node.op_type
    zp_name = node.input[2] if len(node.input) > 2 else ""
    scale_name = node.input[1] if len(node.input) > 1 else ""
    if scale_name in info.consts:
        scale = numpy_helper.to_array(info.consts[scale_name])
        if scale.size == 0 or not np.all(scale.astype(np.float64) > 0):
            add(f"{op}: scale must be positive (TensorRT: 'Scale coefficients must all be positive')")
    if not zp_name:
        if op == "QuantizeLinear" and not any(a.name == "output_dtype" for a in node.attribute):
            add(
                "QuantizeLinear without a zero point: ONNX output is uint8, TensorRT quantizes to int8",
                "pass y_zero_point as an int8 0 so every runtime quantizes to int8 [-127, 127]",
            )
        return
    zp_type = info.types.get(zp_name, TensorProto.UNDEFINED)
    if zp_type == TensorProto.UINT8:
        add(
            f"{op}: uint8 zero point; TensorRT has no UINT8 quantization and uses INT8 instead",
            "use an int8 zero point of 0",
        )
    if zp_name not in info.consts:
        add(
            f"{op}: zero point '{zp_name}' is not a build-time constant; TensorRT requires all zeros",
            "make the zero point an initializer holding 0",
            "warning",
        )
        return
    zp = numpy_helper.to_array(info.consts[zp_name])
    if np.any(zp.astype(np.float64) != 0):
        nz = zp.reshape(-1)[np.flatnonzero(zp.reshape(-1).astype(np.float64) != 0)[0]].item()
        add(
            f"{op}: zero point {nz} != 0; TensorRT supports only symmetric quantization (zero point 0)",
            "quantize symmetrically: int8 range [-127, 127], zero point 0",
        )


def check_onnx_file(path: str | Path) -> list[Finding]:
    """Load an ONNX file (with external data, if any) and return :func:`check_graph`'s findings."""
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    from qexport.backends.base import read_onnx

    path = Path(path)
    model = read_onnx(path)  # BackendError when missing or not ONNX
    if any(uses_external_data(t) for t in model.graph.initializer):
        load_external_data_for_model(model, str(path.parent))
    return check_graph(model)

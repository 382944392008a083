"""Small ONNX graph helpers shared by the exporter's readers (ORT rewrites, TensorRT lint, TVM):
element-type maps and constant lookup (initializers and ``Constant`` nodes) in one place."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

Range = tuple[int, int]

#: numpy scalar type of an ONNX element type (the types qexport's graphs use).
NP_OF: dict[int, type[np.generic]] = {
    TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8, TensorProto.INT16: np.int16,
    TensorProto.UINT16: np.uint16, TensorProto.INT32: np.int32, TensorProto.UINT32: np.uint32,
    TensorProto.INT64: np.int64, TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
    TensorProto.FLOAT16: np.float16, TensorProto.BOOL: np.bool_,
}
#: ``[lo, hi]`` of each integer element type.
INT_BOUNDS: dict[int, Range] = {
    TensorProto.INT8: (-(2**7), 2**7 - 1), TensorProto.UINT8: (0, 2**8 - 1),
    TensorProto.INT16: (-(2**15), 2**15 - 1), TensorProto.UINT16: (0, 2**16 - 1),
    TensorProto.INT32: (-(2**31), 2**31 - 1), TensorProto.UINT32: (0, 2**32 - 1),
    TensorProto.INT64: (-(2**63), 2**63 - 1),
}
INT_TYPES = frozenset(INT_BOUNDS)


def dtype_name(elem_type: int) -> str:
    """Short lowercase name of an ONNX element type ('int32', 'float32', ...); '?' if undefined."""
    if elem_type == TensorProto.UNDEFINED:
        return "?"
    if elem_type == TensorProto.BFLOAT16:
        return "bfloat16"
    try:
        return str(np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, TypeError, ValueError):
        return str(TensorProto.DataType.Name(elem_type)).lower()


def attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    """The value of ``node``'s attribute ``name`` (``default`` when absent)."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor an ``ai.onnx`` ``Constant`` node produces (any of its value attributes); None
    for other nodes (and for sparse values)."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or not node.attribute:
        return None
    a = node.attribute[0]
    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
        return a.t
    scalars = {"value_int": (np.int64, a.i), "value_float": (np.float32, a.f)}
    lists = {"value_ints": (np.int64, a.ints), "value_floats": (np.float32, a.floats)}
    if a.name in scalars:
        dt, v = scalars[a.name]
        return numpy_helper.from_array(np.asarray(v, dtype=dt))
    if a.name in lists:
        dt, vs = lists[a.name]
        return numpy_helper.from_array(np.asarray(list(vs), dtype=dt))
    return None


def graph_constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Every constant value of ``graph`` by name: initializers and ``Constant`` node outputs."""
    out = {t.name: t for t in graph.initializer}
    for node in graph.node:
        t = constant_tensor(node)
        if t is not None and node.output:
            out[node.output[0]] = t
    return out


class Constants:
    """Cached numpy lookup of a graph's constants (:func:`graph_constants`); ``add`` registers more."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self._protos = graph_constants(graph)
        self._arrays: dict[str, np.ndarray] = {}

    def __contains__(self, name: str) -> bool:
        return name in self._arrays or name in self._protos

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._arrays:
            proto = self._protos.get(name)
            if proto is None:
                return None
            self._arrays[name] = numpy_helper.to_array(proto)
        return self._arrays[name]

    def dtype(self, name: str) -> int | None:
        proto = self._protos.get(name)
        if proto is not None:
            return int(proto.data_type)
        arr = self._arrays.get(name)
        return None if arr is None else helper.np_dtype_to_tensor_dtype(arr.dtype)

    def add(self, name: str, arr: np.ndarray) -> None:
        self._arrays[name] = arr

    def all(self, names: Iterable[str]) -> list[np.ndarray] | None:
        """The values of ``names``; None unless every one is constant."""
        arrs = [self.get(n) for n in names]
        return None if any(a is None for a in arrs) else [a for a in arrs if a is not None]

"""Value-range analysis of an integer ONNX graph: what the ORT rewrites may assume.

:class:`GraphFacts` answers, for any value of a graph, its element type, its constant value (if
any) and a proven ``[lo, hi]`` of its integers -- from constants, integer types, the clamps of the
``qexport`` functions (their constants read back with :func:`~qexport.export.constants.from_onnx_inputs`),
and interval arithmetic through ``Add``/``Sub``/``Mul``/``MatMul``/``Min``/``Max``/``Clip``/casts
and layout ops. A range is a claim the rewrites rely on for exactness, so every rule either proves
its bound or returns None ("unknown"); a value whose arithmetic might have wrapped its dtype gets
no claim. :mod:`qexport.backends.ort_rewrite` builds on it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto

from qexport.export.constants import FUNCTION_CONSTS, from_onnx_inputs
from qexport.export.functions import DOMAIN
from qexport.export.onnx_utils import INT_BOUNDS, Constants, Range, attr
from qexport.ops import kernels as K

INT32_MAX = 2**31 - 1
#: Ops that only move elements: any elementwise conversion commutes with them (data = input 0).
LAYOUT_OPS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def requant_schedule(arrs: Sequence[np.ndarray]) -> K.ChannelRequant | None:
    """The ``Requant`` inputs as a :class:`~qexport.ops.kernels.ChannelRequant` whose every
    intermediate stays inside int32 for any input (what ``requant_params`` guarantees); None else."""
    rq = from_onnx_inputs(K.ChannelRequant, arrs)
    if rq is None:
        return None
    for b, p, m, q in zip(rq.bound, rq.pre, rq.m, rq.post, strict=True):
        a = b + ((1 << p) >> 1)
        if a > INT32_MAX or (a >> p) * m + ((1 << q) >> 1) > INT32_MAX:
            return None
    return rq


class GraphFacts:
    """Element types, constants and proven integer ranges of one graph's values (cached).

    Subclasses may register new constants (:meth:`add_constant`) and override
    :meth:`table_range` (the range of a value they will compute from a table).
    """

    def __init__(self, model: onnx.ModelProto, integer_matmuls: bool = False) -> None:
        """``integer_matmuls``: the QDQ form's float ``MatMul`` will run as an exact integer matmul
        (its range is then the integer product's, not only below ``2**24``)."""
        self.integer_matmuls = integer_matmuls
        g = model.graph
        self.graph = g
        self.inits = {t.name: t for t in g.initializer}
        self.inputs = {i.name for i in g.input}
        self.constants = Constants(g)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in g.node for o in n.output if o}
        self.consumers: Counter[str] = Counter(i for n in g.node for i in n.input if i)
        for o in g.output:
            self.consumers[o.name] += 1
        try:
            inferred = onnx.shape_inference.infer_shapes(model).graph
            infos = [*inferred.value_info, *inferred.input, *inferred.output]
        except Exception:  # inference is an aid (dtypes, K of a matmul); rewrites check what they need
            infos = [*g.value_info, *g.input, *g.output]
        self.vinfo = {v.name: v.type.tensor_type for v in infos if v.type.HasField("tensor_type")}
        self._range_cache: dict[str, Range | None] = {}
        self._new_dtypes: dict[str, int] = {}

    def add_constant(self, name: str, arr: np.ndarray) -> None:
        """Register a constant created after the analysis started (readable by ``const``/``dtype``)."""
        self.constants.add(name, arr)
        self._new_dtypes[name] = onnx.helper.np_dtype_to_tensor_dtype(arr.dtype)

    def table_range(self, name: str) -> Range | None:
        """Hook: the range of a value a subclass computes from a table (None: not one)."""
        return None

    def dtype(self, name: str) -> int | None:
        """The ONNX element type of a value (inferred, declared, or known from its producer)."""
        if name in self._new_dtypes:
            return self._new_dtypes[name]
        dt = self.constants.dtype(name)
        if dt is not None:
            return dt
        t = self.vinfo.get(name)
        if t is not None and t.elem_type:
            return int(t.elem_type)
        node = self.producer.get(name)
        if node is not None and node.domain == DOMAIN:
            return TensorProto.INT32  # every qexport function is int32 -> int32
        if node is not None and node.op_type == "Cast":
            return int(attr(node, "to"))  # type: ignore[call-overload]
        return None

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant output (None if not constant)."""
        return self.constants.get(name)

    def consts(self, names: Sequence[str]) -> list[np.ndarray] | None:
        return self.constants.all(names)

    # ------------------------------------------------------------------ value ranges
    def range(self, name: str) -> Range | None:
        """Proven ``[lo, hi]`` of an integer (or integer-valued) tensor, or None."""
        if name not in self._range_cache:
            self._range_cache[name] = None  # cycles cannot occur in a DAG; guards re-entry anyway
            self._range_cache[name] = self._range(name)
        return self._range_cache[name]

    def _range(self, name: str) -> Range | None:
        r = self._range_raw(name)
        dt = self.dtype(name) or -1
        bounds = INT_BOUNDS.get(dt)
        if r is not None and bounds is not None and (r[0] < bounds[0] or r[1] > bounds[1]):
            r = None  # the arithmetic may have wrapped: no claim
        if r is None and dt in (TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16):
            r = bounds  # a narrow integer type bounds its values by itself
        return r

    def _typed_range(self, name: str) -> Range | None:
        """``range(name)``, or the whole range of its integer dtype."""
        return self.range(name) or INT_BOUNDS.get(self.dtype(name) or -1)

    def _range_raw(self, name: str) -> Range | None:
        arr = self.const(name)
        if arr is not None:
            if arr.size == 0 or arr.dtype.kind not in "iuf" or not np.all(np.isfinite(arr)):
                return None
            lo, hi = float(arr.min()), float(arr.max())
            return (int(lo), int(hi)) if lo == int(lo) and hi == int(hi) else None
        tr = self.table_range(name)
        if tr is not None:
            return tr
        node = self.producer.get(name)
        if node is None:
            return None
        t, ins = node.op_type, list(node.input)
        if node.domain == DOMAIN:
            return self._fn_range(node)
        if node.domain not in ("", "ai.onnx") or not ins:
            return None
        if t in LAYOUT_OPS or t in ("Gather", "GatherElements"):
            return self.range(ins[0])
        if t == "Cast":
            r0 = self.range(ins[0])
            to = attr(node, "to")
            if r0 is None or not isinstance(to, int):
                return None
            if to in (TensorProto.FLOAT, TensorProto.DOUBLE):
                return r0 if max(abs(r0[0]), abs(r0[1])) <= 2**24 else None
            bounds = INT_BOUNDS.get(to)
            return r0 if bounds is not None and bounds[0] <= r0[0] and r0[1] <= bounds[1] else None
        if t == "DequantizeLinear" and self._unit_qdq(ins[1:]):
            return self.range(ins[0])
        if t == "QuantizeLinear" and self._unit_qdq(ins[1:]):
            r0 = self.range(ins[0])
            return None if r0 is None else (min(max(r0[0], -128), 127), max(min(r0[1], 127), -128))
        if t in ("Min", "Max", "Clip"):
            inf = float("inf")
            rs = [(self._typed_range(i) or (-inf, inf)) if i else None for i in ins]
            lo, hi = rs[0]  # type: ignore[misc]
            if t == "Min":
                for x in rs[1:]:
                    lo, hi = min(lo, x[0]), min(hi, x[1])  # type: ignore[index]
            elif t == "Max":
                for x in rs[1:]:
                    lo, hi = max(lo, x[0]), max(hi, x[1])  # type: ignore[index]
            else:
                if len(rs) > 1 and rs[1] is not None:
                    lo, hi = max(lo, rs[1][0]), max(hi, rs[1][0])
                if len(rs) > 2 and rs[2] is not None:
                    lo, hi = min(lo, rs[2][1]), min(hi, rs[2][1])
            if not (np.isfinite(lo) and np.isfinite(hi)) or lo != int(lo) or hi != int(hi):
                return None
            return int(lo), int(hi)
        a = self.range(ins[0])
        if a is None:
            return None
        if t == "Abs":
            return (0 if a[0] <= 0 <= a[1] else min(abs(a[0]), abs(a[1]))), max(abs(a[0]), abs(a[1]))
        if t == "Neg":
            return -a[1], -a[0]
        if t == "Sign":
            return (-1 if a[0] < 0 else 0 if a[0] == 0 else 1), (1 if a[1] > 0 else 0 if a[1] == 0 else -1)
        if len(ins) < 2:
            return None
        b = self.range(ins[1])
        if t in ("MatMulInteger", "MatMul") and len(ins) == 2 and b is not None:
            kdim = self._inner_dim(ins[0])
            amax = max(abs(a[0]), abs(a[1]))
            w = self.const(ins[1])
            dq = self.producer.get(ins[1])
            is_dq = dq is not None and dq.op_type == "DequantizeLinear"
            if w is None and dq is not None and is_dq and self._unit_qdq(dq.input[1:]):
                w = self.const(dq.input[0])  # the int8 weights of the QDQ form
            if w is not None and w.ndim == 2:
                s = int(np.abs(w.astype(np.int64)).sum(0).max()) * amax
            elif kdim is not None:
                s = kdim * amax * max(abs(b[0]), abs(b[1]))
            else:
                return None
            if t == "MatMul" and s >= 2**24 and not self.integer_matmuls:
                return None  # the float product the spec computes is exact only below 2**24
            return -s, s
        if b is None:
            return None
        if t == "Add" and (mask := self._mask(node)) is not None:
            sr, fill = self.range(mask[0]), mask[2]
            assert sr is not None
            return min(sr[0], -fill), sr[1]
        if t == "Add":
            return a[0] + b[0], a[1] + b[1]
        if t == "Sub":
            return a[0] - b[1], a[1] - b[0]
        if t == "Mul":
            p = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
            return min(p), max(p)
        return None

    def _fn_range(self, node: onnx.NodeProto) -> Range | None:
        """The output range a ``qexport`` function's own clamp guarantees, from its constants."""
        arrs = self.consts(node.input[1:])
        cls = FUNCTION_CONSTS.get(node.op_type)
        if arrs is None or cls is None:
            return None
        if cls is K.ChannelRequant:
            rq = requant_schedule(arrs)
            return None if rq is None else (-rq.qmax, rq.qmax)
        c = from_onnx_inputs(cls, arrs)
        if isinstance(c, K.SoftmaxConsts):
            return 0, c.out_max
        if isinstance(c, K.LayerNormConsts) and requant_schedule(arrs[5:]) is not None:
            return -c.out.qmax, c.out.qmax
        if isinstance(c, K.TanhConsts):
            return -c.out_max, c.out_max
        return None

    def _mask(self, node: onnx.NodeProto) -> tuple[str, str, int] | None:
        """``Add(Mul(s, keep), Mul(Sub(keep, 1), fill))`` with ``keep`` in {0, 1}, ``fill > 0`` a
        constant and ``|s| <= fill`` (the exporter's arithmetic attention mask): ``(s, keep, fill)``.
        It equals ``Min(s, keep * 2 fill - fill)``: ``s`` where ``keep`` is 1, ``-fill`` where 0."""
        if node.op_type != "Add" or len(node.input) != 2:
            return None
        for i in (0, 1):
            mul, fmul = self.producer.get(node.input[i]), self.producer.get(node.input[1 - i])
            if mul is None or fmul is None or mul.op_type != "Mul" or fmul.op_type != "Mul":
                continue
            for j in (0, 1):
                s_, keep = mul.input[j], mul.input[1 - j]
                kr = self.range(keep)
                if kr is None or kr[0] < 0 or kr[1] > 1 or self.dtype(keep) != TensorProto.INT32:
                    continue
                for k in (0, 1):
                    sub, f = self.producer.get(fmul.input[k]), self.const(fmul.input[1 - k])
                    if sub is None or sub.op_type != "Sub" or sub.input[0] != keep or f is None:
                        continue
                    if f.size != 1:
                        continue
                    one, fill, sr = self.const(sub.input[1]), int(f.reshape(-1)[0]), self.range(s_)
                    if one is None or one.size != 1 or int(one.reshape(-1)[0]) != 1 or sr is None:
                        continue
                    bounded = 0 < fill < 2**30 and -fill <= sr[0] and sr[1] <= fill
                    if bounded and self.dtype(s_) == TensorProto.INT32:
                        return s_, keep, fill
        return None

    def _inner_dim(self, name: str) -> int | None:
        t = self.vinfo.get(name)
        if t is None or not t.shape.dim:
            return None
        d = t.shape.dim[-1]
        return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None

    def _unit_qdq(self, names: Sequence[str]) -> bool:
        """``scale == 1`` and ``zero_point == 0`` (int8 or absent): DQ/Q are casts on integers."""
        if not names:
            return False
        s = self.const(names[0])
        if s is None or s.size != 1 or float(s.reshape(-1)[0]) != 1.0:
            return False
        if len(names) > 1 and names[1]:
            z = self.const(names[1])
            if z is None or z.size != 1 or z.dtype != np.int8 or int(z.reshape(-1)[0]) != 0:
                return False
        return True

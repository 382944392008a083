"""TVM ``llvm`` (CPU) build pipeline for :mod:`qexport.backends.tvm`: schedules that need no tuning.

TVM's stock Relax CPU pipeline (``tvm.relax.backend.cpu_generic``) legalizes and fuses the graph
but schedules nothing: every PrimFunc runs as serial scalar loops. :func:`cpu_pipeline` is that
pipeline with three additions:

* Relax rewrites before legalization (all exact):

  - ``min``/``max`` over ``stack([broadcast_to(a), broadcast_to(b), ...], axis=0)`` (how TVM's
    ONNX importer spells ONNX ``Min``/``Max`` with several inputs) -> ``minimum(a, b, ...)``:
    the same values, but elementwise, so FuseOps fuses it with its neighbours and no broadcast
    constant is materialised;
  - ``take`` (ONNX ``Gather``) in mode ``fast`` -> mode ``clip``: ``fast`` reads out of bounds on a
    bad index (and TVM warns about it once per gather). qexport's gathers are embedding rows
    indexed by ``input_ids`` (user data: not provably in range) and lookup tables indexed by
    values the graph clamps; ``clip`` costs one min/max per index and returns the same element
    for every in-range index;
  - ``divide(x, 2^k)`` with an integer ``x`` provably >= 0 (a small forward analysis over the
    bindings, :func:`_nonneg_bindings`) and a divisor that is a constant of positive powers of two
    or a ``take`` from such a table -> ``right_shift(x, k)`` (``take(log2(table), index)``):
    truncating division of a non-negative value by ``2^k`` is the shift, and a shift vectorises
    (x86 has no vector integer division); every other int32 divide whose divisor is not one
    constant (softmax's row sum, LayerNorm's standard deviation, per-channel tables) runs as a
    float64 division truncated back to int32, exact for all int32 operands (the proof is in
    :func:`_pow2_divides_to_shifts`) and vectorised (``vdivpd``). The sidecar counts the divides
    rewritten (``pow2_divides_to_shifts``, ``divides_in_float64``) and left (one constant divisor:
    LLVM multiplies by a magic number);
  - ``op(broadcast_to(c, s), x)`` for an elementwise binary ``op`` whose ``x`` already has shape
    ``s`` -> ``op(c, x)``: a constant clamp bound stays a scalar instead of being folded into a
    full-size tensor (in static builds that made the library ~10x larger and each op read a
    tensor of copies of one number);
  - ``take`` from a constant table that is a formula of the index (``a*i + b``, such as
    ``log2`` of a shift table, or ``c << i``) -> that formula of the clipped index (a gather
    does not vectorise, arithmetic does);
  - when :mod:`qexport.backends.tvm_gemm` is present, its ``lower_int8_matmuls`` replaces the int8
    matmuls by already scheduled kernels (marked ``qexport.scheduled``).

* :class:`ScheduleCPU`, a module pass after ``FuseTIR`` that schedules every PrimFunc not already
  scheduled with the first rule that applies (the counts go in the sidecar):

  - ``matmul``: register-tiled (4 rows x one vector of columns), parallel over batch x row tiles,
    vectorised over the output columns, reduction order unchanged (int32 accumulation is exact;
    float sums of exact integers keep their order);
  - ``elementwise``: every injective block inlined into one, leading loops fused and parallel,
    innermost loop vectorised (a symbolic innermost extent, a dynamic sequence axis, stays a loop
    of its own under the parallel one, with plain index arithmetic that LLVM vectorises);
  - ``reduction``: producers/consumers inlined, leading spatial loops of the last block parallel,
    the other blocks computed under them (softmax / LayerNorm rows), injective blocks vectorised,
    short reductions (ONNX ``Min``/``Max`` folds) vectorised over the spatial axis;
  - ``fallback``: injective blocks inlined, the outer spatial loops of each block parallel;
  - ``unscheduled``: a PrimFunc no rule handles builds as is.

* row groups (:mod:`qexport.backends.tvm_rows`, between ``FuseOps`` and ``FuseTIR``): the kernels
  of one LayerNorm (row sums, maxima, Newton square root, normalisation) or of one softmax's
  max / exp / sum merge into one PrimFunc, scheduled row by row (the ``reduction`` rule; with
  outputs in the middle, every block is computed under the first block's parallel row loop).

* the GEMM epilogues (:mod:`qexport.backends.tvm_epilogue`, before the rules): each int8 GEMM's
  fused elementwise consumer (requantisation, i-GELU, residual add, reshape into heads) runs in
  the GEMM's store of each accumulator, so the int32 output never goes to memory.

* optional MetaSchedule: a database (from :func:`tune`) is applied before the default rules; its
  records match only PrimFuncs with the same structure and target, everything else keeps the
  default schedules.

Vector width: the target's (``llvm_get_vector_width``: 512 bits with AVX-512, 256 with AVX2).
Parallel loops run on TVM's thread pool (``TVM_NUM_THREADS``, default: the cores).
"""

from __future__ import annotations

import collections
import functools
import importlib
import importlib.util
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from qexport.errors import BackendError
from qexport.host import LLVM_FEATURES, cpu_flags

SCHEDULED_ATTR = "qexport.scheduled"
RULE_ATTR = "qexport.cpu_rule"
TUNE_MANIFEST = "qexport-tune.json"
TUNE_DEPS = ("psutil", "cloudpickle", "xgboost")
_MAX_UNROLL_ROWS = 4


# --------------------------------------------------------------------------------------------
# target
# --------------------------------------------------------------------------------------------
def llvm_target_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Fill ``mcpu`` (the host CPU) and ``num-cores`` (``os.cpu_count()``) in an llvm target dict.

    A host ``mcpu`` comes with ``mattr`` switching off what LLVM's CPU name implies but the
    machine's flags lack (:func:`host_mattr`). An ``mcpu`` that LLVM does not know for the
    triple raises one :class:`BackendError` (LLVM would otherwise warn and silently build for
    ``generic``).
    """
    from tvm.target import codegen

    out = dict(spec)
    if not out.get("mcpu"):
        out["mcpu"] = str(codegen.llvm_get_system_cpu())
        off = host_mattr(out["mcpu"], cpu_flags())
        if off:
            out["mattr"] = [*(out.get("mattr") or ()), *off]
    triple = str(out.get("mtriple") or codegen.llvm_get_system_triple())
    if not codegen.llvm_is_valid_cpu(str(out["mcpu"]), triple):
        raise BackendError(
            f"unknown llvm mcpu {out['mcpu']!r} for {triple}",
            hint=f"leave mcpu out (host: {codegen.llvm_get_system_cpu()}) or give an LLVM CPU name",
        )
    out.setdefault("num-cores", os.cpu_count() or 1)
    return out


def host_mattr(mcpu: str, flags: set[str]) -> list[str]:
    """``-feature`` for each feature LLVM's ``mcpu`` implies that the CPU ``flags`` do not show.

    LLVM names the host CPU from its family and model; a virtual machine can report a Zen 4 and
    hide its AVX-512, and code built for the name then dies of SIGILL. Empty ``flags`` (no
    ``/proc/cpuinfo``): nothing to compare, nothing switched off.
    """
    if not flags:
        return []
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return [f"-{llvm}" for flag, llvm in LLVM_FEATURES.items()
            if flag not in flags and codegen.llvm_cpu_has_features(llvm, target)]


def is_x86(target: Any) -> bool:
    """Whether an llvm target builds for x86 (its ``mtriple``, else the host's)."""
    from tvm.target.codegen import llvm_get_system_triple

    triple = str(getattr(target, "attrs", {}).get("mtriple", "") or llvm_get_system_triple())
    return triple.startswith(("x86_64", "i686", "i386"))


def vector_bits(target: Any) -> int:
    """SIMD register width the target may use, in bits: from its features on x86 (LLVM's own
    answer is 512 even for baseline x86-64), else LLVM's (128 when it cannot tell)."""
    from tvm.target.codegen import llvm_cpu_has_features, llvm_get_vector_width

    if is_x86(target):
        if llvm_cpu_has_features("avx512f", target):
            return 512
        return 256 if llvm_cpu_has_features("avx", target) else 128
    bits = int(llvm_get_vector_width(target))
    return min(bits, 512) if bits > 0 else 128


# --------------------------------------------------------------------------------------------
# Relax rewrites (exact)
# --------------------------------------------------------------------------------------------
def _rewrite_stacked_minmax(mod: Any) -> tuple[Any, int]:
    """``min/max(stack([broadcast_to(a, s), ...], axis=0), axis=0)`` -> ``minimum/maximum(a, ...)``."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    tup = wildcard()
    stack = is_op("relax.stack")(tup)
    pattern = is_op("relax.min")(stack) | is_op("relax.max")(stack)
    count = 0
    folds = {"relax.min": relax.op.minimum, "relax.max": relax.op.maximum}

    def rewriter(expr: Any, matches: Any) -> Any:
        nonlocal count
        stacked = matches[stack]
        fields = matches[tup]
        axis = expr.attrs.axis
        if (
            not isinstance(fields, relax.Tuple)
            or len(fields.fields) < 2
            or int(stacked.attrs.axis) != 0
            or axis is None
            or [int(a) for a in axis] != [0]
            or bool(expr.attrs.keepdims)
        ):
            return expr
        args = []
        for f in fields.fields:
            if isinstance(f, relax.Call) and f.op.name == "relax.broadcast_to":
                f = f.args[0]
            args.append(f)
        fold = folds[expr.op.name]
        out = functools.reduce(fold, args)
        count += 1
        return out

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewriter, func)
    return mod, count


def _mutate_functions(mutator: Any, mod: Any, analyse: Callable[[Any], None] | None = None) -> Any:
    """Run a ``PyExprMutator`` (with a ``var2val`` attribute: each variable's bound value) over
    every Relax function of ``mod``; ``analyse(func)`` first, per function. The new module."""
    from tvm import relax

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mutator.var2val = relax.analysis.get_var2val(func)
            if analyse is not None:
                analyse(func)
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


_BROADCASTING_BINARY = frozenset({
    "relax.minimum", "relax.maximum", "relax.add", "relax.subtract", "relax.multiply",
    "relax.divide", "relax.floor_divide", "relax.right_shift", "relax.left_shift",
})


def _operand_broadcasts(mod: Any) -> tuple[Any, int]:
    """``op(broadcast_to(a, s), b)`` -> ``op(a, b)`` for an elementwise binary ``op`` whose other
    operand ``b`` already has the call's shape (and the mirror case): the same values, since the
    op broadcasts ``a`` itself. A constant ``a`` (a clamp bound, a per-channel table) then stays
    its own size instead of ``FoldConstant`` materialising it at the activation's full shape,
    which in a static build made the library ~10x larger and every such op read a full tensor
    of copies of one number."""
    import tvm_ffi
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    def shape_of(expr: Any) -> Any:
        return getattr(getattr(expr, "ty", None), "shape", None)

    @mutator
    class Strip(PyExprMutator):
        def __init__(self, module: Any) -> None:
            super().__init__(module)
            self.var2val: dict[Any, Any] = {}
            self.done = 0

        def _source(self, arg: Any) -> Any | None:
            val = self.var2val.get(arg, arg)
            if isinstance(val, relax.Call) and getattr(val.op, "name", "") == "relax.broadcast_to":
                return val.args[0]
            return None

        def visit_call_(self, op: Any) -> Any:
            call = super().visit_call_(op)
            if getattr(op.op, "name", "") not in _BROADCASTING_BINARY or len(op.args) != 2:
                return call
            out = shape_of(op)
            args = list(call.args)
            # a constant source first: a fused broadcast of a variable costs nothing, a folded
            # broadcast of a constant is the full-size tensor this rewrite avoids
            order = sorted((0, 1), key=lambda i: _const_array(self._source(op.args[i])) is None)
            for i in order:
                src, other = self._source(op.args[i]), op.args[1 - i]
                if src is None or out is None or shape_of(other) is None:
                    continue
                if not tvm_ffi.structural_equal(shape_of(other), out) or _dtype(src) != _dtype(other):
                    continue
                args[i] = self.visit_expr(src)
                self.done += 1
                return relax.Call(call.op, args, call.attrs)
            return call

    strip = Strip(mod)
    return _mutate_functions(strip, mod), strip.done


def _take_clip(mod: Any) -> tuple[Any, int]:
    """Every ``take`` in mode ``fast`` -> mode ``clip`` (same elements for in-range indices)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    data, idx = wildcard(), wildcard()
    pattern = is_op("relax.take")(data, idx)
    count = 0

    def rewriter(expr: Any, matches: Any) -> Any:
        nonlocal count
        if str(expr.attrs.mode) != "fast":
            return expr
        count += 1
        axis = expr.attrs.axis
        return relax.op.take(matches[data], matches[idx], None if axis is None else int(axis), mode="clip")

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewriter, func)
    return mod, count


def _table_formula(arr: Any) -> tuple[str, int, int] | None:
    """``("affine", a, b)`` when ``arr[i] == a * i + b``, ``("shift", c, 0)`` when
    ``arr[i] == c << i`` (``c > 0``), for a 1-D integer table; else ``None``."""
    import numpy as np

    if arr.ndim != 1 or arr.dtype.kind not in "iu" or arr.size < 2:
        return None
    wide = arr.astype(np.int64)
    idx = np.arange(wide.size, dtype=np.int64)
    a, b = int(wide[1] - wide[0]), int(wide[0])
    if bool((wide == a * idx + b).all()):
        return "affine", a, b
    c = int(wide[0])
    if c > 0 and wide.size < 63 and bool((wide == c * (np.int64(1) << idx)).all()):
        return "shift", c, 0
    return None


def _take_tables(mod: Any) -> tuple[Any, int]:
    """``take(table, i)`` (mode ``clip``) of a 1-D constant table that is a formula of ``i``
    (``a*i + b``, e.g. the ``log2`` of a shift table, or ``c << i``, the shift table itself) ->
    the formula of ``clip(i, 0, n-1)``: the same values for every index (``clip`` is how the
    take treats any index), and arithmetic vectorises where a gather does not."""
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Tables(PyExprMutator):
        def __init__(self, module: Any) -> None:
            super().__init__(module)
            self.var2val: dict[Any, Any] = {}
            self.done = 0

        def visit_call_(self, op: Any) -> Any:
            call = super().visit_call_(op)
            if getattr(op.op, "name", "") != "relax.take" or str(op.attrs.mode) != "clip":
                return call
            table = _const_array(self.var2val.get(op.args[0], op.args[0]))
            formula = None if table is None else _table_formula(table)
            idx_dtype = _dtype(op.args[1])
            if table is None or formula is None or not _is_int(idx_dtype) or op.attrs.axis not in (None, 0):
                return call
            dtype = str(table.dtype)
            if formula[0] == "affine" and abs(formula[1]) * (table.size - 1) >= 2 ** (_bits_of(dtype) - 1):
                return call  # a * i itself must not overflow
            idx = relax.op.clip(call.args[1], 0, int(table.size - 1))
            if idx_dtype != dtype:
                idx = relax.op.astype(idx, dtype)
            kind, a, b = formula
            if kind == "affine":
                out = idx
                if a != 1:
                    out = relax.op.multiply(out, relax.const(a, dtype))
                if b != 0:
                    out = relax.op.add(out, relax.const(b, dtype))
            else:
                out = relax.op.left_shift(relax.const(a, dtype), idx)
            self.done += 1
            return out

    tables = Tables(mod)
    return _mutate_functions(tables, mod), tables.done


def _const_array(expr: Any) -> Any | None:
    """The values of a Relax constant, else ``None``."""
    import numpy as np
    import tvm

    if isinstance(expr, tvm.ir.GenericConst) and hasattr(expr.value, "numpy"):
        return np.asarray(expr.value.numpy())
    return None


def _dtype(expr: Any) -> str:
    dt = getattr(getattr(expr, "ty", None), "dtype", "")
    return str(getattr(dt, "dtype", dt))


def _is_int(dtype: str) -> bool:
    return dtype.startswith(("int", "uint"))


def _bits_of(dtype: str) -> int:
    digits = "".join(ch for ch in dtype if ch.isdigit())
    return int(digits) if digits else 0


def _prim_int(expr: Any) -> int | None:
    """An integer literal argument (``IntImm`` or ``PrimValue`` of one), else ``None``."""
    val = getattr(expr, "value", None)
    val = getattr(val, "value", val)
    return int(val) if isinstance(val, int) else None


_NONNEG_ALL = frozenset(
    {"relax.add", "relax.multiply", "relax.minimum", "relax.divide", "relax.floor_divide",
     "relax.right_shift"}
)
_NONNEG_FIRST = frozenset(
    {"relax.broadcast_to", "relax.reshape", "relax.permute_dims", "relax.expand_dims", "relax.squeeze",
     "relax.take", "relax.sum", "relax.max", "relax.min"}
)


def _nonneg_bindings(func: Any) -> set[Any]:
    """The Relax variables of ``func`` whose integer values are provably >= 0.

    One forward pass over the bindings (they are in dependency order), conservative: ``abs``;
    constants with no negative element; ``add``/``multiply``/``minimum``/``divide``/
    ``right_shift`` of non-negatives; ``maximum`` with one non-negative argument; ``clip`` with a
    non-negative lower bound; ``where`` choosing between non-negatives; ``negative(negative(x))``
    of a non-negative ``x``; ``take`` from a non-negative table; ``broadcast_to``/``reshape``/
    ``permute_dims``/``expand_dims``/``squeeze`` and ``sum``/``max``/``min`` reductions of a
    non-negative; ``multiply(y, y)``; ``astype`` from a narrower
    unsigned type, or widening a non-negative. Everything else (function parameters included)
    is unknown. Wrap-around cannot break this: the integer model keeps every value in int32
    (:mod:`qexport.ops.kernels` asserts the bounds), so a sum or product of non-negatives stays
    non-negative and ``abs`` never sees INT32_MIN.
    """
    from tvm import relax

    known: set[Any] = set()
    values: dict[Any, Any] = {}

    def nonneg(expr: Any) -> bool:
        if isinstance(expr, relax.Var):
            return expr in known
        arr = _const_array(expr)
        return arr is not None and arr.dtype.kind in "iub" and bool((arr >= 0).all())

    def rule(call: Any) -> bool:
        name = getattr(call.op, "name", "")
        args = list(call.args)
        if name == "relax.abs":
            return True
        if name == "relax.multiply" and args[0].same_as(args[1]):
            return True  # a square
        if name in _NONNEG_ALL:
            return all(nonneg(a) for a in args)
        if name == "relax.maximum":
            return any(nonneg(a) for a in args)
        if name in _NONNEG_FIRST:
            return nonneg(args[0])
        if name == "relax.where":
            return nonneg(args[1]) and nonneg(args[2])
        if name == "relax.clip":
            low = _prim_int(args[1])
            return low is not None and low >= 0
        if name == "relax.negative":
            inner = values.get(args[0])
            return (
                isinstance(inner, relax.Call)
                and getattr(inner.op, "name", "") == "relax.negative"
                and nonneg(inner.args[0])
            )
        if name == "relax.astype":
            src, dst = _dtype(args[0]), _dtype(call)
            if src == "bool" or (src.startswith("uint") and _bits_of(dst) > _bits_of(src)):
                return True
            return src.startswith("int") and _bits_of(dst) >= _bits_of(src) and nonneg(args[0])
        return False

    for block in getattr(func.body, "blocks", []):
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            values[binding.var] = value
            if not isinstance(value, relax.Call) or not _is_int(_dtype(binding.var)):
                continue
            if rule(value):
                known.add(binding.var)
    return known


def _log2_exact(arr: Any) -> Any | None:
    """Element-wise log2 of an integer array whose every element is a positive power of two."""
    import numpy as np

    if arr.dtype.kind not in "iu" or arr.size == 0 or not bool((arr > 0).all()):
        return None
    wide = arr.astype(np.int64)
    if not bool(((wide & (wide - 1)) == 0).all()):
        return None
    shift = np.zeros(wide.shape, np.int64)
    rest = wide.copy()
    while bool((rest > 1).any()):
        shift += rest > 1
        rest = np.where(rest > 1, rest >> 1, rest)
    return shift.astype(arr.dtype)


def _pow2_divides_to_shifts(mod: Any) -> tuple[Any, int, int, int]:
    """``divide(x, 2^k)`` -> ``right_shift(x, k)`` for integer ``x`` provably >= 0 (exact); other
    divides with a non-constant divisor in float64 (exact, below).

    The divisor is a constant whose every element is a positive power of two (per-channel
    requantization shifts) or a ``take`` from such a constant table (the integer model's shift
    tables, e.g. LayerNorm's per-row shift): then ``take(log2(table), index)`` with the same
    index, axis and mode. Truncating division of a non-negative integer by ``2^k`` is the
    arithmetic right shift by ``k``, and a shift vectorises on x86 (``vpsravd``) where integer
    division does not.

    Every other integer divide of at most 32 bits whose divisor is not one constant (a per-row
    softmax sum, LayerNorm's per-row standard deviation, a per-channel table) becomes
    ``astype(double(x) / double(y), int)``, which vectorises (``vdivpd``) where the integer
    division runs one lane at a time. It is exact: int32 operands are exact doubles; if
    ``q = x / y`` is an integer the IEEE quotient is exactly ``q``; otherwise the truncation
    ``k`` of ``q`` and the next integer towards infinity are at least ``1/|y|`` away from ``q``
    while the rounding error is at most ``|q| * 2^-53 <= |x| * 2^-53 < 1/|y|`` for
    ``|x| < 2^53``, and integers are doubles, so the rounded quotient stays strictly between them
    and the cast (which truncates) gives ``k``. Divisors of zero never reach a divide (the integer
    model clamps them to >= 1, which TVM needs anyway: an integer division by zero is SIGFPE).
    A single constant divisor stays an integer divide (LLVM multiplies by a magic number,
    vectorised). Returns the module and the divides rewritten to shifts, to float64, and left.
    """
    import numpy as np
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Shifts(PyExprMutator):
        def __init__(self, module: Any) -> None:
            super().__init__(module)
            self.var2val: dict[Any, Any] = {}
            self.nonneg: set[Any] = set()
            self.done = 0
            self.floats = 0
            self.left = 0

        def visit_call_(self, op: Any) -> Any:
            call = super().visit_call_(op)
            if getattr(op.op, "name", "") != "relax.divide" or not _is_int(_dtype(op)):
                return call
            shift = self._shift(op) if op.args[0] in self.nonneg else None
            if shift is None:
                as_float = self._float_divide(op, call)
                if as_float is not None:
                    self.floats += 1
                    return as_float
                self.left += 1
                return call
            self.done += 1
            return relax.op.right_shift(call.args[0], shift)

        def _float_divide(self, op: Any, call: Any) -> Any | None:
            """``x / y`` (int32 or narrower, truncating, ``y`` not one constant) as
            ``int(double(x) / double(y))``: exact (see :func:`_pow2_divides_to_shifts`)."""
            dtype = _dtype(op)
            if _bits_of(dtype) > 32 or _dtype(op.args[1]) != dtype:
                return None
            den = self.var2val.get(op.args[1], op.args[1])
            arr = _const_array(den)
            if arr is not None and (arr.size == 1 or bool((arr == arr.flat[0]).all())):
                return None  # one constant divisor: LLVM's multiply-by-magic-number, vectorised
            num = relax.op.astype(call.args[0], "float64")
            den_f = relax.op.astype(call.args[1], "float64")
            return relax.op.astype(relax.op.divide(num, den_f), dtype)

        def _shift(self, op: Any) -> Any | None:
            den = op.args[1]
            den = self.var2val.get(den, den)
            dtype = _dtype(op)
            arr = _const_array(den)
            if arr is not None:
                log = _log2_exact(arr)
                return None if log is None or str(log.dtype) != dtype else relax.const(log, dtype)
            if isinstance(den, relax.Call) and getattr(den.op, "name", "") == "relax.take":
                table = _const_array(self.var2val.get(den.args[0], den.args[0]))
                log = None if table is None else _log2_exact(table)
                if log is None or str(log.dtype) != dtype:
                    return None
                axis = den.attrs.axis
                return relax.op.take(
                    relax.const(np.ascontiguousarray(log), dtype),
                    self.visit_expr(den.args[1]),
                    None if axis is None else int(axis),
                    mode=str(den.attrs.mode),
                )
            return None

    shifts = Shifts(mod)

    def analyse(func: Any) -> None:
        shifts.nonneg = _nonneg_bindings(func)

    return _mutate_functions(shifts, mod, analyse), shifts.done, shifts.floats, shifts.left


def gemm_module() -> Any | None:
    """:mod:`qexport.backends.tvm_gemm` when it is installed with this package, else ``None``."""
    if importlib.util.find_spec("qexport.backends.tvm_gemm") is None:
        return None
    return importlib.import_module("qexport.backends.tvm_gemm")


# --------------------------------------------------------------------------------------------
# schedule rules
# --------------------------------------------------------------------------------------------
def _extent(sch: Any, loop: Any) -> int | None:
    from tvm import tirx

    ext = sch.get(loop).extent
    return int(ext.value) if isinstance(ext, tirx.IntImm) else None


def _lanes(extent: int | None, max_lanes: int) -> int:
    """Largest power-of-two lane count <= max_lanes dividing a static extent (0: do not vectorise)."""
    if extent is None:
        return 0
    lanes = max_lanes
    while lanes >= 2:
        if extent % lanes == 0:
            return lanes
        lanes //= 2
    return 0


def _dtype_bits(sch: Any, block: Any) -> int:
    stmt = sch.get(block)
    bits = [int(w.source.dtype.bits) for w in stmt.writes] or [32]
    return max(bits)


def _divides_at_runtime(sch: Any, block: Any) -> bool:
    """Whether ``block`` divides by a value that is not a constant.

    x86 has no vector integer division: LLVM splits such a vector into one scalar division per
    lane, and long integer chains (i-GELU, i-exp) then take minutes to compile for no speed.
    """
    import tvm_ffi
    from tvm import tirx

    found = False

    def visit(node: Any) -> None:
        nonlocal found
        if not isinstance(node.b, (tirx.IntImm, tirx.FloatImm)) and "int" in str(node.ty):
            found = True

    stmt = sch.get(block)
    tvm_ffi.structural_walk(
        stmt.body, [(cls, visit) for cls in (tirx.Div, tirx.FloorDiv, tirx.FloorMod, tirx.Mod)], order="post"
    )
    return found


def _vectorize_inner(sch: Any, block: Any, vbits: int) -> bool:
    """Vectorise the innermost spatial loop of ``block`` (split to the vector width)."""
    loops = sch.get_loops(block)
    if not loops or _divides_at_runtime(sch, block):
        return False
    inner = loops[-1]
    if _iter_kinds(sch, block)[-1:] != ["S"]:
        return False
    lanes = _lanes(_extent(sch, inner), max(vbits // _dtype_bits(sch, block), 2))
    if lanes == 0:
        return False
    ext = _extent(sch, inner)
    if ext is not None and ext > lanes:
        _, inner = sch.split(inner, factors=[None, lanes])
    sch.vectorize(inner)
    return True


def _iter_kinds(sch: Any, block: Any) -> list[str]:
    """Per loop of ``block``: ``S`` (spatial), ``R`` (reduction) or ``O`` (both)."""
    from tvm import tirx

    stmt = sch.get(block)
    loop_vars = [sch.get(lp).loop_var for lp in sch.get_loops(block)]
    bindings = _block_bindings(sch, stmt.name_hint)
    kinds = []
    for var in loop_vars:
        kind = None
        for iv, value in zip(stmt.iter_vars, bindings, strict=False):
            if any(v.same_as(var) for v in _vars_of(value)):
                k = "S" if iv.iter_type == tirx.IterVar.DataPar else "R"
                kind = k if kind in (None, k) else "O"
        kinds.append(kind or "S")
    return kinds


def _vars_of(expr: Any) -> list[Any]:
    import tvm_ffi
    from tvm import tirx

    found: list[Any] = [expr] if isinstance(expr, tirx.Var) else []
    tvm_ffi.structural_walk(expr, [(tirx.Var, found.append)], order="post")
    return found


def _block_bindings(sch: Any, name: str) -> list[Any]:
    import tvm_ffi
    from tvm.s_tir import SBlockRealize

    found: list[Any] = []

    def visit(node: Any) -> None:
        if node.block.name_hint == name and not found:
            found.extend(node.iter_values)

    tvm_ffi.structural_walk(sch.mod["main"].body, [(SBlockRealize, visit)], order="post")
    return found


def _leading_spatial(kinds: list[str]) -> int:
    n = 0
    for k in kinds:
        if k != "S":
            break
        n += 1
    return n


_INLINE_MAX_NODES = 24


def _expr_nodes(stmt: Any) -> int:
    import tvm_ffi
    from tvm.ir.expr import Expr as PrimExpr

    n = 0

    def visit(_node: Any) -> None:
        nonlocal n
        n += 1

    tvm_ffi.structural_walk(stmt, [(PrimExpr, visit)], order="post")
    return n


def _loads_of(sch: Any, buffer: Any) -> int:
    """How many ``BufferLoad`` of ``buffer`` the function holds (reads that inlining would copy)."""
    import tvm_ffi
    from tvm.ir.expr import TensorLoad

    n = 0

    def visit(node: Any) -> None:
        nonlocal n
        if node.source.same_as(buffer):
            n += 1

    tvm_ffi.structural_walk(sch.mod["main"].body, [(TensorLoad, visit)], order="post")
    return n


def _reverse_inline_ok(sch: Any, block: Any) -> bool:
    """Reverse-inlining ``block`` copies no expression: it reads each input at one place."""
    return all(_loads_of(sch, r.source) <= 1 for r in sch.get(block).reads)


def _inline_all(sch: Any, infos: list[Any]) -> list[Any]:
    """dlight's ``try_inline``, minus inlinings that would copy a large expression.

    Inlining a block whose value is read several times copies its expression at each read; the
    integer chains (i-GELU, i-exp: ``abs``, ``sign``, the value itself...) then grow
    exponentially and LLVM takes minutes on them. Such a block stays, computed under the
    consumer's parallel loop by the rules below.
    """
    blocks = list(infos)

    def cheap(block: Any) -> bool:
        stmt = sch.get(block)
        if len(stmt.writes) != 1:
            return False
        return _expr_nodes(stmt.body) <= _INLINE_MAX_NODES or _loads_of(sch, stmt.writes[0].source) <= 1

    def reverse_cheap(block: Any) -> bool:
        return _reverse_inline_ok(sch, block)

    changed = True
    while changed:
        changed = False
        for i, info in enumerate(blocks):
            if not cheap(info.block_rv):
                continue
            try:
                sch.compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - not inlinable (output block, reduction)
                continue
            blocks.pop(i)
            changed = True
            break
        if changed:
            continue
        for i, info in enumerate(blocks):
            if not reverse_cheap(info.block_rv):
                continue
            try:
                sch.reverse_compute_inline(info.block_rv)
            except Exception:  # noqa: BLE001 - not inlinable
                continue
            blocks.pop(i)
            changed = True
            break
    return blocks


def _normalize(sch: Any) -> list[Any] | None:
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    try:
        return normalize_prim_func(sch)
    except Exception:  # noqa: BLE001 - not analysable: the next rule decides
        return None


def _rule_matmul(func: Any, vbits: int) -> Any | None:
    """Matmul (batch dims, i, j, k): tile 4 x lanes, parallel over batch x row tiles."""
    from tvm import s_tir
    from tvm.s_tir.dlight.gpu.matmul import get_index_map

    sch = s_tir.Schedule(func)
    infos = _normalize(sch)
    if infos is None:
        return None
    reds = [b for b in infos if not b.is_injective()]
    if len(reds) != 1:
        return None
    main = reds[0].block_rv
    stmt = sch.get(main)
    if len(stmt.reads) != 2 or get_index_map(stmt) is None:
        return None
    main_name = stmt.name_hint
    # cheap producers (casts, transposes) into the matmul, cheap epilogue blocks into each other
    _inline_all(sch, infos)
    main = sch.get_sblock(main_name)
    kinds = _iter_kinds(sch, main)
    loops = sch.get_loops(main)
    s_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
    r_loops = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
    if len(r_loops) != 1 or len(s_loops) < 2 or len(s_loops) + 1 != len(loops):
        return None
    sch.reorder(*s_loops, *r_loops)
    *batch, i, j = s_loops
    (k,) = r_loops
    out_bits = int(sch.get(main).writes[0].source.dtype.bits)
    lanes = _lanes(_extent(sch, j), max(vbits // out_bits, 2))
    i_ext = _extent(sch, i)
    rows = _MAX_UNROLL_ROWS if i_ext is None or i_ext >= _MAX_UNROLL_ROWS else 1
    io, ii = sch.split(i, factors=[None, rows])
    if lanes:
        jo, ji = sch.split(j, factors=[None, lanes])
    else:
        jo, ji = sch.split(j, factors=[None, 1])
    sch.reorder(*batch, io, jo, k, ii, ji)
    outer = sch.fuse(*batch, io) if batch else io
    sch.parallel(outer)
    local = sch.cache_write(main, 0, "local")
    local_name = sch.get(local).name_hint
    # epilogue consumers (bias add, requantisation, casts) go into the tile's write-back
    rest: list[str] = []
    for blk in sch.get_child_blocks(_root(sch)):
        name = sch.get(blk).name_hint
        if name in (main_name, local_name):
            continue
        if not rest and _reverse_inline_ok(sch, sch.get_sblock(name)):
            try:
                sch.reverse_compute_inline(sch.get_sblock(name))
                continue
            except Exception:  # noqa: BLE001 - a consumer that cannot be inlined is scheduled alone
                pass
        rest.append(name)
    local = sch.get_sblock(local_name)
    sch.reverse_compute_at(local, jo, preserve_unit_loops=True)
    if lanes:
        sch.vectorize(ji)
        if not _divides_at_runtime(sch, local):
            sch.vectorize(sch.get_loops(local)[-1])
    init = sch.decompose_reduction(main, k)
    if lanes:
        sch.vectorize(sch.get_loops(init)[-1])
    for name in rest:  # epilogue blocks that stay: per row tile, under the parallel loop
        blk = sch.get_sblock(name)
        try:
            sch.reverse_compute_at(blk, outer, preserve_unit_loops=True)
            _vectorize_inner(sch, blk, vbits)
        except Exception:  # noqa: BLE001 - not computable per tile: a parallel loop of its own
            _parallel_outer(sch, blk, vbits)
    sch.unroll(ii)
    return sch


def _root(sch: Any) -> Any:
    from tvm.s_tir.dlight.analysis import get_root_block

    return get_root_block(sch)


def _parallel_outer(sch: Any, block: Any, vbits: int) -> bool:
    """Fuse the leading spatial loops of a root-level block and run them in parallel."""
    kinds = _iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if not loops or any(sch.get(lp).kind != 0 for lp in loops):
        return False
    n = _leading_spatial(kinds)
    if n == 0:
        return False
    vec = n == len(loops) and _vectorize_inner(sch, block, vbits)
    loops = sch.get_loops(block)
    lead = loops[: n - 1] if vec and n >= 2 else loops[:n] if not vec else []
    if vec and n == 1:
        lead = [loops[0]] if len(loops) > 1 else []
    if not vec and n == len(loops) and n >= 2 and _extent(sch, loops[-1]) is None:
        # a symbolic innermost extent (a dynamic sequence axis): keep it an inner loop of its
        # own, with plain index arithmetic LLVM can vectorise, instead of fusing it into the
        # parallel loop (one 64-bit division per index per element)
        lead = loops[: n - 1]
    if not lead:
        return vec
    sch.parallel(sch.fuse(*lead) if len(lead) > 1 else lead[0])
    return True


def _rule_elementwise(func: Any, vbits: int) -> Any | None:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    infos = _normalize(sch)
    if infos is None or not all(b.is_injective() for b in infos):
        return None
    infos = _inline_all(sch, infos)
    blk = infos[-1].block_rv
    if not sch.get_loops(blk):
        return None
    if len(infos) == 1:
        _parallel_outer(sch, blk, vbits)
        return sch
    return _chain(sch, [b.block_rv for b in infos], vbits)


def _chain(sch: Any, blocks: list[Any], vbits: int) -> Any | None:
    """Blocks that stay separate: parallel over the last block's leading spatial loops (rows),
    the others computed per row under that loop, injective blocks vectorised."""
    kinds = [_iter_kinds(sch, b) for b in blocks]
    if any("O" in k for k in kinds):
        return None
    lead = min(_leading_spatial(k) for k in kinds)
    last = blocks[-1]
    n_last = len(sch.get_loops(last))
    if "R" not in kinds[-1] and n_last >= 2:
        lead = min(lead, n_last - 1)
    if lead == 0:
        return None
    outer = sch.get_loops(last)[:lead]
    spatial = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(spatial)
    for blk in reversed(blocks[:-1]):
        sch.compute_at(blk, spatial, preserve_unit_loops=True)
    for blk, k in zip(blocks, kinds, strict=True):
        if "R" not in k:
            _vectorize_inner(sch, blk, vbits)
    return sch


def _rule_reduction(func: Any, vbits: int) -> Any | None:
    """Row reductions (softmax, LayerNorm, i-exp chains, Min/Max folds): parallel rows."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    infos = _normalize(sch)
    if infos is None or all(b.is_injective() for b in infos):
        return None
    infos = _inline_all(sch, infos)
    blocks = [b.block_rv for b in infos]
    kinds = [_iter_kinds(sch, b) for b in blocks]
    if any("O" in k for k in kinds):
        return None
    lead = min(_leading_spatial(k) for k in kinds)
    if lead == 0:
        return None
    last = blocks[-1]
    if len(blocks) == 1:
        loops = sch.get_loops(last)
        s = [lp for lp, k in zip(loops, kinds[0], strict=True) if k == "S"]
        r = [lp for lp, k in zip(loops, kinds[0], strict=True) if k == "R"]
        r_ext = [_extent(sch, lp) for lp in r]
        if len(s) >= 2 and all(e is not None and e <= 8 for e in r_ext):
            # short fold: reduce outside the innermost spatial loop, vectorise that loop
            sch.reorder(*s[:-1], *r, s[-1])
            outer = s[:-1]
            sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
            if _vectorize_inner(sch, last, vbits):
                init = sch.decompose_reduction(last, r[0])
                _vectorize_inner(sch, init, vbits)
            return sch
        sch.reorder(*s, *r)
        outer = s[: lead]
        sch.parallel(sch.fuse(*outer) if len(outer) > 1 else outer[0])
        return sch
    try:
        return _chain(sch, blocks, vbits)
    except Exception:  # noqa: BLE001 - an output block in the middle (a merged row group)
        pass
    sch = s_tir.Schedule(func)
    infos = _normalize(sch)
    if infos is None:
        return None
    blocks = [b.block_rv for b in _inline_all(sch, infos)]
    return _chain_forward(sch, blocks, vbits)


def _chain_forward(sch: Any, blocks: list[Any], vbits: int) -> Any | None:
    """A row group (:mod:`qexport.backends.tvm_rows`) with outputs in the middle, which
    ``compute_at`` cannot move: parallel over the FIRST block's row loops, every later block
    computed under them in order (``reverse_compute_at`` moves output blocks too)."""
    kinds = [_iter_kinds(sch, b) for b in blocks]
    if any("O" in k for k in kinds):
        return None
    lead = min(_leading_spatial(k) for k in kinds)
    for k in kinds:
        if "R" not in k:
            lead = min(lead, max(len(k) - 1, 1))
    if lead == 0:
        return None
    outer = sch.get_loops(blocks[0])[:lead]
    extents = [_extent(sch, lp) for lp in outer]
    for blk in blocks[1:]:
        loops = sch.get_loops(blk)[:lead]
        if [_extent(sch, lp) for lp in loops] != extents:
            return None
    spatial = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    sch.parallel(spatial)
    for blk in blocks[1:]:
        sch.reverse_compute_at(blk, spatial, preserve_unit_loops=True)
    for blk, k in zip(blocks, kinds, strict=True):
        if "R" not in k:
            _vectorize_inner(sch, blk, vbits)
    return sch


def _rule_fallback(func: Any, vbits: int) -> Any | None:
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    infos = _normalize(sch)
    if infos is None:
        blocks = sch.get_child_blocks(_root(sch))
    else:
        blocks = [b.block_rv for b in _inline_all(sch, infos)]
    done = False
    for blk in blocks:
        try:
            done = _parallel_outer(sch, blk, vbits) or done
        except Exception:  # noqa: BLE001 - leave this block serial
            continue
    return sch if done else None


RULES: tuple[tuple[str, Callable[[Any, int], Any | None]], ...] = (
    ("matmul", _rule_matmul),
    ("elementwise", _rule_elementwise),
    ("reduction", _rule_reduction),
    ("fallback", _rule_fallback),
)


def schedule_func(func: Any, vbits: int) -> tuple[Any, str]:
    """The first rule of :data:`RULES` that schedules ``func``; ``(func, "unscheduled")`` if none."""
    for name, rule in RULES:
        try:
            sch = rule(func, vbits)
        except Exception:  # noqa: BLE001 - a rule that fails to apply: try the next one
            sch = None
        if sch is not None:
            return sch.mod["main"], name
    return func, "unscheduled"


def schedule_pass(target: Any, counts: collections.Counter[str]) -> Any:
    """Module pass: schedule every PrimFunc not yet scheduled; rule counts land in ``counts``."""
    import tvm

    vbits = vector_bits(target)

    @tvm.transform.module_pass(opt_level=0, name="qexport.ScheduleCPU")
    def _schedule(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            attrs = func.attrs or {}
            if SCHEDULED_ATTR in attrs and bool(attrs[SCHEDULED_ATTR]):
                counts["int8_gemm"] += 1
                continue
            if "tirx.is_scheduled" in attrs and bool(attrs["tirx.is_scheduled"]):
                counts["tuned"] += 1
                continue
            new, rule = schedule_func(func, vbits)
            counts[rule] += 1
            if rule != "unscheduled":
                mod[gv] = new.with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule)
        return mod

    return _schedule


# --------------------------------------------------------------------------------------------
# pipeline
# --------------------------------------------------------------------------------------------
class BuildInfo:
    """What the pipeline did, for the sidecar."""

    def __init__(self) -> None:
        self.rules: collections.Counter[str] = collections.Counter()
        self.rewrites: dict[str, int] = {}
        self.gemm: list[dict[str, Any]] = []
        self.gemm_available = False
        self.gemm_summary = ""
        self.epilogues = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "cpu_schedules": dict(sorted(self.rules.items())),
            "relax_rewrites": dict(self.rewrites),
            "int8_gemm_kernels": self.gemm,
            "int8_gemm_module": self.gemm_available,
            "int8_gemm_epilogues": self.epilogues,
        }


def prepare(mod: Any, target: Any, info: BuildInfo, features: frozenset[str]) -> Any:
    """Relax rewrites before legalization (see the module docstring); exact."""
    mod, info.rewrites["minmax_stack"] = _rewrite_stacked_minmax(mod)
    mod, info.rewrites["take_clip"] = _take_clip(mod)
    mod, info.rewrites["operand_broadcasts"] = _operand_broadcasts(mod)
    mod, done, floats, left = _pow2_divides_to_shifts(mod)
    info.rewrites.update(pow2_divides_to_shifts=done, divides_in_float64=floats, divides_left=left)
    mod, info.rewrites["take_tables"] = _take_tables(mod)
    gemm = gemm_module()
    info.gemm_available = gemm is not None
    if gemm is not None:
        mod, records = gemm.lower_int8_matmuls(mod, target, features)
        info.gemm = [dict(r) for r in records]
        if any("skipped" not in r for r in info.gemm):
            summarize = getattr(gemm, "summarize", None)
            info.gemm_summary = str(summarize(info.gemm)) if summarize else f"{len(info.gemm)} kernels"
    return mod


def fused(mod: Any, target: Any, info: BuildInfo | None = None) -> Any:
    """Legalize, annotate, fold and fuse: the module MetaSchedule tunes and the rules schedule.
    With ``info`` (a scheduled build; its sidecar counts them) the row groups of
    :mod:`qexport.backends.tvm_rows` are merged too, unless ``QEXPORT_TVM_ROWS=0``."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    with target:
        seq = tvm.transform.Sequential(
            cpu.library_dispatch_passes(target)
            + [
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
            ]
        )
        mod = seq(mod)
        if info is not None and os.environ.get("QEXPORT_TVM_ROWS", "1") != "0":
            from qexport.backends import tvm_rows

            mod, info.rewrites["row_groups"] = tvm_rows.merge_row_groups(mod)
        return relax.transform.FuseTIR()(mod)


def epilogue_pass(info: BuildInfo) -> Any:
    """Module pass: each int8 GEMM's elementwise consumer into its epilogue
    (:mod:`qexport.backends.tvm_epilogue`); the summary lands in ``info``."""
    import tvm

    from qexport.backends import tvm_epilogue

    @tvm.transform.module_pass(opt_level=0, name="qexport.GemmEpilogues")
    def _fuse(mod: Any, _ctx: Any) -> Any:
        mod, records = tvm_epilogue.fuse_epilogues(mod)
        info.epilogues = tvm_epilogue.summarize(records) if records else ""
        return mod

    return _fuse


def cpu_pipeline(target: Any, info: BuildInfo, *, schedule: bool = True, database: Any | None = None) -> Any:
    """The Relax pipeline for ``tvm.compile(mod, target, relax_pipeline=...)`` on an already
    :func:`prepare`-d and :func:`fused` module: (tuned records) -> rules -> lowering."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    @tvm.transform.module_pass(opt_level=0, name="qexport.CPUPipeline")
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        passes: list[Any] = []
        if schedule and info.gemm_summary and os.environ.get("QEXPORT_TVM_EPILOGUES", "1") != "0":
            passes.append(epilogue_pass(info))
        if database is not None:
            passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
        if schedule:
            passes.append(schedule_pass(target, info.rules))
        passes += cpu.dataflow_lower_passes(target) + cpu.finalize_passes(target)
        with target:
            if database is not None:
                with database:
                    return tvm.transform.Sequential(passes)(mod)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline


# --------------------------------------------------------------------------------------------
# MetaSchedule
# --------------------------------------------------------------------------------------------
def tune_key(target: Any, shapes: Mapping[str, int] | None) -> dict[str, Any]:
    """What a tuning database is valid for: the target (CPU, features, cores) and the static shapes."""
    return {"target": str(target), "shapes": dict(shapes) if shapes else None}


def check_tune_deps() -> None:
    missing = [m for m in TUNE_DEPS if importlib.util.find_spec(m) is None]
    if missing:
        raise BackendError(
            f"MetaSchedule tuning needs {', '.join(missing)} (not installed)",
            hint=f"pip install {' '.join(missing)}",
        )


def open_database(db_dir: Path, key: Mapping[str, Any], *, create: bool) -> Any | None:
    """The JSON database in ``db_dir`` for ``key``; ``None`` when absent and not ``create``.

    A database recorded for another target, other shapes or another model raises
    :class:`BackendError` (its schedules would not match; we never mix them in silently).
    """
    from tvm.s_tir import meta_schedule as ms

    manifest = db_dir / TUNE_MANIFEST
    if manifest.is_file():
        have = json.loads(manifest.read_text())
        diff = [k for k in ("target", "shapes") if have.get(k) != key.get(k)]
        if diff:
            raise BackendError(
                f"tuning database {db_dir} was made for another {'/'.join(diff)} "
                f"({', '.join(f'{k}={have.get(k)!r}' for k in diff)})",
                hint="give another --tune-db directory, or retune",
            )
    elif not create:
        if db_dir.exists() and any(db_dir.iterdir()):
            raise BackendError(f"{db_dir} is not a qexport tuning database (no {TUNE_MANIFEST})")
        return None
    db_dir.mkdir(parents=True, exist_ok=True)
    if not manifest.is_file():
        from qexport.io import atomic_write_json

        atomic_write_json(manifest, dict(key))
    return ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        allow_missing=True,
    )


def tune(mod: Any, target: Any, db_dir: Path, trials: int, key: Mapping[str, Any]) -> Any:
    """MetaSchedule-tune the fused module's PrimFuncs (``trials`` in total) into ``db_dir``.

    The kernels :mod:`qexport.backends.tvm_gemm` already scheduled are not tuning tasks (no
    record is made for them, so applying the database leaves them as they are).
    """
    check_tune_deps()
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule import relax_integration as ri

    database = open_database(db_dir, key, create=True)
    work = db_dir / "logs"
    work.mkdir(parents=True, exist_ok=True)
    extracted = [
        t for t in ri.extract_tasks(mod, target)
        if not any(_is_marked(f) for f in t.dispatched[0].functions.values())
    ]
    if not extracted:
        return database
    contexts, weights = ri.extracted_tasks_to_tune_contexts(extracted, str(work))
    ms.tune.tune_tasks(
        tasks=contexts,
        task_weights=weights,
        work_dir=str(work),
        max_trials_global=trials,
        max_trials_per_task=max(trials // max(len(contexts), 1), 1),
        num_trials_per_iter=min(64, trials),
        database=database,
    )
    return database


def _is_marked(func: Any) -> bool:
    attrs = getattr(func, "attrs", None) or {}
    return SCHEDULED_ATTR in attrs and bool(attrs[SCHEDULED_ATTR])

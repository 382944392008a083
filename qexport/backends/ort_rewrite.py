"""Load-time rewrites of qexport's integer ONNX for ONNX Runtime on CPU: the same integers, faster.

The exported ``.onnx`` stays the portable spec form (standard ops, ``qexport`` functions whose
bodies any runtime can run). When the ORT backend loads a model, :func:`rewrite_for_ort` builds an
equivalent graph in memory that ORT's CPU kernels run faster; the file is never changed. ORT runs
every node as its own kernel (no elementwise fusion on CPU), its integer ``Div``, ``ReduceSum`` and
``Gather`` are slow (~0.7, ~0.7 and ~8 ns per element against ~0.15 for ``Add``), and MLAS has no
fast s8 x s8 GEMM: the spec form spends its time in long int32 chains and a scalar matmul loop.

Every rewrite is exact -- the same ``logits_int``, bit for bit, for every input -- and anything a
rewrite does not recognise is kept as it was (a ``qexport`` call keeps its FunctionProto). Tables
are computed by running the reference kernels (:mod:`qexport.ops.kernels`) over every input of
their domain; the other rewrites are the function bodies minus steps proven to be no-ops, or
replacements whose exactness is argued where they are made:

``lut``
    An elementwise function whose input takes few values -- ``Requant`` with per-tensor constants
    on a bounded input (embeddings, residual branches, attention context), ``IGelu`` and ``ITanh``
    (inputs clamped to 16 bits) -- is one ``GatherElements`` from a table; a function applied to a
    table's output folds into the table (i-GELU and its requantization: one int8 table). The
    domain is the input's proven range, or the function's own clamp (``Requant``: ``|q| <= bound``;
    ``IGelu``/``ITanh``: ``|q| <= in_max``) applied by a ``Clip``. Negative values index from the
    table's back (``GatherElements`` allows ``-n <= i < 0``), so the index is the value itself.
``requant``
    ``Requant`` with per-channel constants (the linears' accumulators): the body without the
    clamp when the input range is below ``bound``, without ``min(., qmax)`` when ``bound``
    already lands on ``qmax``, with the pre-shift ``(a + 2**(p-1)) >> p`` in float32 when every
    ``bound < 2**24`` (integers and power-of-two scalings below ``2**24`` are exact in float32).
``softmax``
    ``ISoftmax``: ``i-exp(q - max q)`` is a table indexed by ``min(max q - q, N0)`` (``N0``: where
    i-exp is 0 for good, proven from its constants); the exporter's arithmetic attention mask
    ``s * keep + (keep - 1) * F`` becomes ``Min(s, keep * 2F - F)`` when ``|s| <= F`` is proven,
    which also proves the softmax clamp a no-op.
``layernorm``
    ``ILayerNorm`` over the rows: ``ISqrt`` (a Newton iteration) as ``floor(sqrt(float64(n)))``
    (float64 holds ``n < 2**31`` exactly and its correctly rounded root is within ``2**-37`` of
    ``sqrt(n)``, while a non-square ``n`` lies at least ``2**-17`` below the next integer root);
    the per-row shift ``2**k`` from a table over ``max|y| >> keep``; row sums in float32 chunks
    whose partial sums stay below ``2**24`` (exact in any order), the chunk sums in int32.
``matmul``
    ``MatMulInteger`` (integer form) and ``DequantizeLinear -> MatMul -> Cast`` (QDQ form) become
    ``MatMulInteger`` on uint8 -- the activation shifted by 128, zero point 128 -- times int8
    whenever MLAS's u8 x s8 kernel is exact for the operands, else times uint8 (shifted too):

    * u8 x u8 is exact on every x86 kernel (16-bit products, or VNNI dot products into int32);
    * u8 x s8 is exact where the CPU accumulates 4 products straight into int32 (AVX512-VNNI,
      AVX-VNNI, AMX: :func:`exact_int8_gemms` checks it once per process with a probe whose
      every int16 pair sum would saturate on AVX2's ``vpmaddubsw``), and on AVX2 whenever
      ``2 * max(a) * max|b| <= 32767`` (4- and 2-bit weights, probabilities in ``[0, 127]``).

    Linears that share their input and are each requantized (Q, K, V) run as one GEMM over the
    concatenated weights, one bias ``Add``, one ``Requant`` and a ``Split`` (columns, biases and
    per-channel requantization are independent). The QDQ form's float MatMul is exact only below
    ``2**24``; MatMulInteger is exact always, so the rewritten graph equals the integer reference
    even where the QDQ file would not.
``bytes``
    ``Reshape``/``Transpose`` between a producer and a matmul move the 1-byte operand instead of
    int32 (the conversion runs before the layout op, which commutes with it).

The value-range analysis these rewrites rely on (every "proven range" below) is
:class:`qexport.backends.ort_ranges.GraphFacts`; the functions' constants are read back with
:func:`qexport.export.constants.from_onnx_inputs`.

The int8 conversions are modular, as ``Cast``: ``uint8(v + 128) == int8(v) xor 0x80`` for every
int32 ``v``. ``QEXPORT_ORT_REWRITE=0`` switches everything off, a comma list (``matmul,lut``)
keeps only the rewrites named; ``QEXPORT_ORT_U8S8=bounded`` forces the AVX2 rule (``full``: trust
u8 x s8 for any operands).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from qexport.backends.ort_ranges import LAYOUT_OPS, GraphFacts, requant_schedule
from qexport.export.constants import from_onnx_inputs
from qexport.export.functions import DOMAIN
from qexport.export.onnx_utils import INT_BOUNDS, INT_TYPES, NP_OF, Range, attr
from qexport.ops import kernels as K

REWRITES = ("lut", "requant", "softmax", "layernorm", "matmul", "bytes")
#: Largest table a ``lut`` rewrite builds (entries); i-GELU's 16-bit domain is 65,535.
LUT_MAX = 1 << 17
#: ``vpmaddubsw`` (AVX2 u8 x s8) saturates a pair sum ``a0 b0 + a1 b1`` at this magnitude.
INT16_MAX = 2**15 - 1

@dataclass(frozen=True)
class RewriteOptions:
    """Which rewrites run (see the module docstring) and the matmul policy.

    ``u8s8``: ``auto`` (probe the CPU once), ``full`` (trust u8 x s8 for any operands) or
    ``bounded`` (only where no AVX2 int16 pair sum can saturate).
    """

    enabled: frozenset[str] = frozenset(REWRITES)
    lut_max: int = LUT_MAX
    u8s8: str = "auto"

    @classmethod
    def from_env(cls) -> RewriteOptions | None:
        """``QEXPORT_ORT_REWRITE`` (``0``/``off``: none; ``a,b``: only those) and ``QEXPORT_ORT_U8S8``."""
        spec = os.environ.get("QEXPORT_ORT_REWRITE", "").strip().lower()
        if spec in ("0", "off", "none", "false", "no"):
            return None
        opts = cls(u8s8=os.environ.get("QEXPORT_ORT_U8S8", "auto").strip().lower() or "auto")
        if spec and spec not in ("1", "on", "all", "true", "yes"):
            names = frozenset(s.strip() for s in spec.split(",") if s.strip())
            unknown = names - set(REWRITES)
            if unknown:
                raise ValueError(f"QEXPORT_ORT_REWRITE: unknown rewrites {sorted(unknown)}; "
                                 f"known: {', '.join(REWRITES)}")
            opts = replace(opts, enabled=names)
        return opts


@dataclass
class RewriteReport:
    """What :func:`rewrite_for_ort` did: rewrites applied (by kind) and function calls kept."""

    applied: Counter[str] = field(default_factory=Counter)
    kept: Counter[str] = field(default_factory=Counter)
    u8s8_full: bool = False

    def summary(self) -> str:
        done = ", ".join(f"{k} x{v}" for k, v in sorted(self.applied.items())) or "none"
        kept = ", ".join(f"{k} x{v}" for k, v in sorted(self.kept.items()))
        return f"rewrites: {done}" + (f"; kept as functions: {kept}" if kept else "")


# --------------------------------------------------------------------------- the u8 x s8 probe


@functools.lru_cache(maxsize=1)
def exact_int8_gemms() -> frozenset[str]:
    """Which of this CPU's ORT ``MatMulInteger`` kernels are exact for all operands: a subset of
    ``{"u8s8", "u8u8"}``.

    AVX2's u8 x s8 kernel adds two products into a saturating int16 (``vpmaddubsw``: 255 * -128 * 2
    = -65280 saturates to -32768); VNNI / AMX / NEON dot products accumulate into int32 and are
    exact; u8 x u8 kernels widen to 16 bits (or use VNNI) and are exact everywhere MLAS runs. The
    probe makes every pair sum as large as it gets -- for one row (MLAS's GEMV path) and for many
    (its GEMM path), with the weights constant (prepacked) and as an input, with K not a multiple
    of the kernel's step -- and a kind is exact only if every product matches.
    """
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    exact = set()
    for kind, b_type, b_fill in (("u8s8", np.int8, -128), ("u8u8", np.uint8, 255)):
        ok = True
        for m, k, n in ((1, 37, 19), (9, 64, 33), (33, 259, 17)):
            a = np.full((m, k), 255, np.uint8)
            a[:, ::5] = rng.integers(200, 256, a[:, ::5].shape)
            b = np.full((k, n), b_fill, b_type)
            b[1::7] = 127
            ref = a.astype(np.int64) @ b.astype(np.int64)
            for const_b in (True, False):
                elem = TensorProto.INT8 if b_type == np.int8 else TensorProto.UINT8
                inits = [numpy_helper.from_array(b, "b")] if const_b else []
                ins = [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])]
                if not const_b:
                    ins.append(helper.make_tensor_value_info("b", elem, [k, n]))
                g = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "probe", ins,
                                      [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])], inits)
                model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
                feeds = {"a": a} if const_b else {"a": a, "b": b}
                ok = ok and np.array_equal(sess.run(None, feeds)[0].astype(np.int64), ref)
        if ok:
            exact.add(kind)
    return frozenset(exact)


# --------------------------------------------------------------------------- kernel constants


@dataclass(frozen=True)
class _Requant:
    """The ``Requant`` function's constants, per channel (length 1: per tensor)."""

    bound: tuple[int, ...]
    pre: tuple[int, ...]
    m: tuple[int, ...]
    post: tuple[int, ...]
    qmax: int

    @classmethod
    def from_arrays(cls, arrs: Sequence[np.ndarray]) -> _Requant | None:
        """From the 7 ``Requant`` inputs after ``q``; None unless they are a consistent int32
        schedule (:func:`~qexport.backends.ort_ranges.requant_schedule`)."""
        rq = requant_schedule(arrs)
        if rq is None:
            return None
        return cls(rq.bound, rq.pre, rq.m, rq.post, rq.qmax)

    @property
    def per_tensor(self) -> bool:
        return len(set(zip(self.bound, self.pre, self.m, self.post, strict=True))) == 1

    @property
    def bits(self) -> int:
        return (self.qmax + 1).bit_length()

    def scalar(self) -> K.RequantParams:
        return K.RequantParams(m=self.m[0], shift=self.pre[0] + self.post[0], bits=self.bits,
                               bound=self.bound[0], pre=self.pre[0])

    def unclamped(self, a: int, c: int) -> int:
        """The schedule for ``0 <= a <= bound`` before its final ``min(., qmax)``."""
        p, q = self.pre[c], self.post[c]
        return (((a + ((1 << p) >> 1)) >> p) * self.m[c] + ((1 << q) >> 1)) >> q


def _table(fn: Callable[[torch.Tensor], torch.Tensor], values: np.ndarray) -> np.ndarray:
    """Run a reference kernel over ``values`` (int64 tensors, exactly as the reference model does)."""
    return fn(torch.from_numpy(np.asarray(values, dtype=np.int64))).numpy().astype(np.int64)


# --------------------------------------------------------------------------- the rewriter


@dataclass(frozen=True)
class _Lut:
    """A value equal to ``table[x - lo]`` for ``x = src`` (``clip``: clamp ``src`` to the domain first)."""

    src: str
    lo: int
    table: np.ndarray  # int64, the function's output for lo, lo + 1, ..., lo + len - 1
    clip: bool
    folded: int = 1  # how many functions the table composes

    @property
    def hi(self) -> int:
        return self.lo + len(self.table) - 1

    def then(self, fn: Callable[[np.ndarray], np.ndarray]) -> _Lut:
        return _Lut(self.src, self.lo, fn(self.table), self.clip, self.folded + 1)


#: A linear ``Requant(Add(x @ W, b))``: the Requant node, the operand of x, W [K, N], b, requant.
_Linear = tuple[onnx.NodeProto, tuple[str, str], np.ndarray, np.ndarray, _Requant]


class _Rewriter(GraphFacts):
    """Demand-driven: ``val(name, rep)`` emits (once) what the new graph needs for one value.

    Representations of an integer value ``v``: ``orig`` (its dtype in the input graph), ``i8``
    (``int8(v)``, modular), ``u8`` (``uint8(v)``, modular) and ``u8s`` (``uint8(v + 128)``, modular).
    """

    def __init__(self, model: onnx.ModelProto, opts: RewriteOptions, u8s8_full: bool) -> None:
        super().__init__(model, integer_matmuls="matmul" in opts.enabled)
        self.opts = opts
        self.on = opts.enabled
        self.u8s8_full = u8s8_full
        self.report = RewriteReport(u8s8_full=u8s8_full)
        self.nodes: list[onnx.NodeProto] = []
        self.new_inits: list[onnx.TensorProto] = []
        self.memo: dict[tuple[str, str], str] = {}
        self.emitted: set[int] = set()
        self._lut_cache: dict[str, _Lut | None] = {}
        self._shape_cache: dict[str, str] = {}
        self._init_cache: dict[tuple[str, bytes, tuple[int, ...]], str] = {}
        self._n = 0
        self._float_values: set[str] = set()  # emitted float32 tensors that hold exact integers
        self._notes: list[tuple[str, str]] = []
        self._fusion: dict[str, list[_Linear]] | None = None
        self.group = "rw"  # node-name prefix: which rewrite emitted a node (ORT profiles show it)

    # ------------------------------------------------------------------ small helpers
    @contextlib.contextmanager
    def grouped(self, group: str) -> Iterator[None]:
        outer, self.group = self.group, group
        try:
            yield
        finally:
            self.group = outer

    def note(self, kind: str, out: str) -> str:
        """Record that rewrite ``kind`` produced ``out`` (counted if ``out`` is used in the end)."""
        self._notes.append((kind, out))
        return out

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"ortrw_{hint}_{self._n}"

    def op(self, op_type: str, *inputs: str, hint: str | None = None, **attrs: Any) -> str:
        out = self.fresh(hint or op_type.lower())
        node = helper.make_node(op_type, list(inputs), [out], **attrs)
        node.name = f"{self.group}/{out}"
        self.nodes.append(node)
        return out

    def init(self, arr: np.ndarray, hint: str = "c") -> str:
        arr = np.ascontiguousarray(arr)
        key = (str(arr.dtype), arr.tobytes() if arr.size <= 4096 else b"", tuple(arr.shape))
        if arr.size <= 4096 and key in self._init_cache:
            return self._init_cache[key]
        name = self.fresh(hint)
        self.new_inits.append(numpy_helper.from_array(arr, name))
        if arr.size <= 4096:
            self._init_cache[key] = name
        return name

    def weight(self, arr: np.ndarray, hint: str) -> str:
        """A new constant that later rewrites can read back (``const``/``dtype``)."""
        name = self.init(arr, hint)
        self.add_constant(name, arr)
        return name

    def i32(self, v: int | Sequence[int]) -> str:
        return self.init(np.asarray(v, dtype=np.int32))

    def i64(self, v: int | Sequence[int]) -> str:
        return self.init(np.asarray(v, dtype=np.int64))

    def masked(self, node: onnx.NodeProto) -> str | None:
        m = self._mask(node)
        if m is None:
            return None
        s_, keep, fill = m
        lim = self.op("Sub", self.op("Mul", self.val(keep), self.i32(2 * fill)), self.i32(fill))
        return self.note("mask", self.op("Min", self.val(s_), lim, hint="masked"))

    # ------------------------------------------------------------------ lookup tables
    def table_range(self, name: str) -> Range | None:
        lut = self.lut(name)
        return None if lut is None else (int(lut.table.min()), int(lut.table.max()))

    def lut(self, name: str) -> _Lut | None:
        if name not in self._lut_cache:
            self._lut_cache[name] = None
            self._lut_cache[name] = self._lut(name) if "lut" in self.on else None
        return self._lut_cache[name]

    def _domain(self, x: str, lo: int, hi: int) -> tuple[int, int, bool] | None:
        """The table domain for input ``x`` under the function's own clamp ``[lo, hi]``."""
        r = self.range(x)
        if r is not None:
            lo2, hi2 = max(r[0], lo), min(r[1], hi)
            if lo2 > hi2:
                lo2 = hi2 = lo if r[1] < lo else hi
            clip = r[0] < lo or r[1] > hi
            if hi2 - lo2 + 1 <= self.opts.lut_max:
                return lo2, hi2, clip
        if hi - lo + 1 <= self.opts.lut_max:
            return lo, hi, True
        return None

    def _lut(self, name: str) -> _Lut | None:
        node = self.producer.get(name)
        if node is None or node.domain != DOMAIN or len(node.output) != 1:
            return None
        arrs = self.consts(node.input[1:])
        if arrs is None:
            return None
        x = node.input[0]
        fn: Callable[[torch.Tensor], torch.Tensor]
        if node.op_type == "Requant":
            rq = _Requant.from_arrays(arrs)
            if rq is None or not rq.per_tensor:
                return None
            params = rq.scalar()
            fn = functools.partial(K.requantize_int, p=params)
            clamp = (-params.bound, params.bound)
        elif node.op_type == "IGelu":
            gc = from_onnx_inputs(K.GeluConsts, arrs)
            if gc is None or not 0 < gc.in_max < 2**15 or not 0 <= gc.clip * gc.clip <= gc.one < 2**30:
                return None
            fn = functools.partial(K.i_gelu_int, c=gc)
            clamp = (-gc.in_max, gc.in_max)
        elif node.op_type == "ITanh":
            tc = from_onnx_inputs(K.TanhConsts, arrs)
            if tc is None or not 0 < tc.in_max < 2**15 or not 0 < tc.one < 2**20 or not 0 < tc.out_max < 2**7:
                return None
            fn = functools.partial(K.i_tanh_int, c=tc)
            clamp = (-tc.in_max, tc.in_max)
        else:
            return None
        inner = self.lut(x)
        if inner is not None:  # f(table[x]) == (f o table)[x]
            return inner.then(lambda t: _table(fn, t))
        dom = self._domain(x, *clamp)
        if dom is None:
            return None
        lo, hi, clip = dom
        return _Lut(x, lo, _table(fn, np.arange(lo, hi + 1)), clip)

    def materialize(self, lut: _Lut, rep: str, out_dtype: int) -> str:
        t = lut.table
        if rep == "orig":
            np_t, bounds = NP_OF.get(out_dtype), INT_BOUNDS.get(out_dtype)
            if np_t is None or bounds is None or t.min() < bounds[0] or t.max() > bounds[1]:
                raise ValueError("the table does not fit the value's integer dtype")
            arr = t.astype(np_t)
        elif rep == "u8s":
            arr = ((t + 128) % 256).astype(np.uint8)
        elif rep == "i8":
            arr = (((t + 128) % 256) - 128).astype(np.int8)
        elif rep == "u8":
            arr = (t % 256).astype(np.uint8)
        else:  # pragma: no cover - internal
            raise ValueError(rep)
        x = self.val(lut.src)
        if lut.clip:
            x = self.op("Clip", x, self.i32(lut.lo), self.i32(lut.hi))
        if lut.lo < 0 <= lut.hi:  # negative x indexes from the back: [f(0..hi), f(lo..-1)]
            arr = np.concatenate([arr[-lut.lo:], arr[: -lut.lo]])
            idx = x
        elif lut.lo == 0:
            idx = x
        else:
            idx = self.op("Sub", x, self.i32(lut.lo))
        return self.gather(arr, idx)

    def shape_of(self, x: str) -> str:
        if x not in self._shape_cache:
            self._shape_cache[x] = self.op("Shape", x)
        return self._shape_cache[x]

    def gather(self, table: np.ndarray, idx: str) -> str:
        """``table[idx]`` elementwise: GatherElements on the flattened index (~10x ORT's Gather)."""
        flat = self.op("Reshape", idx, self.i64([-1]))
        got = self.op("GatherElements", self.init(table, "lut"), flat, axis=0, hint="lut")
        return self.op("Reshape", got, self.shape_of(idx))

    # ------------------------------------------------------------------ representations
    def val(self, name: str, rep: str = "orig") -> str:
        key = (name, rep)
        if key not in self.memo:
            self.memo[key] = self._val(name, rep)
        return self.memo[key]

    def _val(self, name: str, rep: str) -> str:
        dt = self.dtype(name)
        if rep == "i8" and dt == TensorProto.INT8 or rep == "u8" and dt == TensorProto.UINT8:
            return self.val(name)
        lut = self.lut(name)
        if lut is not None and dt is not None:
            try:
                with self.grouped("lut"):
                    out = self.materialize(lut, rep, dt)
            except ValueError:
                pass
            else:
                for _ in range(lut.folded - 1):
                    self.note("lut-compose", out)
                return self.note("lut" if rep == "orig" else f"lut-{rep}", out)
        if rep == "orig":
            return self._orig(name)
        arr = self.const(name)
        if arr is not None and arr.dtype.kind in "iu":
            a = arr.astype(np.int64)
            conv = {"u8s": ((a + 128) % 256).astype(np.uint8), "u8": (a % 256).astype(np.uint8),
                    "i8": (((a + 128) % 256) - 128).astype(np.int8)}
            return self.init(conv[rep], "w")
        node = self.producer.get(name)
        layout = node is not None and node.op_type in LAYOUT_OPS and node.domain in ("", "ai.onnx")
        if ("bytes" in self.on and node is not None and layout and name == node.output[0]
                and self.dtype(node.input[0]) in INT_TYPES):
            ins = [self.val(node.input[0], rep)] + [self.val(i) if i else "" for i in node.input[1:]]
            return self.note("bytes", self._emit_copy(node, ins, hint=node.op_type.lower()))
        return self.convert(self.val(name), dt, rep)

    def convert(self, x: str, dt: int | None, rep: str) -> str:
        """Modular int conversions of an emitted integer tensor."""
        if dt not in (TensorProto.INT32, TensorProto.INT64, TensorProto.INT16):
            x = self.op("Cast", x, to=TensorProto.INT32)
            dt = TensorProto.INT32
        if rep == "u8s":
            x = self.op("Add", x, self.init(np.asarray(128, dtype=NP_OF[dt])))
            return self.op("Cast", x, to=TensorProto.UINT8)
        return self.op("Cast", x, to=TensorProto.INT8 if rep == "i8" else TensorProto.UINT8)

    def _emit_copy(self, node: onnx.NodeProto, inputs: list[str], hint: str) -> str:
        out = self.fresh(hint)
        n = helper.make_node(node.op_type, inputs, [out], domain=node.domain)
        n.attribute.extend(node.attribute)
        self.nodes.append(n)
        return out

    def _orig(self, name: str) -> str:
        if name in self.inputs or name in self._new_dtypes:
            return name
        if name in self.inits:
            return name
        node = self.producer[name]
        if id(node) not in self.emitted:
            lowered = self.lower(node)
            if lowered is not None:
                return lowered
            self.passthrough(node)
        return name

    def passthrough(self, node: onnx.NodeProto) -> None:
        if id(node) in self.emitted:
            return
        ins = [self.val(i) if i else "" for i in node.input]
        n = onnx.NodeProto()
        n.CopyFrom(node)
        del n.input[:]
        n.input.extend(ins)
        self.emitted.add(id(node))
        self.nodes.append(n)

    # ------------------------------------------------------------------ lowering dispatch
    def lower(self, node: onnx.NodeProto) -> str | None:
        """Emit a faster equivalent of a single-output node; its new output name, or None."""
        if len(node.output) != 1:
            return None
        group = node.op_type if node.domain == DOMAIN else "mask" if node.op_type == "Add" else "matmul"
        with self.grouped(group):
            return self._lower(node)

    def _lower(self, node: onnx.NodeProto) -> str | None:
        if node.domain == DOMAIN:
            arrs = self.consts(node.input[1:])
            if arrs is None:
                return None
            t = node.op_type
            if t == "Requant" and "requant" in self.on:
                fused = self.fused_linears(node) if "matmul" in self.on else None
                if fused is not None:
                    return fused
                rq = _Requant.from_arrays(arrs)
                if rq is not None:
                    out = self.requant(self.val(node.input[0]), rq, self.range(node.input[0]))
                    return self.note("requant", out)
            if t == "ISoftmax" and "softmax" in self.on:
                return self.softmax(node, arrs)
            if t == "ILayerNorm" and "layernorm" in self.on:
                return self.layernorm(node, arrs)
            return None
        if "softmax" in self.on and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
            return self.masked(node)
        if "matmul" in self.on and node.domain in ("", "ai.onnx"):
            if node.op_type == "MatMulInteger":
                return self.matmul_integer(node)
            if node.op_type == "Cast":
                return self.matmul_qdq(node)
        return None

    # ------------------------------------------------------------------ Requant (per channel)
    def requant(self, x: str, rq: _Requant, rng: Range | None) -> str:
        """The ``Requant`` body without the steps its constants make no-ops."""
        def vec(v: Sequence[int] | Sequence[float], dtype: type = np.int32) -> str:
            return self.init(np.asarray(v[0] if rq.per_tensor else list(v), dtype))

        amax = None if rng is None else max(abs(rng[0]), abs(rng[1]))
        sign = self.op("Sign", x)
        clamp = amax is None or amax > min(rq.bound)
        if any(rq.pre) and max(b + ((1 << p) >> 1) for b, p in zip(rq.bound, rq.pre, strict=True)) < 2**24:
            # pre-shift in float32: |x| clamped to bound < 2**24 is exact, and so are (a + 2**(pre-1))
            # / 2**pre (a power-of-two scaling of an integer < 2**24) and the truncating Cast (a >= 0)
            a = self.op("Abs", self.op("Cast", x, to=TensorProto.FLOAT))
            if clamp:
                a = self.op("Min", a, vec(rq.bound, np.float32))
            a = self.op("Mul", a, vec([2.0**-p for p in rq.pre], np.float32))
            a = self.op("Add", a, vec([0.5 if p else 0.0 for p in rq.pre], np.float32))
            a = self.op("Cast", a, to=TensorProto.INT32)
        else:
            a = self.op("Abs", x)
            if clamp:
                a = self.op("Min", a, vec(rq.bound))
            if any(rq.pre):
                a = self.op("Add", a, vec([(1 << p) >> 1 for p in rq.pre]))
                a = self.op("Div", a, vec([1 << p for p in rq.pre]))
        r = self.op("Mul", a, vec(rq.m))
        if any(rq.post):
            r = self.op("Add", r, vec([(1 << p) >> 1 for p in rq.post]))
            r = self.op("Div", r, vec([1 << p for p in rq.post]))
        # the schedule is monotone in |x| and sees at most min(bound, max |x|): drop min(., qmax)
        # when that largest input already lands on or below qmax
        tops = [b if amax is None else min(b, amax) for b in rq.bound]
        if any(rq.unclamped(top, c) > rq.qmax for c, top in enumerate(tops)):
            r = self.op("Min", r, self.i32(rq.qmax))
        return self.op("Mul", r, sign, hint="requant")

    # ------------------------------------------------------------------ ISoftmax
    def softmax(self, node: onnx.NodeProto, arrs: list[np.ndarray]) -> str | None:
        sm = from_onnx_inputs(K.SoftmaxConsts, arrs)
        if sm is None or not 0 < sm.out_max < 2**8:
            return None
        ec, out_max = sm.exp, sm.out_max
        top = ec.b * ec.b + ec.c
        if top >= 2**30:  # i-exp would never reach 0 (z + e is capped at 30): no finite table
            return None
        # z >= zc -> poly >> (z + e) == 0 since poly <= b^2 + c = top < 2**bitlen(top)
        zc = max(0, top.bit_length() - ec.e)
        units = np.arange(0, zc * ec.ln2 + 1, dtype=np.int64)  # (max - q) >> pre
        tab = _table(lambda t: K.i_exp_int(-t * (1 << ec.pre), ec), units)
        if tab[-1] != 0:  # pragma: no cover - guaranteed by the bound above
            return None
        nz = np.nonzero(tab)[0]
        n0 = int(nz[-1]) + 1 if nz.size else 0
        tab = tab[: n0 + 1]
        if int(tab.max()) * out_max >= 2**31:
            return None
        x = self.val(node.input[0])
        r = self.range(node.input[0])
        if r is None or r[0] < -K.SCORE_MAX or r[1] > K.SCORE_MAX:
            x = self.op("Clip", x, self.i32(-K.SCORE_MAX), self.i32(K.SCORE_MAX))
        axes = self.i64([-1])
        nx = self.op("Sub", self.op("ReduceMax", x, axes, keepdims=1), x)  # in [0, 2**29]
        if ec.pre and (n0 + 1) << ec.pre > self.opts.lut_max:
            idx = self.op("Min", self.op("Div", nx, self.i32(1 << ec.pre)), self.i32(n0))
        else:  # index by max - q itself: table[u << pre + r] = i-exp table[u]
            tab = np.repeat(tab, 1 << ec.pre)[: (n0 << ec.pre) + 1]
            idx = self.op("Min", nx, self.i32(len(tab) - 1))
        e = self.gather(tab.astype(np.int32), idx)
        total = self.op("Max", self.op("ReduceSum", e, axes, keepdims=1), self.i32(1))
        num = self.op("Add", self.op("Mul", e, self.i32(out_max)), self.op("Div", total, self.i32(2)))
        return self.note("softmax", self.op("Div", num, total, hint="softmax"))

    # ------------------------------------------------------------------ ILayerNorm
    def layernorm(self, node: onnx.NodeProto, arrs: list[np.ndarray]) -> str | None:
        lc = from_onnx_inputs(K.LayerNormConsts, arrs)
        rq = _Requant.from_arrays(arrs[5:])
        if lc is None or rq is None:
            return None
        n, half_n, keep = lc.n, lc.n // 2, lc.keep
        gamma, beta = np.asarray(arrs[3]), np.asarray(arrs[4])  # shaped as the graph broadcasts them
        if not 0 <= keep <= 15 or n * 4**keep >= 2**31:
            return None
        if (2 * K.LN_IN_MAX) >> keep >= self.opts.lut_max:
            return None
        x = self.val(node.input[0])
        r = self.range(node.input[0])
        if r is None or r[0] < -K.LN_IN_MAX or r[1] > K.LN_IN_MAX:
            x = self.op("Clip", x, self.i32(-K.LN_IN_MAX), self.i32(K.LN_IN_MAX))
            r = (-K.LN_IN_MAX, K.LN_IN_MAX)
        axes = self.i64([-1])
        t = self.vinfo.get(node.input[0])
        rank = None  # chunked row sums need the static row length n
        if t is not None and t.HasField("shape") and t.shape.dim and t.shape.dim[-1].dim_value == n:
            rank = len(t.shape.dim)
        s = self.row_sum(x, n, max(abs(r[0]), abs(r[1])), rank)
        mean = self.op("Div", self.op("Add", self.op("Abs", s), self.i32(half_n)), self.i32(n))
        mean = self.op("Mul", mean, self.op("Sign", s))
        y = self.op("Sub", x, mean)
        a = self.op("Abs", y)
        amax = self.op("ReduceMax", a, axes, keepdims=1)
        # the mean is a rounded average of the row, inside [lo, hi]: |y| <= hi - lo <= 2**18, so the
        # spec's bit length by 20 comparisons is the true bit length, and k = max(bits(amax) - keep, 0)
        # = bits(amax >> keep): a table over amax >> keep gives 2**k (and 2**-k for the shift below)
        umax = (r[1] - r[0]) >> keep
        u = self.op("Div", amax, self.i32(1 << keep))
        bits = [int(v).bit_length() for v in range(umax + 1)]
        p2 = self.op("Gather", self.i32([1 << b for b in bits]), u)
        inv = self.op("Gather", self.init(np.asarray([2.0**-b for b in bits], np.float32)), u)
        # ys = a >> k in float32: a < 2**19 is exact, a * 2**-k too, and the Cast truncates (a >= 0)
        ys = self.op("Mul", self.op("Cast", a, to=TensorProto.FLOAT), inv)
        ys = self.op("Cast", ys, to=TensorProto.INT32)
        if keep <= 12:  # ys < 2**keep: its square is exact in float32
            ysf = self.op("Cast", ys, to=TensorProto.FLOAT)
            sq = self.op("Mul", ysf, ysf)
            self._float_values.add(sq)
            ssq = self.row_sum(sq, n, (1 << keep) ** 2, rank)  # < n 4**keep < 2**31, as the spec
        else:
            ssq = self.op("ReduceSumSquare", ys, axes, keepdims=1)
        root = self.op("Sqrt", self.op("Cast", ssq, to=TensorProto.DOUBLE))
        sd = self.op("Max", self.op("Cast", root, to=TensorProto.INT32), self.i32(1))
        den = self.op("Mul", sd, p2)
        norm = self.op("Add", self.op("Mul", a, self.i32(1 << K.LN_G)), self.op("Div", den, self.i32(2)))
        norm = self.op("Div", norm, den)
        acc = self.op("Mul", self.op("Mul", norm, self.op("Sign", y)), self.init(gamma.astype(np.int32)))
        acc = self.op("Add", acc, self.init(beta.astype(np.int32)))
        if rq.per_tensor:
            rq = _Requant(rq.bound[:1], rq.pre[:1], rq.m[:1], rq.post[:1], rq.qmax)
        return self.note("layernorm", self.requant(acc, rq, None))

    def row_sum(self, x: str, n: int, amax: int, rank: int | None) -> str:
        """Exact sums over the last axis (length ``n``, ``|x| <= amax``), int32, keepdims.

        ORT's int32 ReduceSum is ~8x slower than float32's, and float32 sums integers exactly while
        every partial sum stays below ``2**24``, in any order: chunks of ``c`` elements with
        ``c * amax < 2**24`` are summed in float32, the chunk sums (exact integers) in int32.
        ``x`` is int32 or float32 (integer-valued); ``rank``: of ``x``, when known."""
        axes = self.i64([-1])
        c = max((d for d in range(1, n + 1) if n % d == 0 and d * amax < 2**24), default=1)
        is_float = x in self._float_values
        if c < 8 or rank is None:
            if is_float:
                x = self.op("Cast", x, to=TensorProto.INT32)
            return self.op("ReduceSum", x, axes, keepdims=1)
        xf = x if is_float else self.op("Cast", x, to=TensorProto.FLOAT)
        chunks = self.op("Reshape", xf, self.i64([0] * (rank - 1) + [n // c, c]))
        parts = self.op("Cast", self.op("ReduceSum", chunks, axes, keepdims=0), to=TensorProto.INT32)
        return self.op("ReduceSum", parts, axes, keepdims=1)

    # ------------------------------------------------------------------ sibling linears
    def _linear_requant(self, node: onnx.NodeProto,
                        ) -> tuple[tuple[str, str], np.ndarray, np.ndarray, _Requant] | None:
        """``Requant(Add(x @ W, b))`` with constant int8 ``W`` [K, N], bias [N] and requant
        constants: ``(operand of x, W, b, requant)``; None otherwise."""
        arrs = self.consts(node.input[1:])
        rq = _Requant.from_arrays(arrs) if arrs is not None else None
        add = self.producer.get(node.input[0])
        if rq is None or add is None or add.op_type != "Add" or self.consumers[add.output[0]] != 1:
            return None
        for i in (0, 1):
            mm_out, b = add.input[i], self.const(add.input[1 - i])
            mm = self.producer.get(mm_out)
            if b is None or b.ndim != 1 or b.dtype.kind not in "iu" or mm is None:
                continue
            if self.consumers[mm_out] != 1:
                continue
            if mm.op_type == "MatMulInteger" and len(mm.input) == 2:
                a, w = self._operand(mm.input[0], False), self._operand(mm.input[1], False)
            elif mm.op_type == "Cast" and attr(mm, "to") == TensorProto.INT32:
                inner = self.producer.get(mm.input[0])
                if inner is None or inner.op_type != "MatMul" or self.consumers[inner.output[0]] != 1:
                    continue
                a, w = self._operand(inner.input[0], True), self._operand(inner.input[1], True)
            else:
                continue
            wa = self.const(w[0]) if w is not None else None
            if a is None or w is None or wa is None or wa.ndim != 2 or wa.dtype != np.int8:
                continue
            n = wa.shape[1]
            if b.shape[0] != n or len(rq.bound) not in (1, n):
                continue
            if len(rq.bound) == 1:
                rq = _Requant(rq.bound * n, rq.pre * n, rq.m * n, rq.post * n, rq.qmax)
            return a, wa, b.astype(np.int64), rq
        return None

    def fused_linears(self, node: onnx.NodeProto) -> str | None:
        """Linears that share their input and are each requantized (Q, K, V): one GEMM over the
        concatenated weights, one bias Add, one per-channel Requant, then Split. Exact: the columns
        of a matmul, a bias and a per-channel requantization are independent of each other."""
        if self._fusion is None:
            self._fusion = {}
            groups: dict[tuple[str, str, int, int], list[_Linear]] = {}
            for n in self.graph.node:
                if n.domain == DOMAIN and n.op_type == "Requant" and len(n.output) == 1:
                    info = self._linear_requant(n)
                    if info is not None:
                        key = (*info[0], info[1].shape[0], info[3].qmax)
                        groups.setdefault(key, []).append((n, *info))
            for group in groups.values():
                if len(group) > 1:
                    for m in group:
                        self._fusion[m[0].output[0]] = group
        members = self._fusion.get(node.output[0])
        if members is None:
            return None
        operand = members[0][1]
        w = self.weight(np.concatenate([m[2] for m in members], axis=1), "w_fused")
        b = self.init(np.concatenate([m[3] for m in members]).astype(np.int32), "b_fused")
        rq = _Requant(bound=tuple(v for m in members for v in m[4].bound),
                      pre=tuple(v for m in members for v in m[4].pre),
                      m=tuple(v for m in members for v in m[4].m),
                      post=tuple(v for m in members for v in m[4].post), qmax=members[0][4].qmax)
        ranges = [r for m in members if (r := self.range(m[0].input[0])) is not None]
        rng = None
        if len(ranges) == len(members):
            rng = (min(r[0] for r in ranges), max(r[1] for r in ranges))
        acc = self.op("Add", self.emit_matmul(operand, (w, "s")), b)
        out = self.requant(acc, rq, rng)
        sizes = [m[2].shape[1] for m in members]
        outs = [self.fresh("split") for _ in members]
        self.nodes.append(helper.make_node("Split", [out, self.i64(sizes)], outs, axis=-1,
                                           name=f"{self.group}/{outs[0]}"))
        for m, o in zip(members, outs, strict=True):
            self.memo[(m[0].output[0], "orig")] = o
        self.note("fused-linears", out)
        self.note("requant", out)
        return outs[[m[0] for m in members].index(node)]

    # ------------------------------------------------------------------ matmuls
    def _operand(self, name: str, qdq: bool) -> tuple[str, str] | None:
        """An int8 matmul operand as ``(logical value, kind)``: kind ``s`` (int8 semantics of the
        value, modular) or ``u`` (uint8 semantics); None when not recognised."""
        node = self.producer.get(name)
        if qdq:
            if node is None or node.op_type != "DequantizeLinear" or not self._unit_qdq(node.input[1:]):
                return None
            q = node.input[0]
            if self.dtype(q) != TensorProto.INT8:
                return None
            qn = self.producer.get(q)
            if qn is not None and qn.op_type == "QuantizeLinear" and self._unit_qdq(qn.input[1:]):
                src = qn.input[0]
                cn = self.producer.get(src)
                # QuantizeLinear(Cast(v, float)) == v only when v is already an int8 value
                if cn is not None and cn.op_type == "Cast" and self.dtype(cn.input[0]) in INT_TYPES:
                    r = self.range(cn.input[0])
                    if r is not None and r[0] >= -128 and r[1] <= 127:
                        return cn.input[0], "s"
                return None
            return q, "s"
        dt = self.dtype(name)
        if node is not None and node.op_type == "Cast" and self.dtype(node.input[0]) in (
            TensorProto.INT32, TensorProto.INT64, TensorProto.INT16
        ):
            if dt == TensorProto.INT8:
                return node.input[0], "s"
            if dt == TensorProto.UINT8:
                return node.input[0], "u"
        if dt == TensorProto.INT8:
            return name, "s"
        if dt == TensorProto.UINT8:
            return name, "u"
        return None

    def _amax(self, name: str, kind: str) -> int:
        r = self.range(name)
        if kind == "u":
            return r[1] if r is not None and r[0] >= 0 and r[1] <= 255 else 255
        return max(abs(r[0]), abs(r[1])) if r is not None and r[0] >= -128 and r[1] <= 127 else 128

    def emit_matmul(self, a: tuple[str, str], b: tuple[str, str]) -> str:
        """uint8 x {int8, uint8} MatMulInteger of two int8-semantics operands (see module docstring)."""
        (av, ak), (bv, bk) = a, b
        if ak == "u":  # uint8 values: feed as they are, no zero point
            a_in, a_zp, a_top = self.val(av, "u8"), "", self._amax(av, "u")
        else:
            a_in, a_zp = self.val(av, "u8s"), self.init(np.asarray(128, np.uint8))
            r = self.range(av)
            a_top = r[1] + 128 if r is not None and r[0] >= -128 and r[1] <= 127 else 255
        w = self.const(bv)
        if bk == "u":
            b_in, b_zp, kind = self.val(bv, "u8"), "", "u8u8" if w is None else "u8u8"
        else:
            if w is not None:
                wmax = int(np.abs(w.astype(np.int64)).max()) if w.size else 0
            else:
                wmax = self._amax(bv, "s")
            if self.u8s8_full or 2 * a_top * wmax <= INT16_MAX:
                b_in, b_zp, kind = self.val(bv, "i8"), "", "u8s8"
            else:
                b_in, b_zp, kind = self.val(bv, "u8s"), self.init(np.asarray(128, np.uint8)), "u8u8"
        ins = [a_in, b_in, a_zp, b_zp]
        while ins and not ins[-1]:
            ins.pop()
        return self.note(f"matmul-{kind}", self.op("MatMulInteger", *ins, hint="mm"))

    def matmul_integer(self, node: onnx.NodeProto) -> str | None:
        if len(node.input) != 2 or self.dtype(node.output[0]) not in (None, TensorProto.INT32):
            return None
        a, b = self._operand(node.input[0], False), self._operand(node.input[1], False)
        if a is None or b is None:
            return None
        return self.emit_matmul(a, b)

    def matmul_qdq(self, node: onnx.NodeProto) -> str | None:
        """``Cast(MatMul(DQ(a8), DQ(b8)), to=int32)`` with unit scales -> MatMulInteger."""
        if attr(node, "to") != TensorProto.INT32:
            return None
        mm = self.producer.get(node.input[0])
        if mm is None or mm.op_type != "MatMul" or self.consumers[mm.output[0]] != 1:
            return None
        a, b = self._operand(mm.input[0], True), self._operand(mm.input[1], True)
        if a is None or b is None:
            return None
        return self.emit_matmul(a, b)

    # ------------------------------------------------------------------ driver
    def run(self, model: onnx.ModelProto) -> onnx.ModelProto:
        # Resolve every value in topological order (so the demand-driven recursion stays shallow),
        # then drop what nothing uses: the values that rewrites bypassed (a table's intermediate
        # outputs, the int8 Casts before a matmul, fused siblings) are emitted but not live.
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.range(o)
        for node in self.graph.node:
            for o in node.output:
                if o:
                    self.val(o)
        outs = [self.val(o.name) for o in self.graph.output]
        for o, new in zip(self.graph.output, outs, strict=True):
            if new != o.name:
                self.nodes.append(helper.make_node("Identity", [new], [o.name]))
        live = {o.name for o in self.graph.output}
        kept: list[onnx.NodeProto] = []
        for n in reversed(self.nodes):
            if any(o in live for o in n.output):
                kept.append(n)
                live.update(i for i in n.input if i)
        kept.reverse()
        self.report.kept = Counter(n.op_type for n in kept if n.domain == DOMAIN)
        self.report.applied = Counter(kind for kind, o in self._notes if o in live)
        inits = [t for t in [*(self.inits[n] for n in self.inits), *self.new_inits] if t.name in live]
        graph = helper.make_graph(kept, self.graph.name, list(self.graph.input), list(self.graph.output),
                                  initializer=inits)
        out = onnx.ModelProto()  # built field by field: the input's weights are not copied twice
        out.ir_version = model.ir_version
        out.producer_name = model.producer_name
        out.opset_import.extend(model.opset_import)
        out.metadata_props.extend(model.metadata_props)
        used = {n.op_type for n in kept if n.domain == DOMAIN}
        out.functions.extend(f for f in model.functions if f.domain != DOMAIN or f.name in used)
        out.graph.CopyFrom(graph)
        return out


def rewrite_for_ort(model: onnx.ModelProto, options: RewriteOptions | None = None,
                    ) -> tuple[onnx.ModelProto, RewriteReport]:
    """An equivalent model that ORT's CPU kernels run faster (see the module docstring)."""
    opts = options or RewriteOptions()
    if opts.u8s8 not in ("auto", "full", "bounded"):
        raise ValueError(f"u8s8 policy must be auto, full or bounded, got {opts.u8s8!r}")
    enabled = opts.enabled
    full = opts.u8s8 == "full"
    if "matmul" in enabled and opts.u8s8 != "full":
        kinds = exact_int8_gemms()
        full = opts.u8s8 == "auto" and "u8s8" in kinds
        if "u8u8" not in kinds:  # no kernel to fall back on: keep the spec's matmuls
            opts = replace(opts, enabled=enabled - {"matmul"})
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in model.graph.node for a in n.attribute):
        return model, RewriteReport()  # subgraphs may name outer values that a rewrite renames
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tables are small: threads only fight over the cores ORT will use
    try:
        rw = _Rewriter(model, opts, full)
        return rw.run(model), rw.report
    finally:
        torch.set_num_threads(threads)

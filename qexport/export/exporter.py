"""Integer checkpoint -> integer ONNX, built from the frozen params (no tracing).

The graph mirrors :meth:`qexport.models.integer.IntegerModel.forward` step for
step; the integer kernels are calls to the ``qexport`` functions
(:mod:`qexport.export.functions`). Two forms:

* ``functions``: ``qexport.IGelu`` etc. as nodes, their FunctionProtos attached;
* ``flat``: the functions inlined and constants folded, ``ai.onnx`` ops only
  (what TVM's and TensorRT's ONNX importers take).

Two linear forms:

* ``qdq``: ``DequantizeLinear(int8, scale=1, zp=0) -> MatMul (float) -> Cast int32``.
  The float MatMul runs on exact small integers, so it is exact while every
  partial sum stays below 2**24 (float32's integer range): |acc| <= 127 * 127 * K
  is below 2**24 for K <= 1040; real activations stay far below the worst case,
  and ``verify`` checks it on data. The form TensorRT needs (no integer MatMul).
* ``integer``: ``MatMulInteger`` (int8 x int8 -> int32): exact always (ORT, TVM).

Weights are int8 initializers (4- and 2-bit weights are unpacked to int8 here;
their packed bytes are what the checkpoint stores).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qexport.errors import ExportError
from qexport.export.constants import to_onnx_inputs
from qexport.export.functions import DOMAIN, DOMAIN_VERSION, Body, function_protos
from qexport.io import atomic_path
from qexport.models.integer import IntegerModel
from qexport.ops import kernels as K
from qexport.ops.intmath import qmax

FORMS = ("functions", "flat")
LINEAR_FORMS = ("qdq", "integer")
DEFAULT_OPSET = 18
MIN_OPSET = 18  # ReduceMax/ReduceSum with axes as an input


class GraphBuilder:
    """Emits the model graph: nodes, int initializers, function calls."""

    def __init__(self, linear: str) -> None:
        self.b = Body()
        self.inits: list[onnx.TensorProto] = []
        self.linear = linear
        self._cache: dict[tuple[str, bytes, str], str] = {}

    def init(self, name: str, arr: np.ndarray) -> str:
        key = (str(arr.dtype), arr.tobytes(), str(arr.shape))
        if arr.size <= 64 and key in self._cache:  # share small constants
            return self._cache[key]
        name = f"{name}_{len(self.inits)}"
        self.inits.append(numpy_helper.from_array(np.array(arr, order="C"), name))
        if arr.size <= 64:
            self._cache[key] = name
        return name

    def ints(self, name: str, arrs: list[np.ndarray]) -> list[str]:
        return [self.init(f"{name}_{i}", a) for i, a in enumerate(arrs)]

    def call(self, fn: str, *inputs: str, hint: str) -> str:
        return self.b.op(fn, *inputs, domain=DOMAIN, hint=hint)

    def requant(self, x: str, p: K.RequantParams | K.ChannelRequant, hint: str) -> str:
        return self.call("Requant", x, *self.ints(hint + "_rq", to_onnx_inputs(p)), hint=hint)

    def table(self, name: str, t: Any) -> str:
        """An int8 embedding table to Gather from: int8 (integer form), or dequantized with
        scale 1 (QDQ form: TensorRT gathers no int8 tensors)."""
        w = self.init(name, t.numpy().astype(np.int8))
        if self.linear == "integer":
            return w
        one = self.init("qdq_scale", np.asarray(1.0, dtype=np.float32))
        return self.b.op("DequantizeLinear", w, one, self.init("qdq_zp", np.asarray(0, dtype=np.int8)))

    def to_int8(self, x: str) -> str:
        """int32 values in [-127, 127] -> int8: a Cast (integer form) or QuantizeLinear with
        scale 1 (QDQ form: TensorRT has int8 only as a quantized type; exact for such values)."""
        if self.linear == "integer":
            return self.b.op("Cast", x, to=TensorProto.INT8)
        one = self.init("qdq_scale", np.asarray(1.0, dtype=np.float32))
        zp = self.init("qdq_zp", np.asarray(0, dtype=np.int8))
        return self.b.op("QuantizeLinear", self.b.op("Cast", x, to=TensorProto.FLOAT), one, zp)

    def matmul(self, a32: str, b8: str, hint: str, a_nonneg: bool = False, b_is_int32: bool = False) -> str:
        """int8 x int8 -> int32 (see module docstring for the two forms).

        ``integer`` form: MatMulInteger on int8 x int8. Operands known to lie in [0, 127]
        (softmax probabilities) go in as uint8, which x86 GEMMs (ORT's MLAS u8s8) run much
        faster and still exactly: a pair of products is at most 2 * 127 * 127 < 2**15, so the
        int16 pair sums of AVX2's vpmaddubsw cannot saturate. (A general ``a + 128`` uint8
        shift with zero point 128 is *not* exact on AVX2 for that reason: it was seen to differ.)
        """
        if b_is_int32:  # an activation: int32 values in [-127, 127]
            b8 = self.to_int8(b8)
        if self.linear == "integer":
            if a_nonneg:
                return self.b.op("MatMulInteger", self.b.op("Cast", a32, to=TensorProto.UINT8), b8, hint=hint)
            return self.b.op("MatMulInteger", self.to_int8(a32), b8, hint=hint)
        one = self.init("qdq_scale", np.asarray(1.0, dtype=np.float32))
        zp = self.init("qdq_zp", np.asarray(0, dtype=np.int8))
        fa = self.b.op("DequantizeLinear", self.to_int8(a32), one, zp)
        fb = self.b.op("DequantizeLinear", b8, one, zp)
        return self.b.op("Cast", self.b.op("MatMul", fa, fb), to=TensorProto.INT32, hint=hint)

    def linear_layer(self, x32: str, lin: Any, key: str) -> str:
        w = self.init(key + ".w", lin.w_t.numpy().astype(np.int8))
        b = self.init(key + ".b", lin.b.numpy().astype(np.int32))
        return self.b.op("Add", self.matmul(x32, w, key), b, hint=key)

    # float fallbacks for presets that keep an op in float ---------------------------------
    def dequant(self, x: str, scale: float) -> str:
        return self.b.op("Mul", self.b.op("Cast", x, to=TensorProto.FLOAT),
                         self.init("s", np.asarray(scale, dtype=np.float32)))

    def quant(self, xf: str, scale: float, bits: int = 8) -> str:
        m = qmax(bits)
        q = self.b.op("Round", self.b.op("Div", xf, self.init("s", np.asarray(scale, dtype=np.float32))))
        q = self.b.op("Clip", q, self.init("lo", np.asarray(-m, dtype=np.float32)),
                      self.init("hi", np.asarray(m, dtype=np.float32)))
        return self.b.op("Cast", q, to=TensorProto.INT32)


def build_model(im: IntegerModel, linear: str = "qdq", opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """The functions-form ModelProto of an :class:`IntegerModel` (see module docstring)."""
    g = GraphBuilder(linear)
    b = g.b
    C = im.consts
    P = im.preset
    H, nh, hd = im.hidden, im.heads, im.head_dim
    i64 = lambda v: g.init("shape", np.asarray(v, dtype=np.int64))  # noqa: E731

    ids = b.op("Cast", "input_ids", to=TensorProto.INT32, hint="ids")
    # positions
    if im.arch == "roberta":
        pad = g.init("pad", np.asarray(im.pad_token_id, dtype=np.int32))
        live = b.op("Cast", b.op("Not", b.op("Equal", ids, pad)), to=TensorProto.INT32)
        pos = b.op("Add", b.op("Mul", b.op("CumSum", live, i64(1)), live), pad, hint="pos")
    else:
        # 0..T-1 per row as CumSum(ones) - 1: keeps the [batch, seq] shape static-rank for importers
        # (TVM loses the shape of a Range over a dynamic length)
        one = g.init("one", np.asarray(1, dtype=np.int32))
        ones = b.op("Add", b.op("Mul", ids, g.init("zero", np.asarray(0, dtype=np.int32))), one)
        pos = b.op("Sub", b.op("CumSum", ones, i64(1)), one, hint="pos")
    e_parts = []
    for k, idx in (("word", ids), ("pos", pos)):
        x = b.op("Cast", b.op("Gather", g.table(f"emb.{k}.w", im.emb[k]), idx), to=TensorProto.INT32)
        e_parts.append(g.requant(x, C[f"emb.{k}.rq"], f"emb_{k}"))
    tt_row = g.init("emb.tt.row0", im.emb["tt"][0].numpy().astype(np.int32))
    e_parts.append(g.requant(tt_row, C["emb.tt.rq"], "emb_tt"))
    e = b.op("Add", b.op("Add", e_parts[0], e_parts[1]), e_parts[2], hint="emb_sum")

    def layernorm(x: str, key: str) -> str:
        if P.layernorm:
            c: K.LayerNormConsts = C[key]
            return g.call("ILayerNorm", x, *g.ints(key, to_onnx_inputs(c)), hint=key.replace(".", "_"))
        xf = g.dequant(x, im.s(key + ".in_s"))
        y = b.op("LayerNormalization", xf, g.init(key + ".g", im.t[key + ".g"].numpy()),
                 g.init(key + ".b", im.t[key + ".b"].numpy()), axis=-1, epsilon=im.eps)
        return g.quant(y, im.s(key + ".out_s"))

    h = layernorm(e, "emb.ln")
    # masked keys: scores * keep + (keep - 1) * MASK_FILL (arithmetic instead of a Where per layer)
    keep = b.op("Cast", b.op("Unsqueeze", "attention_mask", i64([1, 2])), to=TensorProto.INT32)
    keep = b.op("Max", b.op("Min", keep, g.init("one", np.asarray(1, dtype=np.int32))),
                g.init("zero", np.asarray(0, dtype=np.int32)))  # == (mask > 0)
    fill = b.op("Mul", b.op("Sub", keep, g.init("one", np.asarray(1, dtype=np.int32))),
                g.init("mask_fill", np.asarray(K.MASK_FILL, dtype=np.int32)))
    split_shape = i64([0, -1, nh, hd])
    merge_shape = i64([0, -1, H])
    for i in range(im.num_layers):
        p = f"l{i}"

        def heads(x: str, transpose_k: bool = False) -> str:
            y = b.op("Reshape", x, split_shape)
            return b.op("Transpose", y, perm=[0, 2, 3, 1] if transpose_k else [0, 2, 1, 3])

        q = heads(g.requant(g.linear_layer(h, im.lin[f"{p}.q"], f"{p}.q"), C[f"{p}.q.rq"], f"{p}_q"))
        kT = heads(g.requant(g.linear_layer(h, im.lin[f"{p}.k"], f"{p}.k"), C[f"{p}.k.rq"], f"{p}_k"), True)
        v = heads(g.requant(g.linear_layer(h, im.lin[f"{p}.v"], f"{p}.v"), C[f"{p}.v.rq"], f"{p}_v"))
        scores = g.matmul(q, kT, f"{p}_scores", b_is_int32=True)
        scores = b.op("Add", b.op("Mul", scores, keep), fill)
        if P.softmax:
            sc: K.SoftmaxConsts = C[f"{p}.softmax"]
            probs = g.call("ISoftmax", scores, *g.ints(f"{p}.sm", to_onnx_inputs(sc)), hint=f"{p}_probs")
        else:
            pf = b.op("Softmax", g.dequant(scores, C[f"{p}.scores_s"]), axis=-1)
            probs = g.quant(b.op("Mul", pf, g.init("s127", np.asarray(127.0, dtype=np.float32))), 1.0)
        ctx = g.matmul(probs, v, f"{p}_pv", a_nonneg=True, b_is_int32=True)
        ctx = g.requant(ctx, C[f"{p}.ctx.rq"], f"{p}_ctx")
        ctx = b.op("Reshape", b.op("Transpose", ctx, perm=[0, 2, 1, 3]), merge_shape)
        o = g.requant(g.linear_layer(ctx, im.lin[f"{p}.o"], f"{p}.o"), C[f"{p}.o.rq"], f"{p}_o")
        r1 = b.op("Add", o, g.requant(h, C[f"{p}.res1.rq"], f"{p}_res1"))
        h1 = layernorm(r1, f"{p}.ln1")
        f = g.requant(g.linear_layer(h1, im.lin[f"{p}.f1"], f"{p}.f1"), C[f"{p}.f1.rq"], f"{p}_f1")
        if P.gelu:
            gc: K.GeluConsts = C[f"{p}.gelu"]
            gl = g.call("IGelu", f, *g.ints(f"{p}.gelu", to_onnx_inputs(gc)), hint=f"{p}_gelu")
            gl = g.requant(gl, C[f"{p}.gelu.rq"], f"{p}_gelu_rq")
        else:
            gl = g.quant(b.op("Gelu", g.dequant(f, im.s(f"{p}.gelu.in_s"))), im.s(f"{p}.gelu.out_s"))
        o2 = g.requant(g.linear_layer(gl, im.lin[f"{p}.f2"], f"{p}.f2"), C[f"{p}.f2.rq"], f"{p}_f2")
        r2 = b.op("Add", o2, g.requant(h1, C[f"{p}.res2.rq"], f"{p}_res2"))
        h = layernorm(r2, f"{p}.ln2")
    cls = b.op("Gather", h, g.init("zero64", np.asarray(0, dtype=np.int64)), axis=1, hint="cls_token")
    pooled = g.requant(g.linear_layer(cls, im.lin["pool"], "pool"), C["pool.rq"], "pool")
    if P.tanh:
        tc: K.TanhConsts = C["tanh"]
        pooled = g.call("ITanh", pooled, *g.ints("tanh", to_onnx_inputs(tc)), hint="tanh")
    else:
        pooled = g.quant(b.op("Tanh", g.dequant(pooled, im.s("tanh.in_s"))), 1.0 / 127)
    logits_int = g.linear_layer(pooled, im.lin["cls"], "cls")
    b.nodes.append(helper.make_node("Identity", [logits_int], ["logits_int"]))
    scale = g.init("logits_scale", np.asarray(im.logits_scale, dtype=np.float32))
    as_float = b.op("Cast", "logits_int", to=TensorProto.FLOAT)
    b.nodes.append(helper.make_node("Mul", [as_float, scale], ["logits"]))

    dims = ["batch", "seq"]
    graph = helper.make_graph(
        b.nodes, "qexport_integer_encoder",
        [helper.make_tensor_value_info(n, TensorProto.INT64, dims) for n in ("input_ids", "attention_mask")],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", im.meta["num_labels"]]),
         helper.make_tensor_value_info("logits_int", TensorProto.INT32, ["batch", im.meta["num_labels"]])],
        initializer=g.inits,
    )
    used = sorted({n.op_type for n in b.nodes if n.domain == DOMAIN})
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=function_protos(used, opset),
        producer_name="qexport",
    )
    model.ir_version = 10
    meta = {
        "logits_scale": repr(im.logits_scale),
        "preset": P.name,
        "linear": linear,
        "arch": im.arch,
        "integer_only": str(P.integer_only).lower(),
    }
    helper.set_model_props(model, meta)
    return model


def inline_and_fold(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline the qexport functions and fold constants: ``ai.onnx`` ops only (TVM, TensorRT)."""
    import onnx.inliner

    flat = onnx.inliner.inline_local_functions(model)
    del flat.functions[:]
    keep = [o for o in flat.opset_import if o.domain in ("", "ai.onnx")]
    del flat.opset_import[:]
    flat.opset_import.extend(keep)
    try:
        import onnxscript.optimizer

        # constant folding only: optimize()'s rewrite rules fuse Min/Max into Clip, which TVM's
        # importer cannot take with dynamic shapes
        onnxscript.optimizer.fold_constants(flat)
        onnxscript.optimizer.remove_unused_nodes(flat)
    except Exception as exc:  # folding is an optimisation: the inlined graph is already valid
        import warnings

        warnings.warn(f"onnxscript optimizer skipped: {exc}", stacklevel=2)
    return flat


def export_onnx(
    checkpoint: str | Path,
    out_path: str | Path,
    form: str = "functions",
    linear: str = "qdq",
    opset: int | None = None,
) -> Path:
    """Write the integer ONNX of ``checkpoint`` to ``out_path`` atomically; returns the path."""
    if form not in FORMS:
        raise ExportError(f"unknown form {form!r}: choose {' or '.join(FORMS)}")
    if linear not in LINEAR_FORMS:
        raise ExportError(f"unknown linear form {linear!r}: choose {' or '.join(LINEAR_FORMS)}")
    opset = DEFAULT_OPSET if opset is None else opset
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} is too old: qexport's graphs need ai.onnx opset >= {MIN_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise ExportError(f"opset {opset} is newer than this onnx ({onnx.defs.onnx_opset_version()})")
    im = IntegerModel.from_checkpoint(checkpoint)
    if im.preset.name != "full" and opset < 20:
        opset = 20  # float GELU of the partial presets is ai.onnx Gelu (opset 20)
    model = build_model(im, linear=linear, opset=opset)
    if form == "flat":
        model = inline_and_fold(model)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    out = Path(out_path)
    record_tokenizer(model, Path(checkpoint) / "tokenizer", out)
    with atomic_path(out) as tmp:
        onnx.save_model(model, tmp)
    return out


#: ``metadata_props`` key: the checkpoint's ``tokenizer/`` relative to the ONNX file's directory.
TOKENIZER_PROP = "qexport.tokenizer"


def record_tokenizer(model: onnx.ModelProto, tokenizer_dir: Path, out: Path) -> None:
    """Record the checkpoint's ``tokenizer/`` in ``metadata_props`` (key ``qexport.tokenizer``),
    relative to the ONNX file's directory, so a run on text tokenizes as the model was trained
    (read back by ``qexport.verify.model_tokenizer``). Nothing is recorded without one."""
    if not tokenizer_dir.is_dir():
        return
    rel = os.path.relpath(tokenizer_dir.resolve(), out.parent.resolve())
    for prop in model.metadata_props:
        if prop.key == TOKENIZER_PROP:
            prop.value = rel
            return
    model.metadata_props.add(key=TOKENIZER_PROP, value=rel)

"""The consumer of an int8 GEMM, computed in the GEMM's epilogue (TVM llvm builds).

After ``FuseTIR`` every qexport GEMM kernel (:mod:`qexport.backends.tvm_gemm`) writes an int32
tensor that exactly one fused elementwise PrimFunc reads: the requantisation (bias, per-channel
multiplier and shift, clamp, cast to int8), with the i-GELU of the first feed-forward linear,
the residual add before a LayerNorm, the attention scale and mask, the reshape/transpose into
heads. Run as separate kernels, the GEMM writes its int32 output to memory and the chain reads
it back: 8 bytes of traffic per element for work of a few instructions.
:func:`fuse_epilogues` replaces each such pair by one kernel: the GEMM whose every store of an
accumulator runs the chain's expression on it and stores the chain's output element instead.

Which consumers qualify: every block of the fused function is injective (elementwise,
reshape, transpose, cast, broadcasts of its other inputs), and each block computes exactly one
element per GEMM element: its iteration space has the GEMM output's size and it reads the GEMM
output (or an earlier block) through an index map that TVM inverts (``IndexMap.inverse``, a
bijection), every other read of those buffers at the same element (proved by the arithmetic
analyzer). The blocks that ``_inline_all`` keeps separate (values read several times, kept so
the expression does not grow exponentially) store their value in a per-lane scratch of the tile
(``Let`` bindings would be duplicated by the loop unrolling, which TIR rejects). Anything
else (a reduction, a broadcast of the GEMM output, a second output) keeps the two kernels; the
sidecar lists why.

Exactness: the epilogue evaluates the consumer's own expression on the same int32 value the
GEMM stored before, element by element; only where the value lives changes (a register instead
of memory), so the results are bit-identical.
"""

from __future__ import annotations

import json
from typing import Any

from qexport.backends.tvm_gemm import GEMM_ATTR, STRATEGIES, _prod


class _Skip(Exception):
    """The consumer cannot go into the epilogue (the message says why)."""


def _walk(node: Any, typ: Any) -> list[Any]:
    import tvm_ffi

    found: list[Any] = []
    tvm_ffi.structural_walk(node, [(typ, found.append)], order="pre")
    return found


def _readers(funcs: list[Any]) -> dict[Any, list[Any]]:
    """Relax variable -> the bindings that read it (``None``: its function's result reads it)."""
    from tvm import relax

    out: dict[Any, list[Any]] = {}
    for func in funcs:
        for blk in func.body.blocks:
            for b in blk.bindings:
                for v in _walk(b.value, relax.Var):
                    out.setdefault(v, []).append(b)
        for v in _walk(func.body.body, relax.Var):
            out.setdefault(v, []).append(None)
    return out


def _same(a: Any, b: Any) -> bool:
    return bool(a.same_as(b))


def _lookup(table: list[tuple[Any, Any]], key: Any) -> Any:
    """The value paired with ``key`` (identity), or None."""
    for k, v in table:
        if _same(k, key):
            return v
    return None


class _Plan:
    """The consumer's chain as functions of the GEMM element's coordinates."""

    def __init__(self, cvars: list[Any], x: Any, lets: list[tuple[Any, Any]], out: Any, out_idx: list[Any]):
        self.cvars = cvars  # coordinates of the GEMM output element (the consumer's view)
        self.x = x  # the GEMM output element
        self.lets = lets  # (var, value) of each block, in order; the last one is stored
        self.out = out  # the output buffer
        self.out_idx = out_idx  # where the element goes

    def store(self, value: Any, indices: list[Any], slot: Any, scratch: list[Any]) -> Any:
        """The epilogue statements for one GEMM store ``C[indices] = value``: each intermediate
        block's value goes to ``scratch[k][slot]`` (a few stack bytes: ``Let`` bindings would be
        duplicated by loop unrolling, which TIR's analysis rejects), the last one to the output."""
        from tvm import tirx

        vmap: list[tuple[Any, Any]] = list(zip(self.cvars, indices, strict=True)) + [(self.x, value)]
        stmts: list[Any] = []
        for k, (var, val) in enumerate(self.lets[:-1]):
            stmts.append(tirx.BufferStore(scratch[k], _subst(val, vmap), [slot]))
            vmap.append((var, tirx.BufferLoad(scratch[k], [slot])))
        idx = [_subst(i, vmap) for i in self.out_idx]
        stmts.append(tirx.BufferStore(self.out, _subst(self.lets[-1][1], vmap), idx))
        return stmts[0] if len(stmts) == 1 else tirx.SeqStmt(stmts)


def _subst(expr: Any, vmap: list[tuple[Any, Any]], loads: list[tuple[Any, Any]] | None = None) -> Any:
    """``expr`` with the variables of ``vmap`` replaced, and each load of a buffer in ``loads``
    replaced by that buffer's value (identity lookups)."""
    import tvm_ffi
    from tvm import ir, tirx

    def on_var(v: Any) -> Any:
        got = _lookup(vmap, v)
        return v if got is None else got

    def on_load(ld: Any) -> Any:
        got = _lookup(loads or [], ld.source)
        return ld if got is None else got

    return tvm_ffi.structural_map(expr, [(tirx.Var, on_var), (ir.TensorLoad, on_load)])


def _plan(chain: Any, c_pos: int) -> _Plan:
    """Analyse the consumer PrimFunc ``chain`` (its parameter ``c_pos`` is the GEMM output)."""
    from tvm import ir, s_tir, tirx
    from tvm.sym.analyzer import Analyzer

    from qexport.backends import tvm_cpu

    sch = s_tir.Schedule(chain)
    infos = tvm_cpu._normalize(sch)
    if infos is None or not all(b.is_injective() for b in infos):
        raise _Skip("consumer is not elementwise")
    tvm_cpu._inline_all(sch, infos)
    func = sch.mod["main"]
    params = list(func.params)
    cbuf, obuf = params[c_pos], params[-1]
    blocks = [b for b in _walk(func.body, s_tir.SBlock) if b.name_hint != "root"]
    if not blocks:
        raise _Skip("consumer has no blocks")
    ana = Analyzer()
    cvars = [tirx.Var(f"c{i}", "int64") for i in range(len(cbuf.shape))]
    for cv, ext in zip(cvars, cbuf.shape, strict=True):
        ana.bind(cv, ir.Range.from_min_extent(0, ext))
    numel = _prod(cbuf.shape)
    x = tirx.Var("acc", str(cbuf.dtype))
    src: list[tuple[Any, list[Any]]] = [(cbuf, cvars)]  # buffer -> coordinates of "the" element
    vals: list[tuple[Any, Any]] = [(cbuf, x)]  # buffer -> the variable holding that element
    lets: list[tuple[Any, Any]] = []
    store = None
    for blk in blocks:
        store = blk.body
        if not isinstance(store, tirx.BufferStore) or blk.init is not None:
            raise _Skip(f"block {blk.name_hint} is not one store")
        if any(int(iv.iter_type) != 0 for iv in blk.iter_vars):
            raise _Skip(f"block {blk.name_hint} is not spatial")
        loads = [ld for ld in _walk(store.value, ir.TensorLoad) if _lookup(src, ld.source) is not None]
        if not loads:
            raise _Skip(f"block {blk.name_hint} does not read the GEMM output")
        ivars = [iv.var for iv in blk.iter_vars]
        doms = [iv.dom.extent for iv in blk.iter_vars]
        if not ana.can_prove_equal(_prod(doms), numel):
            raise _Skip(f"block {blk.name_hint} is not one element per GEMM element")
        first = loads[0]
        first_src = _lookup(src, first.source)
        try:
            inverse = tirx.IndexMap(ivars, list(first.indices), None).inverse(doms)
            values = list(inverse.map_indices(first_src))
        except Exception as exc:  # noqa: BLE001 - not a bijection TVM can invert
            raise _Skip(f"block {blk.name_hint}: {str(exc).strip().splitlines()[-1][:80]}") from None
        vmap = list(zip(ivars, values, strict=True))
        for ld in loads:
            want = _lookup(src, ld.source)
            got = [_subst(i, vmap) for i in ld.indices]
            if not all(ana.can_prove_equal(a, b) for a, b in zip(got, want, strict=True)):
                raise _Skip(f"block {blk.name_hint} reads another element")

        value = _subst(store.value, vmap, vals)
        var = tirx.Var(blk.name_hint.replace(".", "_"), str(store.value.ty.dtype))
        lets.append((var, value))
        src.append((store.buffer, [_subst(i, vmap) for i in store.indices]))
        vals.append((store.buffer, var))
    assert store is not None
    if not _same(store.buffer, obuf):
        raise _Skip("the last block does not write the output")
    out_idx = _lookup(src, obuf)
    return _Plan(cvars, x, lets, obuf, out_idx)


def fuse_pair(gemm: Any, chain: Any, c_pos: int) -> Any:
    """The GEMM PrimFunc with ``chain`` (reading the GEMM output as parameter ``c_pos``) in its
    epilogue: parameters ``A, W, CORR``, the chain's other inputs, the chain's output."""
    import tvm_ffi
    from tvm import ir, s_tir, tirx

    key = json.loads(str(gemm.attrs[GEMM_ATTR]))
    if key["strategy"] == "scalar":
        raise _Skip("scalar GEMM (accumulates in its output)")
    lanes = STRATEGIES[key["strategy"]].lanes
    plan = _plan(chain, c_pos)
    scratch = [
        tirx.decl_buffer((lanes,), str(var.ty.dtype), f"epi_{var.name}") for var, _ in plan.lets[:-1]
    ]
    gparams = list(gemm.params)
    cbuf = gparams[3]
    cparams = list(chain.params)
    extra = [p for i, p in enumerate(cparams[:-1]) if i != c_pos]
    if len(plan.cvars) != len(cbuf.shape):
        raise _Skip("GEMM output rank differs")
    stores = 0
    odd: list[Any] = []

    def on_store(st: Any) -> Any:
        nonlocal stores
        if not _same(st.buffer, cbuf):
            return st
        if not isinstance(st.value, ir.TensorLoad) or len(st.value.indices) != 1:
            odd.append(st)
            return st
        stores += 1
        slot = tirx.floormod(st.value.indices[0], lanes)
        return plan.store(st.value, list(st.indices), slot, scratch)

    def full(buf: Any) -> Any:
        return tirx.BufferRegion(buf, [ir.Range.from_min_extent(0, e) for e in buf.shape])

    def on_block(blk: Any) -> Any:
        if not any(_same(w.source, cbuf) for w in blk.writes):
            return blk
        reads = list(blk.reads) + [full(b) for b in extra]
        writes = [w for w in blk.writes if not _same(w.source, cbuf)] + [full(plan.out)]
        return s_tir.SBlock(
            list(blk.iter_vars), reads, writes, blk.name_hint, blk.body, blk.init,
            list(blk.alloc_buffers) + scratch, list(blk.match_buffers), dict(blk.annotations),
        )

    body = tvm_ffi.structural_map(gemm.body, [(tirx.BufferStore, on_store), (s_tir.SBlock, on_block)])
    if stores == 0 or odd:
        raise _Skip("GEMM stores are not one accumulator element each")
    return tirx.PrimFunc(gparams[:3] + extra + [plan.out], body, attrs=gemm.attrs)


def fuse_epilogues(mod: Any) -> tuple[Any, list[dict[str, Any]]]:
    """Relax module pass body: GEMM + elementwise consumer -> one kernel (module docstring).

    Returns the module and one record per GEMM: ``fused`` with the consumer's name, or
    ``skipped`` with the reason.
    """
    from tvm import relax, tirx

    records: list[dict[str, Any]] = []
    gemms = {
        gv.name_hint
        for gv, f in mod.functions_items()
        if isinstance(f, tirx.PrimFunc) and f.attrs is not None and GEMM_ATTR in f.attrs
    }
    if not gemms:
        return mod, records
    replace: list[tuple[Any, Any]] = []  # consumer call -> new call
    new_funcs: list[tuple[str, Any]] = []
    cache: dict[tuple[str, str, int], str] = {}
    for _gv, func in list(mod.functions_items()):
        if not isinstance(func, relax.Function):
            continue
        bindings = [b for blk in func.body.blocks for b in blk.bindings]
        uses = _readers([func])
        for b in bindings:
            call = b.value
            if not (isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.call_tir"):
                continue
            gname = call.args[0].name_hint
            if gname not in gemms:
                continue
            users = uses.get(b.var, [])
            rec: dict[str, Any] = {"gemm": gname}
            records.append(rec)
            if len(users) != 1 or users[0] is None:
                rec["skipped"] = f"output used {len(users)} times"
                continue
            consumer = users[0].value
            if not (
                isinstance(consumer, relax.Call)
                and getattr(consumer.op, "name", "") == "relax.call_tir"
                and isinstance(mod[consumer.args[0]], tirx.PrimFunc)
            ):
                rec["skipped"] = "consumer is not a TIR call"
                continue
            cargs = list(consumer.args[1].fields)
            pos = [i for i, a in enumerate(cargs) if _same(a, b.var)]
            if len(pos) != 1 or len(mod[consumer.args[0]].params) != len(cargs) + 1:
                rec["skipped"] = "consumer reads it twice or has several outputs"
                continue
            cname = consumer.args[0].name_hint
            rec["consumer"] = cname
            key = (gname, cname, pos[0])
            if key not in cache:
                try:
                    fused = fuse_pair(mod[call.args[0]], mod[consumer.args[0]], pos[0])
                except _Skip as why:
                    rec["skipped"] = str(why)
                    cache[key] = ""
                    continue
                cache[key] = f"{gname}_epilogue{len(new_funcs)}"
                new_funcs.append((cache[key], fused))
            if not cache[key]:
                rec["skipped"] = "see the first record of this pair"
                continue
            rec["fused"] = cache[key]
            gargs = list(call.args[1].fields)
            replace.append((consumer, (cache[key], gargs + cargs[: pos[0]] + cargs[pos[0] + 1 :])))
    if not replace:
        return mod, records
    from tvm.relax.expr_functor import PyExprMutator, mutator

    @mutator
    class Swap(PyExprMutator):
        def visit_call_(self, op: Any) -> Any:
            new = _lookup(replace, op)
            if new is None:
                return super().visit_call_(op)
            name, args = new
            return relax.call_tir(gvs[name], [self.visit_expr(a) for a in args], op.ty_args[0])

    swap = Swap(mod)
    gvs = {name: swap.builder_.add_func(f, name) for name, f in new_funcs}
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            swap.builder_.update_func(gv, swap.visit_expr(func))
    out = swap.builder_.get()
    out = relax.transform.DeadCodeElimination()(out)
    return out, records


def summarize(records: list[dict[str, Any]]) -> str:
    """``12 of 14 GEMM consumers fused (2 left: output used 2 times)``."""
    done = sum(1 for r in records if "fused" in r)
    why = sorted({str(r["skipped"]) for r in records if "skipped" in r})
    left = len(records) - done
    line = f"{done} of {len(records)} GEMM consumers fused"
    return line + (f" ({left} left: {'; '.join(why)})" if left else "")

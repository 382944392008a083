"""Row groups: a LayerNorm's (or softmax's) chain of kernels merged into one (TVM llvm builds).

``FuseOps`` never puts two reductions in one function, so an integer LayerNorm runs as a dozen
kernels, each a pass over the whole activation in memory: the row sum, ``x - mean``, ``|x|``,
the row max, the bit length, the shifted sum of squares, the Newton square root, the
normalisation and requantisation. :func:`merge_row_groups` runs between ``FuseOps`` and
``FuseTIR``: it merges such a chain into one primitive function, which ``FuseTIR`` turns into one
PrimFunc and the ``reduction`` rule of :mod:`qexport.backends.tvm_cpu` schedules row by row (the
rows in parallel, every block of a row computed while the row is in cache).

A group starts at a call whose function reduces rows to one value each (a sum or max with a last
dimension of 1; a matmul never joins a group) and takes in the calls that read its outputs, as
long as each produces one tensor with the same leading dimensions (the rows: ``[batch, seq]`` or
``[batch, heads, seq]``) and nothing outside the group reads a group output before the group's
last call (the merged call takes the last call's place). Calls of the
int8 GEMM kernels and calls that read a GEMM's output are left out, so the GEMM epilogues
(:mod:`qexport.backends.tvm_epilogue`) keep their consumers. Exact: the same PrimFuncs on the
same values, only the kernel boundaries move.
"""

from __future__ import annotations

from typing import Any

from qexport.backends.tvm_epilogue import _lookup, _readers, _subst, _walk
from qexport.backends.tvm_gemm import SCHEDULED_ATTR, _shape


def _same_dims(a: list[Any], b: list[Any]) -> bool:
    import tvm_ffi

    return len(a) == len(b) and all(tvm_ffi.structural_equal(x, y) for x, y in zip(a, b, strict=True))


def _reductions(func: Any) -> tuple[bool, bool]:
    """(row, other): the PrimFunc has a reduction block writing one value per row (its output's
    last dimension is 1: a row sum or max), and one writing anything else (a matmul)."""
    from tvm import s_tir, tirx

    row = other = False
    for blk in _walk(func, s_tir.SBlock):
        if not any(int(iv.iter_type) == 2 for iv in blk.iter_vars):
            continue
        shape = list(blk.writes[0].source.shape) if blk.writes else []
        last = shape[-1] if shape else 1
        if isinstance(last, int | tirx.IntImm) and int(last) == 1:
            row = True
        else:
            other = True
    return row, other


def merge_row_groups(mod: Any) -> tuple[Any, int]:
    """The pass body (module docstring): the new module and the number of groups merged."""
    import tvm
    from tvm import relax, tirx
    from tvm.relax.expr_functor import PyExprMutator, mutator

    main_funcs = [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)
                  and not (f.attrs is not None and "Primitive" in f.attrs)]

    def callee(call: Any) -> tuple[str, Any] | None:
        """("tir", PrimFunc) for call_tir, ("prim", Function) for a fused primitive function."""
        if not isinstance(call, relax.Call):
            return None
        if getattr(call.op, "name", "") == "relax.call_tir":
            f = mod[call.args[0]]
            return ("tir", f) if isinstance(f, tirx.PrimFunc) else None
        if isinstance(call.op, tvm.ir.GlobalVar):
            f = mod[call.op]
            if isinstance(f, relax.Function) and f.attrs is not None and "Primitive" in f.attrs:
                return ("prim", f)
        return None

    def args_of(call: Any) -> list[Any]:
        if getattr(call.op, "name", "") == "relax.call_tir":
            return list(call.args[1].fields)
        return list(call.args)

    def is_gemm(call: Any) -> bool:
        kind = callee(call)
        if kind is None or kind[0] != "tir":
            return False
        return kind[1].attrs is not None and SCHEDULED_ATTR in kind[1].attrs

    def reductions(call: Any) -> tuple[bool, bool]:
        kind = callee(call)
        if kind is None:
            return False, False
        funcs = [kind[1]] if kind[0] == "tir" else [mod[c.args[0]] for c in _calls(kind[1])]
        found = [_reductions(f) for f in funcs]
        return any(r for r, _ in found), any(o for _, o in found)

    def reduces(call: Any) -> bool:
        row, other = reductions(call)
        return row and not other

    groups: list[list[Any]] = []  # lists of bindings
    for _gv, func in main_funcs:
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                continue
            bindings = list(block.bindings)
            gemm_out = {b.var for b in bindings if is_gemm(b.value)}
            taken: set[Any] = set()
            for i, seed in enumerate(bindings):
                if seed.var in taken or not reduces(seed.value):
                    continue
                if any(a in gemm_out for a in args_of(seed.value)):
                    continue
                out = _shape(seed.var)
                if out is None or len(out) < 2:
                    continue
                lead = out[:-1]
                members = [seed]
                produced = {seed.var}
                for b in bindings[i + 1:]:
                    reads = args_of(b.value) if isinstance(b.value, relax.Call) else []
                    uses_group = any(a in produced for a in _walk(b.value, relax.Var))
                    if not uses_group:
                        continue
                    shp = _shape(b.var)
                    ok = (
                        callee(b.value) is not None
                        and not is_gemm(b.value)
                        and not reductions(b.value)[1]
                        and not any(a in gemm_out for a in reads)
                        and b.var not in taken
                        and shp is not None
                        and len(shp) == len(lead) + 1
                        and _same_dims(shp[:-1], lead)
                    )
                    if not ok:
                        break  # an outside reader: the group ends before it
                    members.append(b)
                    produced.add(b.var)
                if len(members) >= 2:
                    groups.append(members)
                    taken |= produced
    if not groups:
        return mod, 0

    @mutator
    class Merge(PyExprMutator):
        def __init__(self, module: Any) -> None:
            super().__init__(module)
            self.plan: dict[Any, tuple[Any, list[Any], list[Any]]] = {}  # last var -> (gv, ins, outs)
            self.skip: set[Any] = set()

        def visit_var_binding_(self, binding: Any) -> None:
            if binding.var in self.skip:
                return
            if binding.var not in self.plan:
                super().visit_var_binding_(binding)
                return
            gv, ins, outs = self.plan[binding.var]
            call = self.builder_.emit(relax.Call(gv, [self.visit_expr(a) for a in ins]))
            if len(outs) == 1:
                self.set_var_remap(outs[0], call)
                return
            for k, v in enumerate(outs):
                self.set_var_remap(v, self.builder_.emit(relax.TupleGetItem(call, k)))

    merge = Merge(mod)
    merged = 0
    readers = _readers([f for _, f in main_funcs])
    for n, members in enumerate(groups):
        group_vars = [b.var for b in members]
        ins: list[Any] = []
        for b in members:
            for a in args_of(b.value):
                if isinstance(a, relax.Var | tvm.ir.GenericConst) and a not in group_vars and not any(
                    a.same_as(x) for x in ins
                ):
                    ins.append(a)
        last = members[-1].var
        outs = [v for v in group_vars
                if any(u is None or u.var not in group_vars for u in readers.get(v, []))]
        if last not in outs:
            outs.append(last)
        try:
            func = _group_function(mod, members, ins, outs, callee)
        except ValueError:  # a binding form the merge does not handle: the kernels stay apart
            continue
        merged += 1
        gv = merge.builder_.add_func(func, f"rows{n}_" + _name(members[0].value)[:40])
        merge.plan[last] = (gv, ins, outs)
        merge.skip |= {b.var for b in members[:-1]}
    for gv, func in main_funcs:
        merge.builder_.update_func(gv, merge.visit_expr(func))
    return merge.builder_.get(), merged


def _calls(func: Any) -> list[Any]:
    from tvm import relax

    return [b.value for blk in func.body.blocks for b in blk.bindings
            if isinstance(b.value, relax.Call) and getattr(b.value.op, "name", "") == "relax.call_tir"]


def _name(call: Any) -> str:
    if getattr(call.op, "name", "") == "relax.call_tir":
        return str(call.args[0].name_hint)
    return str(call.op.name_hint)


def _group_function(mod: Any, members: list[Any], ins: list[Any], outs: list[Any], callee: Any) -> Any:
    """A primitive Relax function of call_tir bindings: the members, fused functions inlined."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"p{k}", a.ty) for k, a in enumerate(ins)]
    env: list[tuple[Any, Any]] = list(zip(ins, params, strict=True))

    def look(x: Any, table: list[tuple[Any, Any]]) -> Any:
        got = _lookup(table, x)
        return x if got is None else got

    with bb.function("rows", params, attrs={"Primitive": True}, private=True):
        with bb.dataflow():
            for b in members:
                kind, f = callee(b.value)
                call = b.value
                if kind == "tir":
                    args = [look(a, env) for a in call.args[1].fields]
                    new = bb.emit(relax.call_tir(call.args[0], args, call.ty_args[0]))
                else:
                    inner = list(zip(f.params, [look(a, env) for a in call.args], strict=True))
                    dims = _dim_map(f.params, list(call.args))
                    for blk in f.body.blocks:
                        for ib in blk.bindings:
                            v = ib.value
                            if isinstance(v, relax.Call) and getattr(v.op, "name", "") == "relax.call_tir":
                                args = [look(a, inner) for a in v.args[1].fields]
                                out_ty = _retype(v.ty_args[0], dims)
                                nv = bb.emit(relax.call_tir(v.args[0], args, out_ty))
                            elif isinstance(v, relax.TupleGetItem):
                                nv = bb.emit(relax.TupleGetItem(look(v.tuple_value, inner), v.index))
                            else:
                                raise ValueError(f"unexpected binding in a fused function: {type(v)}")
                            inner.append((ib.var, nv))
                    new = look(f.body.body, inner)
                env.append((b.var, new))
            res = [look(v, env) for v in outs]
            gv = bb.emit_output(res[0] if len(res) == 1 else relax.Tuple(res))
        bb.emit_func_output(gv)
    return bb.get()["rows"]


def _dim_map(params: list[Any], args: list[Any]) -> list[tuple[Any, Any]]:
    """A fused function's symbolic dimensions -> the caller's (from its parameters' shapes)."""
    from tvm import tirx

    out: list[tuple[Any, Any]] = []
    for p, a in zip(params, args, strict=True):
        ps, as_ = _shape(p), _shape(a)
        if ps is None or as_ is None or len(ps) != len(as_):
            continue
        for x, y in zip(ps, as_, strict=True):
            if isinstance(x, tirx.Var) and not any(k.same_as(x) for k, _ in out):
                out.append((x, y))
    return out


def _retype(ty: Any, dims: list[tuple[Any, Any]]) -> Any:
    """A call_tir output type in the caller's dimensions (the inlined function's are not defined
    there: left in, dynamic shapes crashed FuseTIR)."""
    from tvm import relax

    if not dims:
        return ty
    if not isinstance(ty, relax.TensorType):
        raise ValueError("a fused function with a tuple-typed call_tir")
    return relax.TensorType([_subst(d, dims) for d in (_shape_of_type(ty) or [])], ty.dtype)


def _shape_of_type(ty: Any) -> list[Any] | None:
    values = getattr(getattr(ty, "shape", None), "values", None)
    return list(values) if values is not None else None

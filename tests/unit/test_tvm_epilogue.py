"""Which consumers of a GEMM go into its epilogue (qexport.backends.tvm_epilogue), and why not.

The fused kernels' exactness is tested end to end (tests/integration/test_tvm_cpu.py: a small
graph and MiniLM against ONNX Runtime and the PyTorch reference); here the planner's decisions on
hand-written consumers: an elementwise chain with a transpose is taken, a row reduction, a
broadcast of one column, a chain that reads a neighbouring element and the scalar kernel are not.
"""

from __future__ import annotations

from typing import Any

import pytest

tvm = pytest.importorskip("tvm")

from qexport.backends import tvm_epilogue as E  # noqa: E402
from qexport.backends import tvm_gemm as G  # noqa: E402

pytestmark = pytest.mark.tvm


def _gemm(strategy: str = "vnni512") -> Any:
    return G.gemm_primfunc(G.STRATEGIES[strategy], k=32, n=64, a_dtype="int8", shared_b=True)


def _chains() -> dict[str, Any]:
    from tvm.script import tirx as T

    @T.prim_func(private=True, s_tir=True)
    def transpose(
        c: T.Buffer((1, 8, 64), "int32"), bias: T.Buffer((64,), "int32"), o: T.Buffer((2, 64, 4), "int8")
    ):
        t = T.alloc_buffer((8, 64), "int32")
        for i, j in T.grid(8, 64):
            with T.sblock("add"):
                vi, vj = T.axis.remap("SS", [i, j])
                t[vi, vj] = c[0, vi, vj] + bias[vj]
        for b, j, s in T.grid(2, 64, 4):
            with T.sblock("out"):
                vb, vj, vs = T.axis.remap("SSS", [b, j, s])
                o[vb, vj, vs] = T.Cast(
                    "int8", T.max(T.min(t[vb * 4 + vs, vj] * t[vb * 4 + vs, vj] >> 8, 127), -128)
                )

    @T.prim_func(private=True, s_tir=True)
    def rowsum(c: T.Buffer((1, 8, 64), "int32"), o: T.Buffer((8,), "int32")):
        for i, j in T.grid(8, 64):
            with T.sblock("sum"):
                vi, vj = T.axis.remap("SR", [i, j])
                with T.init():
                    o[vi] = 0
                o[vi] = o[vi] + c[0, vi, vj]

    @T.prim_func(private=True, s_tir=True)
    def column(c: T.Buffer((1, 8, 64), "int32"), o: T.Buffer((8, 64), "int32")):
        for i, j in T.grid(8, 64):
            with T.sblock("bcast"):
                vi, vj = T.axis.remap("SS", [i, j])
                o[vi, vj] = c[0, vi, 0] + vj

    @T.prim_func(private=True, s_tir=True)
    def neighbour(c: T.Buffer((1, 8, 64), "int32"), o: T.Buffer((8, 64), "int32")):
        for i, j in T.grid(8, 64):
            with T.sblock("diff"):
                vi, vj = T.axis.remap("SS", [i, j])
                o[vi, vj] = c[0, vi, vj] - c[0, vi, (vj + 1) % 64]

    return {"transpose": transpose, "rowsum": rowsum, "column": column, "neighbour": neighbour}


def test_elementwise_chain_with_a_transpose_goes_into_the_epilogue() -> None:
    from tvm import tirx

    fused = E.fuse_pair(_gemm(), _chains()["transpose"], 0)
    names = [str(p.name) for p in fused.params]
    assert names == ["A", "W", "CORR", "bias", "o"]  # the GEMM's inputs, the chain's, its output
    stores: list[Any] = []
    import tvm_ffi

    tvm_ffi.structural_walk(fused.body, [(tirx.BufferStore, stores.append)])
    written = {str(s.buffer.name) for s in stores}
    assert "o" in written and "C" not in written
    # the intermediate block's value lives in a per-lane scratch of the epilogue
    assert any(name.startswith("epi_") for name in written)


@pytest.mark.parametrize(
    ("chain", "why"),
    [
        ("rowsum", "consumer is not elementwise"),
        ("column", "is not one element per GEMM element|bijective|Could not|another element"),
        ("neighbour", "reads another element"),
    ],
)
def test_other_consumers_keep_their_own_kernel(chain: str, why: str) -> None:
    with pytest.raises(E._Skip, match=why):
        E.fuse_pair(_gemm(), _chains()[chain], 0)


def test_scalar_gemm_has_no_epilogue() -> None:
    with pytest.raises(E._Skip, match="scalar GEMM"):
        E.fuse_pair(_gemm("scalar"), _chains()["transpose"], 0)


def test_summary_line() -> None:
    records = [{"gemm": "g", "fused": "g_epilogue0"}, {"gemm": "g", "skipped": "consumer is not elementwise"}]
    assert E.summarize(records) == "1 of 2 GEMM consumers fused (1 left: consumer is not elementwise)"

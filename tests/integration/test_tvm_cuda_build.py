"""TVM CUDA lowering + nvcc for sm_75 and sm_90 on real exported graphs (no GPU needed).

The MiniLM PTQ checkpoint (preset ``full``) is exported flat in both linear forms and built with
``qexport tvm`` (the CLI, in a subprocess: a crash inside TVM's scheduler fails the test instead
of killing pytest). The sidecar must record the rule of every PrimFunc, the functions that needed
a later rule and why, and tensor cores for every int8 GEMM (WMMA int8 exists on sm_75 and sm_90).
A few seconds of lowering per PrimFunc add up: the full builds are ``slow`` (the integer graph
for sm_90 included, 40 s); the default run checks the per-function rule machinery on a hand-made
PrimFunc (small graphs build for sm_75 in ``test_tvm_backend.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qexport.errors import BackendError

tvm = pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

ROOT = Path(__file__).resolve().parents[2]


def _nvcc() -> str | None:
    from qexport.backends.tvm_cuda import find_nvcc

    return find_nvcc()


needs_nvcc = pytest.mark.skipif(
    _nvcc() is None, reason="nvcc not installed: CUDA kernels are compiled with nvcc"
)


@pytest.fixture(scope="module")
def minilm_onnx(int_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from qexport.export.exporter import export_onnx

    out = tmp_path_factory.mktemp("cuda_onnx")
    return {
        linear: export_onnx(int_checkpoint, out / f"model.flat.{linear}.onnx", form="flat", linear=linear)
        for linear in ("integer", "qdq")
    }


def _build(onnx_path: Path, target: str, out: Path, shapes: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "qexport.cli", "tvm", str(onnx_path), "--target", target, "-o", str(out)]
    if shapes:
        cmd += ["--shapes", shapes]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return json.loads((out / "tvm.json").read_text())


def _check_sidecar(meta: dict, out: Path, arch: str, linear: str) -> None:
    assert meta["device"] == "cuda" and meta["arch"] == arch
    assert meta["cuda_aot"]["format"] == "fatbin" and meta["cuda_aot"]["bytes"] > 0
    lib = (out / "lib.so").read_bytes()
    assert meta["library_bytes"] == len(lib)
    assert b"__global__" not in lib  # kernels shipped compiled, not as source for NVRTC
    sched = meta["schedule"]
    assert sched["functions"] == len(sched["rule_of"]) == sum(sched["by_rule"].values()) > 0
    assert set(sched["by_rule"]) <= set(sched["rule_order"])
    # dlight's GEMV analysis asserts on the fused masked-sum reduction: recorded, then rescheduled
    for name, errors in sched["needed_fallback"].items():
        assert sched["rule_of"][name] not in {e["rule"] for e in errors}
        assert all(e["error"] for e in errors)
    tc = meta["tensor_cores"]
    # every Q/K/V/output/FFN/head linear (and QK^T) is one int8 x int8 -> int32 GEMM function
    assert tc["arch_has_int8_tensor_cores"] is True
    assert tc["int8_gemm_functions"] >= 5
    for name, rec in tc["functions"].items():
        assert rec["rule"] == "int8_wmma" and rec["tensor_cores"] and rec["tensor_cores_in_source"], name
    assert tc["on_tensor_cores"] == tc["int8_gemm_functions"] == tc["source_kernels_with_mma"]
    assert meta["int8_matmul_strategy"].startswith("cuda: int8 tensor cores")
    if linear == "qdq":  # the float32 GEMMs of DequantizeLinear(int8, 1, 0) became int8 GEMMs
        assert meta["qdq_matmuls_to_int8"] >= tc["int8_gemm_functions"]
        assert meta["int8_matmuls"] == 0
    else:
        assert meta["qdq_matmuls_to_int8"] == 0 and meta["int8_matmuls"] > 0


@pytest.mark.slow  # a 40 s nvcc build of the whole model; small graphs build for sm_75 by default
@needs_nvcc
def test_minilm_integer_sm90(minilm_onnx: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "h100"
    meta = _build(minilm_onnx["integer"], "h100", out)
    _check_sidecar(meta, out, "sm_90", "integer")


@needs_nvcc
@pytest.mark.slow
@pytest.mark.parametrize(
    ("linear", "target", "arch"),
    [("integer", "t4", "sm_75"), ("qdq", "t4", "sm_75"), ("qdq", "h100", "sm_90")],
)
def test_minilm_cuda_builds(
    minilm_onnx: dict[str, Path], tmp_path: Path, linear: str, target: str, arch: str
) -> None:
    out = tmp_path / target
    meta = _build(minilm_onnx[linear], target, out)
    _check_sidecar(meta, out, arch, linear)


def _reduction_func() -> object:
    """A masked row sum (a reduction PrimFunc, as LegalizeOps makes them)."""
    from tvm import te

    a = te.placeholder((4, 64), "int32", name="a")
    m = te.placeholder((4, 64), "int32", name="m")
    k = te.reduce_axis((0, 64), name="k")
    out = te.compute((4,), lambda i: te.sum(a[i, k] * m[i, k], axis=k), name="sum")
    return te.create_prim_func([a, m, out])


def _unbound_func() -> object:
    """An elementwise PrimFunc left unscheduled: no thread binding."""
    from tvm import te

    a = te.placeholder((8,), "int32", name="a")
    out = te.compute((8,), lambda i: a[i] + 1, name="add")
    return te.create_prim_func([a, out])


class _Raises:
    def apply(self, func: object, target: object, tunable: bool) -> object:
        raise AssertionError


def test_schedule_pass_records_rules_and_failures() -> None:
    """A raising rule is recorded and the next one schedules; no rule -> one BackendError line."""
    from tvm.s_tir import dlight as dl

    from qexport.backends import tvm_cuda as tc

    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    mod = tvm.IRModule({"masked_sum": _reduction_func()})
    log = tc.ScheduleLog()
    rules = [("gemv", _Raises()), ("reduction", dl.gpu.Reduction()), ("fallback", dl.gpu.Fallback())]
    with target:
        out = tc.schedule_pass(target, rules, log)(mod)
    assert log.rule == {"masked_sum": "reduction"}
    assert log.failed == {"masked_sum": [{"rule": "gemv", "error": "AssertionError"}]}
    assert int(out["masked_sum"].attrs["tirx.is_scheduled"]) == 1
    problem, uses_tc = tc.gpu_verify(out["masked_sum"], "masked_sum", target)
    assert problem is None and uses_tc is False

    # an unbound function fails TVM's GPU memory check ("did you forget to bind?")
    problem, _ = tc.gpu_verify(_unbound_func(), "add_one", target)
    assert problem is not None and "bind" in problem

    # no rule that works: the build stops with the function and the last rule's error
    log = tc.ScheduleLog()
    fresh = tvm.IRModule({"masked_sum": _reduction_func()})
    with target, pytest.raises(Exception, match="no CUDA schedule for PrimFunc 'masked_sum': gemv"):
        tc.schedule_pass(target, [("gemv", _Raises())], log)(fresh)
    assert log.fatal == "no CUDA schedule for PrimFunc 'masked_sum': gemv: AssertionError"


def test_build_failure_is_one_backend_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With only a rule that raises, ``build_cuda`` raises one BackendError naming the function."""
    from qexport.backends import tvm_cuda as tc

    monkeypatch.setattr(tc, "dlight_rules", lambda tensor_cores: [("gemv", _Raises())])
    from tvm import relax

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 64), "int32"))
    m = relax.Var("m", relax.TensorType((4, 64), "int32"))
    with bb.function("main", [x, m]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.sum(relax.op.multiply(x, m), axis=[1]))
        bb.emit_func_output(out)
    mod = bb.get()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_75"})
    want = r"^no CUDA schedule for PrimFunc '\w+': gemv: AssertionError$"
    with pytest.raises(BackendError, match=want):
        tc.build_cuda(mod, target, tmp_path / "lib.so", tmp_path, n_int8=0)


def test_kernel_split_and_arch_helpers() -> None:
    from qexport.backends import tvm_cuda as tc

    src = (
        'extern "C" __global__ void __launch_bounds__(128) fused_matmul_add5_kernel(int* a) {\n'
        "  nvcuda::wmma::mma_sync(c, a, b, c);\n}\n"
        'extern "C" __global__ void __launch_bounds__(256) sum3_kernel(int* a) { a[0] = 1; }\n'
        'extern "C" __global__ void sum3_kernel_1(int* a) { a[0] = 2; }\n'
    )
    ks = tc.kernel_sources(src)
    assert list(ks) == ["fused_matmul_add5_kernel", "sum3_kernel", "sum3_kernel_1"]
    assert tc._uses_tensor_cores_src(ks["fused_matmul_add5_kernel"])
    assert not tc._uses_tensor_cores_src(ks["sum3_kernel"])
    assert tc._kernel_owner("sum3_kernel_1", {"sum3"}) == "sum3"
    assert tc._kernel_owner("other_kernel", {"sum3"}) is None
    assert tc.sm_version("sm_90a") == 90 and tc.sm_version("x") == 0
    assert tc.has_int8_tensor_cores("sm_75") and tc.has_int8_tensor_cores("sm_90")
    assert not tc.has_int8_tensor_cores("sm_70")

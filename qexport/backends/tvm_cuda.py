"""CUDA half of the TVM backend: Relax pipeline, per-PrimFunc dlight scheduling, nvcc AOT packing.

``qexport.backends.tvm`` imports the Relax module from ONNX; for a CUDA target it hands the
module to :func:`build_cuda`, which

1. rewrites the integer GEMMs so tensor cores can take them: ``MatMulInteger`` is already an
   ``int8 x int8 -> int32`` matmul (see ``tvm._int8_matmul_rewrite``); the ``--linear qdq``
   form ``Cast(MatMul(DequantizeLinear(a:int8, 1, 0), DequantizeLinear(b:int8, 1, 0)), int32)``
   becomes the same integer matmul (:func:`qdq_matmul_rewrite`; exact w.r.t. the integer
   reference, whose accumulator is an exact int32 -- the float32 GEMM it replaces is exact
   only below 2^24);
2. legalizes and fuses (TVM's CUDA pipeline) and schedules every PrimFunc **one at a time**:
   the dlight rules are tried in order (int8 WMMA, Matmul, GEMV, Reduction, GeneralReduction,
   Fallback); a rule that raises (dlight's analyses ``assert``), declines, or yields a function
   that fails TVM's GPU checks (the TIR lowering pipeline up to ``VerifyMemory`` -- "did you
   forget to bind?" -- plus ``verify_gpu_code`` against the target's thread and shared-memory
   limits) is recorded and the next rule runs. A function no rule can schedule is one
   :class:`~qexport.errors.BackendError` naming it and the last rule's error;
3. compiles the CUDA source with ``nvcc`` ahead of time to a fatbin for the target's arch and
   swaps it into the library's packed imports (loading needs the CUDA driver only).

The sidecar gets :attr:`CudaBuild.meta`: the rule that scheduled each function (counts, and
for every function that needed a later rule the errors of the earlier ones), and per GEMM
function whether it runs on tensor cores (from the scheduled TIR, cross-checked against the
CUDA source of its kernels).

Known TVM 0.27.0.post1 problems handled here:

* ``Schedule.tensorize`` deep-copies the intrinsic through ``ffi::ToJSONGraph``, which
  segfaults when apache-tvm-ffi is 0.1.15.x (ABI mismatch; works with 0.1.14.post0). We probe
  JSON serialisation in a subprocess and, when it crashes, mark every PrimFunc
  ``dlight.do_not_tensorize`` and leave the int8 WMMA rule out (SIMT matmuls, int32 accumulate).
* dlight's int8 WMMA rule annotates a software pipeline that ``InjectSoftwarePipeline``
  rejects for int8 fragments; our rule strips those annotations.
* dlight's GEMV analysis asserts on fused reductions it cannot normalize (``assert s_loops``);
  with per-function rules that is one recorded failure and the next rule schedules it.
* TVMScript parsing of the CUDA tensor intrinsics calls ``inspect.stack()``, which takes
  minutes with torch imported; we swap in a cheap frame walk while the intrinsics load.
"""

from __future__ import annotations

import contextlib
import inspect
import linecache
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from qexport.errors import BackendError

NVCC_DEFAULT = "/usr/local/cuda/bin/nvcc"
RULE_ORDER = ("int8_wmma", "matmul", "gemv", "reduction", "general_reduction", "fallback")
# Calls that only appear in a lowered PrimFunc that runs on tensor cores.
_TENSOR_CORE_OPS = frozenset(
    {"tirx.tvm_mma_sync", "tirx.tvm_bmma_sync", "tirx.ptx_mma", "tirx.ptx_mma_sp", "tirx.ptx_wgmma"}
)
_KERNEL_RE = re.compile(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\(')


# --------------------------------------------------------------------------------------------
# helpers that need no tvm
# --------------------------------------------------------------------------------------------
def _fast_stack(context: int = 1) -> list[inspect.FrameInfo]:
    """``inspect.stack`` without ``inspect.getmodule`` (O(frames x sys.modules) with torch)."""
    out = []
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        fname = frame.f_code.co_filename
        line = linecache.getline(fname, frame.f_lineno) if context > 0 else ""
        out.append(
            inspect.FrameInfo(
                frame,
                fname,
                frame.f_lineno,
                frame.f_code.co_name,
                [line] if line else None,
                0 if line else None,
            )
        )
        frame = frame.f_back
    return out


@contextlib.contextmanager
def cheap_inspect_stack() -> Iterator[None]:
    orig = inspect.stack
    inspect.stack = _fast_stack
    try:
        yield
    finally:
        inspect.stack = orig


_TENSORIZE_OK: bool | None = None


def tensorize_works() -> bool:
    """Whether ``Schedule.tensorize`` can run in this install (probed once, in a subprocess).

    Tensorize deep-copies through ``tvm.ir.save_json``'s C++ path; with a mismatched
    apache-tvm-ffi that segfaults, so the probe must not run in this process.
    """
    global _TENSORIZE_OK
    if _TENSORIZE_OK is None:
        code = "import tvm; tvm.ir.save_json(tvm.tirx.IntImm('int32', 1)); print('ok')"
        try:
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            _TENSORIZE_OK = res.returncode == 0 and "ok" in res.stdout
        except (OSError, subprocess.TimeoutExpired):
            _TENSORIZE_OK = False
    return _TENSORIZE_OK


def sm_version(arch: str) -> int:
    """``"sm_90"`` -> 90 (``"sm_90a"`` -> 90); 0 when unparsable."""
    m = re.match(r"sm_(\d+)", arch)
    return int(m.group(1)) if m else 0


def has_int8_tensor_cores(arch: str) -> bool:
    """int8 WMMA (m16n16k16, s32 accumulate) exists from sm_72 (Xavier) and sm_75 (Turing) on."""
    return sm_version(arch) >= 72


def one_line(exc: BaseException) -> str:
    """The last non-empty line of an exception's text (TVM errors carry long C++ traces)."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def kernel_sources(cuda_src: str) -> dict[str, str]:
    """Split a TVM CUDA source into ``{kernel name: its text}`` (one ``__global__`` each)."""
    starts = [(m.start(), m.group(1)) for m in _KERNEL_RE.finditer(cuda_src)]
    out = {}
    for i, (pos, name) in enumerate(starts):
        end = starts[i + 1][0] if i + 1 < len(starts) else len(cuda_src)
        out[name] = cuda_src[pos:end]
    return out


def _kernel_owner(kernel: str, funcs: set[str]) -> str | None:
    """The PrimFunc a kernel was split from: TVM names them ``<func>_kernel[_N]``."""
    base = re.sub(r"_kernel(_\d+)?$", "", kernel)
    return base if base in funcs else None


def _uses_tensor_cores_src(kernel_src: str) -> bool:
    return "wmma::mma_sync" in kernel_src or "mma.sync" in kernel_src or "wgmma" in kernel_src


# --------------------------------------------------------------------------------------------
# relax rewrites
# --------------------------------------------------------------------------------------------
def _dtype(expr: Any) -> str:
    dt = expr.ty.dtype
    return str(getattr(dt, "dtype", dt))


def _const_is(expr: Any, value: float) -> bool:
    """A relax constant whose every element equals ``value``."""
    import numpy as np
    from tvm.ir.expr import Constant

    if not isinstance(expr, Constant):
        return False
    v = expr.value
    arr = np.asarray(v.numpy() if hasattr(v, "numpy") else v)
    return bool(arr.size >= 1 and (arr == value).all())


def qdq_matmul_rewrite(mod: Any) -> tuple[Any, int]:
    """The ``--linear qdq`` GEMM, as TVM imports it, -> ``matmul(a, b, out_dtype=int32)``.

    ONNX ``Cast(MatMul(DequantizeLinear(a, 1, 0), DequantizeLinear(b, 1, 0)), int32)`` with
    ``a``, ``b`` int8 arrives as ``astype(where(m >= 2^31, m - 2^32, m), int32)`` with
    ``m = floor_mod(astype(where(!isfinite(f), 0, f), int64), 2^32)`` and ``f`` the float32
    matmul. The float32 GEMM multiplies exact small integers, so ``f`` is the integer dot
    product whenever float32 holds it (< 2^24), and the wrap chain is the identity on int32
    values: the integer matmul is that dot product always -- the integer reference's
    semantics. Returns the module and the number of rewrites.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    pattern = is_op("relax.astype")(wildcard())
    count = 0

    def rewrite_func(func: Any) -> Any:
        var2val = relax.analysis.get_var2val(func)

        def call(expr: Any, name: str) -> Any:
            while isinstance(expr, relax.Var) and expr in var2val:
                expr = var2val[expr]
            if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == name:
                return expr
            return None

        def operand(dq: Any) -> Any:
            c = call(dq, "relax.dequantize")
            if c is None or not _const_is(c.args[1], 1.0) or not _const_is(c.args[2], 0):
                return None
            return c.args[0] if _dtype(c.args[0]) == "int8" else None

        def rewriter(expr: Any, _matches: Any) -> Any:
            nonlocal count
            if _dtype(expr) != "int32":
                return expr
            w = call(expr.args[0], "relax.where")
            fm = call(w.args[2], "relax.floor_mod") if w is not None else None
            if (
                fm is None
                or not _const_is(fm.args[1], 2**32)
                or call(w.args[0], "relax.greater_equal") is None
            ):
                return expr
            a64 = call(fm.args[0], "relax.astype")
            guard = call(a64.args[0], "relax.where") if a64 is not None else None
            mm = call(guard.args[2], "relax.matmul") if guard is not None else None
            if guard is None or mm is None or not _const_is(guard.args[1], 0.0):
                return expr
            xa, xb = operand(mm.args[0]), operand(mm.args[1])
            if xa is None or xb is None:
                return expr
            count += 1
            return relax.op.matmul(xa, xb, out_dtype="int32")

        return rewrite_call(pattern, rewriter, func)

    new_funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new_funcs[gv] = rewrite_func(func)
    for gv, func in new_funcs.items():
        mod[gv] = func
    if count:
        mod = relax.transform.DeadCodeElimination()(mod)
    return mod, count


# --------------------------------------------------------------------------------------------
# dlight rules, one PrimFunc at a time
# --------------------------------------------------------------------------------------------
def _is_int8_matmul(func: Any) -> bool:
    """A PrimFunc whose reduction block is a matmul of two int8 buffers into int32 (any size: padded)."""
    from tvm import s_tir, tirx
    from tvm.s_tir.dlight.gpu import matmul as dlm

    if not isinstance(func, tirx.PrimFunc):
        return False
    try:
        sch = s_tir.Schedule(func)
        blocks = sch.get_child_blocks(dlm.get_root_block(sch))
        red = dlm.get_reduction_blocks(sch, blocks)
        if not red:
            return False
        block = sch.get(red[0])
        if len(block.reads) != 2 or dlm.get_index_map(block) is None:
            return False
        if tuple(dlm.get_in_out_dtypes(block)) != ("int8", "int32"):
            return False
    except Exception:  # noqa: BLE001 - not analysable: not a matmul we tensorize
        return False
    return True


def int8_wmma_rule() -> Any:
    """dlight rule: dlight's int8 WMMA tensorization minus the software-pipeline annotations.

    Returns ``None`` (not applicable) for anything but an int8 x int8 -> int32 matmul; a
    tensorization failure propagates, so the caller records it and tries the next rule.
    """
    from tvm.s_tir.dlight import gpu as dlgpu
    from tvm.s_tir.dlight.gpu.matmul import MatmulInt8Tensorization

    class Int8WMMA(dlgpu.Matmul):
        def apply(self, func: Any, target: Any, tunable: bool) -> Any:
            if not _is_int8_matmul(func):
                return None  # dlight's int8 rule assumes a 2-input matmul block
            sch = MatmulInt8Tensorization().apply(func, target, tunable)
            if sch is None:
                return None
            root = sch.mod["main"].body.block.name_hint
            stack = list(sch.get_child_blocks(sch.get_sblock(root)))
            while stack:
                blk = stack.pop()
                stack.extend(sch.get_child_blocks(blk))
                for loop in sch.get_loops(blk):
                    for key in list(sch.get(loop).annotations.keys()):
                        if str(key).startswith("software_pipeline"):
                            sch.unannotate(loop, key)
            return sch

    return Int8WMMA()


def dlight_rules(tensor_cores: bool) -> list[tuple[str, Any]]:
    """``[(name, rule)]`` in :data:`RULE_ORDER`; the int8 WMMA rule only when ``tensor_cores``."""
    from tvm.s_tir import dlight as dl

    rules: list[tuple[str, Any]] = [
        ("matmul", dl.gpu.Matmul()),
        ("gemv", dl.gpu.GEMV()),
        ("reduction", dl.gpu.Reduction()),
        ("general_reduction", dl.gpu.GeneralReduction()),
        ("fallback", dl.gpu.Fallback()),
    ]
    if tensor_cores:
        rules.insert(0, ("int8_wmma", int8_wmma_rule()))
    return rules


def _lowered_calls(mod: Any) -> set[str]:
    """Names of every intrinsic called in a lowered TIR module."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    names: set[str] = set()

    def visit(node: Any) -> None:
        if hasattr(node.op, "name"):
            names.add(str(node.op.name))

    for _, func in mod.functions.items():
        if isinstance(func, tirx.PrimFunc):
            tvm_ffi.structural_walk(func.body, [(tvm.ir.Call, visit)], order="post")
    return names


def _host_stores(func: Any) -> bool:
    """Whether a lowered host function stores to a global buffer (work left outside any kernel).

    TVM's ``VerifyMemory`` flags this ("Did you forget to bind?") for some functions but lets
    others through to code generation; this check covers them all.
    """
    import tvm_ffi
    from tvm import tirx

    scopes: list[str] = []

    def visit(node: Any) -> None:
        scopes.append(str(node.buffer.scope()))

    tvm_ffi.structural_walk(func.body, [(tirx.BufferStore, visit)], order="post")
    return "global" in scopes


def _block_threads(func: Any) -> int:
    """Largest constant threads-per-block product among a lowered kernel's ``threadIdx`` launches."""
    import tvm_ffi
    from tvm import tirx

    extents: dict[str, int] = {}

    def visit(node: Any) -> None:
        if node.attr_key == "thread_extent":
            tag = str(node.node.thread_tag)
            if tag.startswith("threadIdx") and isinstance(node.value, tirx.IntImm):
                extents[tag] = max(extents.get(tag, 1), int(node.value.value))

    tvm_ffi.structural_walk(func.body, [(tirx.AttrStmt, visit)], order="post")
    total = 1
    for v in extents.values():
        total *= v
    return total


def gpu_verify(func: Any, name: str, target: Any) -> tuple[str | None, bool]:
    """Lower one scheduled PrimFunc as the build will (TIR pipeline, ``VerifyMemory`` included)
    and check its kernels' threads per block against the target's limit (``verify_gpu_code``
    needs constant grid extents, which dynamic shapes do not have).

    Returns ``(problem or None, uses tensor cores)``.
    """
    import tvm
    from tvm import tirx

    one = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    try:
        one = tirx.transform.BindTarget(target.with_host("llvm"))(one)
        pipeline = tirx.get_default_tir_pipeline(target)[0]
        lowered = pipeline(one)
    except Exception as exc:  # noqa: BLE001 - any lowering failure is a reason to try the next rule
        return one_line(exc), False
    max_threads = int(target.attrs.get("max_num_threads", 1024))
    for gv, f in lowered.functions.items():
        if not isinstance(f, tirx.PrimFunc):
            continue
        cc = f.attrs.get("calling_conv") if f.attrs is not None else None
        if (cc is None or int(cc) != 2) and _host_stores(f):  # 2: kDeviceKernelLaunch
            return (
                f"{gv.name_hint} writes device memory from host code (no thread binding): "
                "did you forget to bind?"
            ), False
        if cc is not None and int(cc) == 2:
            threads = _block_threads(f)
            if threads > max_threads:
                return f"kernel {gv.name_hint} launches {threads} threads per block (> {max_threads})", False
    return None, bool(_lowered_calls(lowered) & _TENSOR_CORE_OPS)


@dataclass
class ScheduleLog:
    """What :func:`schedule_pass` did to each PrimFunc (filled while the pipeline runs)."""

    rule: dict[str, str] = field(default_factory=dict)
    tensor_cores: dict[str, bool] = field(default_factory=dict)
    int8_gemm: dict[str, bool] = field(default_factory=dict)
    failed: dict[str, list[dict[str, str]]] = field(default_factory=dict)
    fatal: str | None = None
    seconds: dict[str, float] = field(default_factory=lambda: {"schedule": 0.0, "verify": 0.0})


def schedule_pass(target: Any, rules: list[tuple[str, Any]], log: ScheduleLog) -> Any:
    """Module pass: schedule each unscheduled PrimFunc with the first rule that works."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="QexportPerFuncSchedule")
    def _schedule(mod: Any, _ctx: Any) -> Any:
        updated = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and int(func.attrs.get("tirx.is_scheduled", 0)) == 1:
                continue
            name = gv.name_hint
            errors: list[dict[str, str]] = []
            for rule_name, rule in rules:
                t0 = time.perf_counter()
                try:
                    sch = rule.apply(func, target, False)
                except Exception as exc:  # noqa: BLE001 - dlight asserts/raises: try the next rule
                    errors.append({"rule": rule_name, "error": one_line(exc)})
                    continue
                finally:
                    log.seconds["schedule"] += time.perf_counter() - t0
                if sch is None:
                    continue
                if isinstance(sch, list):
                    sch = sch[0]
                new = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                t0 = time.perf_counter()
                problem, tc = gpu_verify(new, name, target)
                log.seconds["verify"] += time.perf_counter() - t0
                if problem is not None:
                    errors.append({"rule": rule_name, "error": problem})
                    continue
                updated[gv] = new
                log.rule[name] = rule_name
                log.tensor_cores[name] = tc
                log.int8_gemm[name] = _is_int8_matmul(func)
                if errors:
                    log.failed[name] = errors
                break
            else:
                last = errors[-1] if errors else {"rule": rules[-1][0], "error": "no rule applies"}
                log.fatal = f"no CUDA schedule for PrimFunc {name!r}: {last['rule']}: {last['error']}"
                raise RuntimeError(log.fatal)
        for gv, func in updated.items():
            mod[gv] = func
        return mod

    return _schedule


def cuda_pipeline(target: Any, rules: list[tuple[str, Any]], log: ScheduleLog, tensorize: bool) -> Any:
    """TVM's CUDA Relax pipeline with :func:`schedule_pass` in place of ``ApplyDefaultSchedule``."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cuda import pipeline as cuda_pipe

    @tvm.transform.module_pass(opt_level=0)
    def _no_tensorize(mod: Any, _ctx: Any) -> Any:
        for gv, func in list(mod.functions.items()):
            if isinstance(func, tvm.tirx.PrimFunc):
                mod[gv] = func.with_attr("dlight.do_not_tensorize", True)
        return mod

    legalize = [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]
    if not tensorize:
        legalize.append(_no_tensorize)
    legalize.append(schedule_pass(target, rules, log))

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod: Any, _ctx: Any) -> Any:
        with target, cheap_inspect_stack():
            seq = tvm.transform.Sequential(
                cuda_pipe.library_dispatch_passes(target)
                + legalize
                + cuda_pipe.dataflow_lower_passes(target)
                + cuda_pipe.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


# --------------------------------------------------------------------------------------------
# nvcc ahead of time, packed into the library
# --------------------------------------------------------------------------------------------
def find_cuda_module(mod: Any) -> Any:
    if mod.kind == "cuda":
        return mod
    for sub in mod.imports:
        found = find_cuda_module(sub)
        if found is not None:
            return found
    return None


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or (NVCC_DEFAULT if Path(NVCC_DEFAULT).exists() else None)


def nvcc_fatbin(source: str, arch: str, workdir: Path) -> bytes:
    nvcc = find_nvcc()
    if nvcc is None:
        raise BackendError(
            "nvcc not found: CUDA targets are compiled ahead of time with nvcc",
            hint="install the CUDA toolkit or put nvcc on PATH",
        )
    src, out = workdir / "kernels.cu", workdir / "kernels.fatbin"
    src.write_text(source)
    cmd = [nvcc, "--fatbin", "-O3", f"-arch={arch}", "-diag-suppress=177", "-o", str(out), str(src)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        err = [ln for ln in res.stderr.splitlines() if "error" in ln] or res.stderr.strip().splitlines()[-1:]
        raise BackendError(f"nvcc failed for {arch}: {err[0].strip()[:400] if err else 'no message'}")
    data = out.read_bytes()
    src.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    return data


def _u64(buf: bytes, pos: int) -> tuple[int, int]:
    return struct.unpack_from("<Q", buf, pos)[0], pos + 8


def patch_library_bin(blob: bytes, cuda_source: str, fatbin: bytes) -> bytes:
    """Swap the CUDA module's raw source for a fatbin inside a packed ``__tvm_ffi__library_bin``.

    Layout (tvm-ffi): u64 payload size | u64-vector import row ptr | u64-vector child ids |
    per module: str kind [, u64-len bytes] (``_lib`` entries carry no bytes). A CUDA module's
    bytes are ``str fmt | fmap | u64-len code`` with fmt ``cuda`` and code = the source.
    """
    pos = 8
    n_row, pos = _u64(blob, pos)
    pos += 8 * n_row
    n_child, pos = _u64(blob, pos)
    pos += 8 * n_child
    src_b = cuda_source.encode()
    out = bytearray(blob[:pos])
    patched = False
    while pos < len(blob):
        klen, pos = _u64(blob, pos)
        kind = blob[pos : pos + klen].decode()
        out += blob[pos - 8 : pos + klen]
        pos += klen
        if kind == "_lib":
            continue
        blen, pos = _u64(blob, pos)
        body = blob[pos : pos + blen]
        pos += blen
        tail = struct.pack("<Q", len(src_b)) + src_b
        if kind == "cuda" and body[:12] == struct.pack("<Q", 4) + b"cuda" and body.endswith(tail):
            fmap = body[12 : len(body) - len(tail)]
            body = struct.pack("<Q", 6) + b"fatbin" + fmap + struct.pack("<Q", len(fatbin)) + fatbin
            patched = True
        out += struct.pack("<Q", len(body)) + body
    if not patched:
        raise BackendError("could not find the CUDA source module in the packed library")
    out[:8] = struct.pack("<Q", len(out) - 8)
    return bytes(out)


def _asm_blob(name: str, blob_path: Path) -> str:
    """Assembly defining the global ``name`` as the bytes of ``blob_path`` (``.incbin``).

    The packed imports hold the VM's constants (the model's weights): as a C array of hex
    literals they cost the C compiler minutes and gigabytes; the assembler copies the file.
    """
    return (
        ".section .rodata\n.p2align 4\n"
        f".globl {name}\n.type {name}, @object\n{name}:\n"
        f'.incbin "{blob_path}"\n.size {name}, . - {name}\n'
        '.section .note.GNU-stack,"",@progbits\n'
    )


def _blob_from_packed_c(c_src: str) -> bytes:
    body = c_src[c_src.index("] = {") + 5 : c_src.rindex("};")]
    return bytes.fromhex(body.replace("0x", "").replace(",", "").replace("\n", "").replace(" ", ""))


def export_cuda_aot(ex_mod: Any, lib_path: Path, arch: str, work: Path) -> int:
    """``export_library`` with the CUDA kernels compiled to a fatbin now (not at load)."""
    from tvm.runtime import _ffi_api

    cuda_mod = find_cuda_module(ex_mod)
    if cuda_mod is None:
        ex_mod.export_library(str(lib_path))
        return 0
    source = str(cuda_mod.inspect_source("cuda"))
    fatbin = nvcc_fatbin(source, arch, work)

    def fpack(mod: Any, is_system_lib: bool, prefix: str, workspace_dir: str) -> str:
        packed_c = str(_ffi_api.ModulePackImportsToC(mod, is_system_lib, prefix))
        sym = packed_c.split("const unsigned char ", 1)[1].split("[", 1)[0]
        blob = patch_library_bin(_blob_from_packed_c(packed_c), source, fatbin)
        blob_path = Path(workspace_dir) / "devc_aot.bin"
        blob_path.write_bytes(blob)
        path = os.path.join(workspace_dir, "devc_aot.S")
        Path(path).write_text(_asm_blob(sym, blob_path))
        return path

    ex_mod.export_library(str(lib_path), fpack_imports=fpack)
    return len(fatbin)


# --------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------
@dataclass
class CudaBuild:
    """Result of :func:`build_cuda`: the sidecar fields it adds."""

    meta: dict[str, Any]


def _summary(log: ScheduleLog, cuda_src: str, n_int8: int, n_qdq: int, arch: str, tensorize: bool) -> dict:
    funcs = set(log.rule)
    kernels = kernel_sources(cuda_src)
    src_tc: dict[str, bool] = {}
    for kname, ksrc in kernels.items():
        owner = _kernel_owner(kname, funcs)
        if owner is not None:
            src_tc[owner] = src_tc.get(owner, False) or _uses_tensor_cores_src(ksrc)
    gemms = sorted(f for f in funcs if log.int8_gemm.get(f))
    per_gemm = {
        f: {
            "rule": log.rule[f],
            "tensor_cores": bool(log.tensor_cores.get(f)),
            "tensor_cores_in_source": bool(src_tc.get(f)),
        }
        for f in gemms
    }
    n_tc = sum(1 for v in per_gemm.values() if v["tensor_cores"])
    tc_possible = has_int8_tensor_cores(arch)
    if not gemms:
        strategy = "none (no int8 GEMM in graph)"
    elif n_tc == len(gemms):
        strategy = "cuda: int8 tensor cores (WMMA m16n16k16, int32 accumulate) for every int8 GEMM"
    elif n_tc:
        strategy = f"cuda: int8 tensor cores for {n_tc} of {len(gemms)} int8 GEMMs, SIMT for the rest"
    else:
        why = (
            f" ({arch} has no int8 tensor cores)"
            if not tc_possible
            else ("" if tensorize else " (tensorize disabled: tvm-ffi ToJSONGraph crash)")
        )
        strategy = f"cuda: dlight SIMT matmul, int8 loads, int32 accumulate on CUDA cores{why}"
    return {
        "int8_matmul_strategy": strategy,
        "qdq_matmuls_to_int8": n_qdq,
        "schedule": {
            "rule_order": [r for r in RULE_ORDER if r != "int8_wmma" or (tensorize and tc_possible)],
            "functions": len(funcs),
            "by_rule": dict(sorted(Counter(log.rule.values()).items())),
            "rule_of": dict(sorted(log.rule.items())),
            "needed_fallback": {k: log.failed[k] for k in sorted(log.failed)},
        },
        "tensor_cores": {
            "arch_has_int8_tensor_cores": tc_possible,
            "int8_gemm_functions": len(gemms),
            "on_tensor_cores": n_tc,
            "functions": per_gemm,
            "source_kernels_with_mma": sum(1 for k in kernels.values() if _uses_tensor_cores_src(k)),
            "source_kernels": len(kernels),
        },
        "int8_matmuls": n_int8,
    }


def build_cuda(mod: Any, target: Any, lib_path: Path, work: Path, *, n_int8: int) -> CudaBuild:
    """Compile a Relax module for a CUDA target into ``lib_path`` (kernels as an nvcc fatbin).

    ``n_int8`` counts the MatMulInteger GEMMs already rewritten to int8 matmuls. Every failure
    is one :class:`BackendError` line.
    """
    import tvm

    arch = str(target.attrs.get("arch", "sm_75"))
    tensorize = tensorize_works()
    mod, n_qdq = qdq_matmul_rewrite(mod)
    log = ScheduleLog()
    rules = dlight_rules(tensor_cores=tensorize and has_int8_tensor_cores(arch))
    t0 = time.perf_counter()
    try:
        with cheap_inspect_stack():
            ex = tvm.compile(mod, target, relax_pipeline=cuda_pipeline(target, rules, log, tensorize))
    except BackendError:
        raise
    except Exception as exc:  # noqa: BLE001 - tvm raises many types; report one line
        if log.fatal is not None:
            raise BackendError(log.fatal) from None
        raise BackendError(f"TVM CUDA build failed for {arch}: {one_line(exc)}") from None
    t1 = time.perf_counter()
    cuda_mod = find_cuda_module(ex.mod)
    cuda_src = str(cuda_mod.inspect_source("cuda")) if cuda_mod is not None else ""
    fatbin_bytes = export_cuda_aot(ex.mod, lib_path, arch, work)
    meta = _summary(log, cuda_src, n_int8, n_qdq, arch, tensorize)
    meta["cuda_build_seconds"] = {
        "compile": round(t1 - t0, 2),
        "of_which_schedule": round(log.seconds["schedule"], 2),
        "of_which_verify": round(log.seconds["verify"], 2),
        "nvcc_and_export": round(time.perf_counter() - t1, 2),
    }
    meta["cuda_aot"] = {"compiler": "nvcc", "format": "fatbin", "bytes": fatbin_bytes}
    meta["tensorize"] = tensorize
    return CudaBuild(meta=meta)

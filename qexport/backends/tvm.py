"""Apache TVM backend: integer ONNX -> Relax -> ``lib.so`` (+ ``tvm.json`` sidecar).

Contract
--------
``TVMBackend().compile(model.onnx, out_dir, target=..., shapes=...)`` writes, atomically
(temp dir + ``os.replace``), a directory holding

* ``lib.so``  -- the Relax VM executable exported with ``export_library``; for CUDA targets
  the kernels are compiled ahead of time with ``nvcc`` to a fatbin and packed into the
  library, so loading it needs the CUDA driver only (no NVRTC, no nvcc);
* ``tvm.json`` -- sidecar: tvm / tvm-ffi versions, target, shapes (``None`` = dynamic),
  input/output names and dtypes, build seconds, library bytes, host CPU features and the
  int8 GEMM strategy actually used.

``target``: ``"llvm"`` (host CPU: ``-mcpu`` = the LLVM host CPU name, ``-mattr`` switching
off what that name implies but ``/proc/cpuinfo`` does not show; AVX-512/VNNI are recorded),
``"cuda"`` (sm_75 unless ``arch`` is given in a JSON dict), ``"t4"`` (``nvidia/nvidia-t4``,
sm_75), ``"h100"`` (sm_90) or a JSON dict string such as
``'{"kind": "cuda", "arch": "sm_80"}'``.
``shapes``: ``{"batch": 8, "seq": 128}`` builds static shapes (the runner then rejects any
other shape with ``built for batch=8,seq=128; got ...``); ``None`` keeps the ONNX symbolic
dims (Relax handles dynamic batch/seq).

Integer semantics: ``MatMulInteger`` (int8 x int8 -> int32) is imported by TVM as an int32
matmul of widened operands; we rewrite it back to ``matmul(int8, int8, out_dtype=int32)`` so
GPU schedules can use int8 tensor cores (WMMA m16n16k16, int32 accumulation). All other ops
go through TVM's ONNX frontend unchanged. Integer division by zero kills the process
(SIGFPE): the graph contract requires guarded divisors.

CUDA targets are built by ``qexport.backends.tvm_cuda`` (per-PrimFunc dlight scheduling with
GPU verification, int8 tensor cores, nvcc ahead of time); it records what it did in the
sidecar (``schedule``, ``tensor_cores``, ``cuda_aot``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.backends.base import Backend, Runner
from qexport.backends.tvm_cuda import NVCC_DEFAULT, build_cuda, tensorize_works
from qexport.backends.tvm_cuda import cheap_inspect_stack as _cheap_inspect_stack
from qexport.backends.tvm_cuda import patch_library_bin as _patch_library_bin
from qexport.errors import BackendError
from qexport.host import cpu_flags
from qexport.io import atomic_directory

__all__ = [
    "NVCC_DEFAULT",
    "TVMBackend",
    "TVMRunner",
    "_cheap_inspect_stack",
    "_patch_library_bin",
    "tensorize_works",
]

LIB_NAME = "lib.so"
SIDECAR_NAME = "tvm.json"

_TARGET_ALIASES: dict[str, Any] = {
    "cuda": {"kind": "cuda", "arch": "sm_75"},
    "t4": "nvidia/nvidia-t4",
    "h100": {"kind": "cuda", "arch": "sm_90"},
}
_ONNX_TO_NP = {
    1: "float32",
    2: "uint8",
    3: "int8",
    5: "int16",
    6: "int32",
    7: "int64",
    9: "bool",
    10: "float16",
    11: "float64",
}


# --------------------------------------------------------------------------------------------
# helpers that need no tvm
# --------------------------------------------------------------------------------------------
def _resolve_target_spec(target: str | Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Map the CLI target spelling to a tvm Target argument plus sidecar notes."""
    notes: dict[str, Any] = {"requested": target if isinstance(target, str) else dict(target)}
    spec: Any
    if isinstance(target, Mapping):
        spec = dict(target)
    elif target == "llvm":
        import tvm

        cpu = str(tvm.target.codegen.llvm_get_system_cpu())
        flags = cpu_flags()
        notes["host_cpu"] = cpu
        notes["host_features"] = sorted(
            f for f in flags if f in {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8"}
        )
        spec = {"kind": "llvm"}  # tvm_cpu.llvm_target_spec: mcpu = the host, mattr = what it lacks
    elif target in _TARGET_ALIASES:
        spec = _TARGET_ALIASES[target]
    elif target.strip().startswith("{"):
        try:
            spec = json.loads(target)
        except json.JSONDecodeError as exc:
            raise BackendError(f"bad tvm target JSON {target!r}: {exc}") from None
    else:
        spec = target  # a tvm tag or target string; tvm validates it
    return spec, notes


def _shape_dict(model: Any, shapes: Mapping[str, int] | None) -> tuple[dict[str, list[Any]], list[dict]]:
    """Input shapes for ``from_onnx`` plus the ordered input signature for the sidecar."""
    inputs: list[dict[str, Any]] = []
    shape_dict: dict[str, list[Any]] = {}
    init_names = {t.name for t in model.graph.initializer}
    for vi in model.graph.input:
        if vi.name in init_names:
            continue
        tt = vi.type.tensor_type
        dims: list[Any] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif shapes is not None:
                if d.dim_param not in shapes:
                    raise BackendError(
                        f"input {vi.name!r} has symbolic dim {d.dim_param!r}; give it in shapes "
                        f"(got {sorted(shapes)})"
                    )
                dims.append(int(shapes[d.dim_param]))
            else:
                dims.append(d.dim_param or "?")
        shape_dict[vi.name] = dims
        inputs.append(
            {"name": vi.name, "dtype": _ONNX_TO_NP.get(tt.elem_type, str(tt.elem_type)), "shape": dims}
        )
    return shape_dict, inputs


def _flatten_onnx(model: Any) -> Any:
    """Inline ONNX functions and fold what TVM's importer rejects (Constant(value_int), ...)."""
    from qexport.export.exporter import inline_and_fold

    model = inline_and_fold(model)
    _drop_zero_zero_points(model)
    left = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if left:
        raise BackendError(f"ONNX graph still has non-standard ops after inlining: {left}")
    return model


def _drop_zero_zero_points(model: Any) -> int:
    """Remove all-zero constant zero points from MatMulInteger nodes (exact; in place).

    TVM imports ``MatMulInteger(a, b, zp_a, zp_b)`` as ``(a - zp_a) @ (b - zp_b)`` in int32;
    without the (zero) subtractions the int8 x int8 -> int32 rewrite below can match.
    """
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    dropped = 0
    for node in model.graph.node:
        if node.op_type != "MatMulInteger" or len(node.input) <= 2:
            continue
        zps = list(node.input[2:])
        if all(z == "" or (z in consts and not np.any(consts[z])) for z in zps):
            del node.input[2:]
            dropped += 1
    return dropped


# --------------------------------------------------------------------------------------------
# tvm-side passes
# --------------------------------------------------------------------------------------------
def _int8_matmul_rewrite(mod: Any) -> tuple[Any, int]:
    """``matmul(astype(a:int8,int32), astype(b:int8,int32))`` -> ``matmul(a, b, out_dtype=int32)``.

    Exact: the product of two int8 values widened to int32 is the same either way; TVM's
    legalized matmul widens inside the reduction. Returns the module and the rewrite count.
    """
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    a, b = wildcard(), wildcard()
    ca, cb = is_op("relax.astype")(a), is_op("relax.astype")(b)
    pattern = is_op("relax.matmul")(ca, cb)
    count = 0

    def _dtype(expr: Any) -> str:
        dt = expr.ty.dtype
        return str(getattr(dt, "dtype", dt))

    def rewriter(expr: Any, matches: Any) -> Any:
        nonlocal count
        xa, xb = matches[a], matches[b]
        if (_dtype(xa), _dtype(xb), _dtype(expr)) != ("int8", "int8", "int32"):
            return expr
        count += 1
        return relax.op.matmul(xa, xb, out_dtype="int32")

    new_funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, relax.Function):
            new_funcs[gv] = rewrite_call(pattern, rewriter, func)
    for gv, func in new_funcs.items():
        mod[gv] = func
    return mod, count


def _to_py(obj: Any) -> Any:
    """tvm-ffi containers (Map/Array/IntImm/String) -> plain JSON-able Python."""
    if isinstance(obj, (bool, int, float, str)) or obj is None:
        return obj
    if hasattr(obj, "items"):
        return {str(k): _to_py(v) for k, v in obj.items()}
    if hasattr(obj, "value") and isinstance(obj.value, (int, float, bool)):
        return obj.value
    if isinstance(obj, (list, tuple)) or hasattr(obj, "__len__") and hasattr(obj, "__getitem__"):
        return [_to_py(v) for v in obj]
    return str(obj)


def _matmul_strategy(is_cuda: bool, n_int8: int) -> str:
    """The llvm strategy; CUDA builds replace it with ``tvm_cuda``'s per-function record."""
    if n_int8 == 0:
        return "none (no MatMulInteger in graph)"
    if not is_cuda:
        return "llvm: int8 x int8 -> int32 matmul, LLVM auto-vectorised (int32 accumulate)"
    return "cuda: see schedule / tensor_cores"


# --------------------------------------------------------------------------------------------
# backend
# --------------------------------------------------------------------------------------------
class TVMRunner(Runner):
    """Relax VM over an exported ``lib.so``; outputs keyed by ONNX output names."""

    def __init__(self, artifact: Path, device: str) -> None:
        import tvm
        from tvm import relax

        self.meta = json.loads((artifact / SIDECAR_NAME).read_text())
        self.inputs = {i["name"]: i for i in self.meta["inputs"]}
        self.input_names = tuple(i["name"] for i in self.meta["inputs"])  # VM argument order
        self.output_names = list(self.meta["outputs"])
        if device == "cuda" and self.meta["device"] != "cuda":
            raise BackendError(f"{artifact} was built for {self.meta['device']}, not cuda")
        if device == "cpu" and self.meta["device"] != "cpu":
            raise BackendError(f"{artifact} was built for {self.meta['device']}; load it with cuda")
        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        try:
            lib = tvm.runtime.load_module(str(artifact / LIB_NAME))
            self.vm = relax.VirtualMachine(lib, self.dev)
        except Exception as exc:  # noqa: BLE001 - tvm raises many types; report one line
            raise BackendError(
                f"cannot load {artifact / LIB_NAME} on {device}: {str(exc).strip().splitlines()[-1]}"
            ) from None
        self._tensor = tvm.runtime.tensor

    def _check_shapes(self, feeds: Mapping[str, np.ndarray]) -> None:
        shapes = self.meta.get("shapes")
        for name in self.input_names:
            want = self.inputs[name]["shape"]
            got = list(np.shape(feeds[name]))
            ok = len(got) == len(want) and all(
                not isinstance(w, int) or w == g for w, g in zip(want, got, strict=False)
            )
            if not ok:
                if shapes:
                    built = ",".join(f"{k}={v}" for k, v in shapes.items())
                    raise BackendError(
                        f"built for {built}; got {name} shape {tuple(got)}",
                        hint="recompile with matching shapes or shapes=None",
                    )
                raise BackendError(f"input {name} must have shape {want}; got {tuple(got)}")

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._check_shapes(feeds)
        args = [
            self._tensor(np.ascontiguousarray(feeds[n], dtype=self.inputs[n]["dtype"]), self.dev)
            for n in self.input_names
        ]
        out = self.vm["main"](*args)
        outs = list(out) if not hasattr(out, "numpy") else [out]
        if len(outs) != len(self.output_names):
            raise BackendError(f"model returned {len(outs)} outputs; expected {self.output_names}")
        return {n: o.numpy() for n, o in zip(self.output_names, outs, strict=True)}

    def synchronize(self) -> None:
        self.dev.sync()


class TVMBackend(Backend):
    """Apache TVM (Relax) backend: ``llvm`` CPU or CUDA (ahead-of-time nvcc)."""

    name = "tvm"
    install_hint = "pip install apache-tvm apache-tvm-ffi==0.1.14.post0"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import tvm
        except Exception as exc:  # noqa: BLE001 - any import failure means unavailable
            return False, f"apache-tvm not importable ({exc}); {cls.install_hint}"
        return True, str(tvm.__version__)

    def _compile_impl(self, model: Path, output: Path | None, **options: Any) -> Path:
        target_opt = options.pop("target", "llvm")
        shapes = options.pop("shapes", None)
        schedule = bool(options.pop("schedule", os.environ.get("QEXPORT_TVM_SCHEDULE", "1") != "0"))
        tune = int(options.pop("tune", 0) or 0)
        tune_db = options.pop("tune_db", None)
        if options:
            raise BackendError(f"unknown tvm compile options {sorted(options)}")
        if shapes is not None:
            shapes = {str(k): int(v) for k, v in dict(shapes).items()}
            if any(v <= 0 for v in shapes.values()):
                raise BackendError(f"shapes must be positive, got {shapes}")
        if tune < 0:
            raise BackendError(f"tune must be >= 0 trials, got {tune}")
        if tune and shapes is None:
            raise BackendError(
                "tuning needs static shapes", hint="give shapes, e.g. --shapes batch=8,seq=128"
            )
        out_dir = Path(output) if output is not None else model.with_suffix("").with_name(model.stem + "_tvm")
        t0 = time.time()

        import onnx
        import tvm
        import tvm.support.nvcc  # noqa: F401 - registers the CUDA compile callback
        import tvm_ffi
        from tvm.relax.frontend.onnx import from_onnx

        spec, notes = _resolve_target_spec(target_opt)
        if isinstance(spec, Mapping) and spec.get("kind") == "llvm":
            from qexport.backends import tvm_cpu

            spec = tvm_cpu.llvm_target_spec(spec)
        try:
            target = tvm.target.Target(spec)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"bad tvm target {target_opt!r}: {str(exc).splitlines()[-1]}") from None
        is_cuda = target.kind.name == "cuda"
        if (tune or tune_db is not None) and target.kind.name != "llvm":
            raise BackendError(f"tuning is implemented for llvm targets only, not {target.kind.name}")

        onnx_model = _flatten_onnx(onnx.load(str(model)))
        shape_dict, inputs = _shape_dict(onnx_model, shapes)
        outputs = [o.name for o in onnx_model.graph.output]
        try:
            mod = from_onnx(
                onnx_model, shape_dict=shape_dict if shapes is not None else None, keep_params_in_input=False
            )
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"TVM ONNX import failed: {str(exc).strip().splitlines()[-1]}") from None
        mod, n_int8 = _int8_matmul_rewrite(mod)

        tensorize = False
        with atomic_directory(out_dir) as tmp:
            cuda_meta: dict[str, Any] = {}
            cpu_meta: dict[str, Any] = {}
            if is_cuda:
                cuda_meta = build_cuda(mod, target, tmp / LIB_NAME, tmp, n_int8=n_int8).meta
            else:
                cpu_meta = self._compile_llvm(
                    mod, target, model, out_dir, tmp,
                    shapes=shapes, schedule=schedule, tune=tune, tune_db=tune_db,
                )
            meta = {
                "backend": "tvm",
                "tvm_version": str(tvm.__version__),
                "tvm_ffi_version": str(getattr(tvm_ffi, "__version__", "?")),
                "target": _to_py(target.export()),
                "target_notes": notes,
                "device": "cuda" if is_cuda else "cpu",
                "arch": str(target.attrs.get("arch", "")) if is_cuda else None,
                "shapes": shapes,
                "inputs": inputs,
                "outputs": outputs,
                "onnx": str(model),
                "build_seconds": round(time.time() - t0, 3),
                "library_bytes": (tmp / LIB_NAME).stat().st_size,
                "cuda_aot": None,
                "int8_matmuls": n_int8,
                "tensorize": tensorize,
                "int8_matmul_strategy": _matmul_strategy(is_cuda, n_int8),
                "host": platform.machine(),
            }
            meta.update(cuda_meta)  # CUDA: schedule rules, tensor cores, nvcc fatbin (tvm_cuda)
            meta.update(cpu_meta)  # llvm: schedule rules, int8 GEMM kernels, tuning (tvm_cpu)
            (tmp / SIDECAR_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        return out_dir

    @staticmethod
    def _compile_llvm(
        mod: Any,
        target: Any,
        model: Path,
        out_dir: Path,
        tmp: Path,
        *,
        shapes: dict[str, int] | None,
        schedule: bool,
        tune: int,
        tune_db: Path | str | None,
    ) -> dict[str, Any]:
        """The llvm build (:mod:`qexport.backends.tvm_cpu`): writes ``tmp/lib.so``; sidecar fields."""
        import tvm

        from qexport.backends import tvm_cpu

        info = tvm_cpu.BuildInfo()
        tuning: dict[str, Any] | None = None
        database = None
        if schedule:
            mod = tvm_cpu.prepare(mod, target, info, frozenset(cpu_flags()))
        mod = tvm_cpu.fused(mod, target, info if schedule else None)
        if tune or tune_db is not None:
            key = tvm_cpu.tune_key(target, shapes)
            default_db = tune_db is None or Path(tune_db).resolve() == (out_dir / "tune-db").resolve()
            db_dir = tmp / "tune-db" if default_db else Path(tune_db)  # type: ignore[arg-type]
            if default_db and (out_dir / "tune-db").is_dir():
                shutil.copytree(out_dir / "tune-db", db_dir)
            if tune:
                database = tvm_cpu.tune(mod, target, db_dir, tune, key)
            else:
                database = tvm_cpu.open_database(db_dir, key, create=False)
            tuning = {
                "trials": tune,
                "db": str(out_dir / "tune-db" if default_db else Path(str(tune_db))),
                "shapes": shapes if shapes is not None else "dynamic",
                "applied": database is not None,
            }
        pipeline = tvm_cpu.cpu_pipeline(target, info, schedule=schedule, database=database)
        ex = tvm.compile(mod, target, relax_pipeline=pipeline)
        ex.export_library(str(tmp / LIB_NAME))
        out: dict[str, Any] = info.as_json() if schedule else {"cpu_schedules": None}
        out["tuning"] = tuning
        if info.gemm_summary:
            out["int8_matmul_strategy"] = (
                f"llvm: qexport int8 GEMM kernels, int32 accumulate ({info.gemm_summary})"
            )
        elif schedule and info.rules.get("matmul"):
            out["int8_matmul_strategy"] = (
                "llvm: generic matmul schedule (4 rows x one vector of columns, parallel rows, "
                "int32 accumulate)"
            )
        return out

    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner:
        if options:
            raise BackendError(f"unknown tvm load options {sorted(options)}")
        if artifact.is_file():
            artifact = artifact.parent
        if not (artifact / SIDECAR_NAME).is_file() or not (artifact / LIB_NAME).is_file():
            raise BackendError(f"{artifact} is not a tvm artifact (needs {LIB_NAME} and {SIDECAR_NAME})")
        return TVMRunner(artifact, device)

# mypy: disallow-untyped-defs, disallow-incomplete-defs, disallow-untyped-calls, warn-return-any
# mypy: disallow-any-generics, no-implicit-reexport, strict-equality, check-untyped-defs
"""TensorRT 10 backend: lint, engine build (``.plan``) and a torch-CUDA runner.

``compile(model.onnx, out.plan, precision=..., shapes=..., workspace_mb=..., timing_cache=...)``

1. :func:`~qexport.backends.trt_support.check_graph` lints the ONNX against TensorRT 10's
   ONNX-parser support matrix; any finding of severity "error" makes compile refuse with a
   :class:`BackendError` listing them (``check_only=True`` returns after the lint).
2. Builds with the TensorRT 10 Python API. ``int8``: a STRONGLY_TYPED network, precision
   comes from the graph's Q/DQ nodes (explicit quantization; no INT8 builder flag, no
   calibrator). ``fp32``: STRONGLY_TYPED too (types exactly as exported), TF32 cleared.
   ``fp16``: a weakly typed network with ``BuilderFlag.FP16`` so TensorRT may run float
   layers in half precision (alternatively export the ONNX in fp16 and build it as fp32:
   strongly typed keeps the exported fp16). Integer layers stay int32 in every mode.
3. One optimization profile from ``shapes`` ("batch=1:8:32,seq=16:128:256", min:opt:max;
   keys are the ONNX ``dim_param`` names or, for rank-2 inputs, ``batch``/``seq`` by
   position), a WORKSPACE memory-pool limit, an optional timing cache (loaded if present,
   saved after the build), ``build_serialized_network``, an atomic ``.plan`` write and a
   JSON sidecar ``<plan>.json`` (TensorRT version, GPU, precision, shapes, build seconds,
   engine bytes, lint warnings).

``load(plan, device="cuda")`` returns a :class:`TRTRunner`: ``trt.Runtime`` deserializes the
engine, inputs are copied to torch CUDA tensors (``set_input_shape`` + ``set_tensor_address``),
outputs are torch CUDA tensors sized from the context, ``execute_async_v3`` runs on a torch
CUDA stream; results come back as numpy arrays.

``tensorrt`` and ``torch.cuda`` are imported inside functions only; a missing ``tensorrt``
raises ``BackendError("TensorRT is not installed: build in docker/Dockerfile.trt")``.

Type checking: the first two lines switch this module to strict-mode flags. The
``tensorrt-stubs`` wheel (10.13.0.35.1) installs ``tensorrt/__init__.pyi`` and
``tensorrt_bindings/*.pyi`` without a ``py.typed`` marker, and its ``tensorrt_bindings/tensorrt.pyi``
does not parse (parameters named ``in``; a non-default parameter after defaults) and declares
a module-level ``bool: DataType`` that shadows the builtin in every ``-> bool``. So mypy
ignores the stubs unless they are copied, fixed, into a ``mypy_path`` directory:
``tools/patch_trt_stubs.py`` does that (``make venv`` runs it), and ``[tool.mypy]`` in
``pyproject.toml`` points ``mypy_path`` there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from qexport.backends.base import Backend, Runner
from qexport.backends.trt_support import Finding, check_onnx_file, errors_only, format_findings
from qexport.errors import BackendError
from qexport.io import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    import tensorrt as trt

__all__ = [
    "DEFAULT_SHAPES",
    "PRECISIONS",
    "ShapeRange",
    "TRTBackend",
    "TRTRunner",
    "check_onnx_file",
    "format_findings",
    "parse_shapes",
]

MISSING_MESSAGE = "TensorRT is not installed: build in docker/Dockerfile.trt"
PRECISIONS = ("int8", "fp16", "fp32")
DEFAULT_SHAPES = "batch=1:8:32,seq=16:128:256"
DEFAULT_WORKSPACE_MB = 4096
_POSITIONAL_DIM_NAMES = ("batch", "seq")


def _require_trt() -> str:
    """TensorRT's version, or BackendError when the module cannot be imported."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendError(MISSING_MESSAGE, hint="TensorRT's wheels need NVIDIA's index and a GPU") from exc
    # tensorrt-stubs alone installs a `tensorrt/` folder of .pyi files, which imports as an empty
    # namespace package: treat that as "not installed".
    version = getattr(trt, "__version__", None)
    if version is None or getattr(trt, "Builder", None) is None:
        raise BackendError(MISSING_MESSAGE, hint="only type stubs (tensorrt-stubs) are importable here")
    return str(version)


@dataclass(frozen=True)
class ShapeRange:
    min: int
    opt: int
    max: int


def parse_shapes(spec: str) -> dict[str, ShapeRange]:
    """Parse ``"batch=1:8:32,seq=16:128:256"``; BackendError unless 1 <= min <= opt <= max."""
    out: dict[str, ShapeRange] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z_][\w.\-]*)\s*=\s*(\d+):(\d+):(\d+)", part)
        if m is None:
            raise BackendError(f"bad shape range {part!r}: expected NAME=MIN:OPT:MAX, e.g. {DEFAULT_SHAPES}")
        lo, opt, hi = (int(m.group(i)) for i in (2, 3, 4))
        if not 1 <= lo <= opt <= hi:
            raise BackendError(f"bad shape range {part!r}: need 1 <= min <= opt <= max")
        if m.group(1) in out:
            raise BackendError(f"shape range for {m.group(1)!r} given twice")
        out[m.group(1)] = ShapeRange(lo, opt, hi)
    if not out:
        raise BackendError(f"empty shape spec: expected e.g. {DEFAULT_SHAPES}")
    return out


def _input_profiles(
    model: onnx.ModelProto, shapes: Mapping[str, ShapeRange]
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """(min, opt, max) dims for every graph input, dynamic dims resolved through ``shapes``."""
    inits = {i.name for i in model.graph.initializer}
    used: set[str] = set()
    profiles: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        dims = inp.type.tensor_type.shape.dim
        lo: list[int] = []
        opt: list[int] = []
        hi: list[int] = []
        for pos, d in enumerate(dims):
            if d.HasField("dim_value") and d.dim_value > 0:
                lo.append(d.dim_value)
                opt.append(d.dim_value)
                hi.append(d.dim_value)
                continue
            keys = [d.dim_param] if d.dim_param else []
            if len(dims) == 2:
                keys.append(_POSITIONAL_DIM_NAMES[pos])
            key = next((k for k in keys if k in shapes), None)
            if key is None:
                raise BackendError(
                    f"input {inp.name!r} dim {pos} is dynamic ({d.dim_param or '?'}) but --shapes has "
                    f"no range for {' or '.join(repr(k) for k in keys) or 'it'}"
                )
            used.add(key)
            r = shapes[key]
            lo.append(r.min)
            opt.append(r.opt)
            hi.append(r.max)
        profiles[inp.name] = (tuple(lo), tuple(opt), tuple(hi))
    unknown = sorted(set(shapes) - used)
    if unknown:
        raise BackendError(f"--shapes names {unknown} match no dynamic input dimension of the model")
    return profiles


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return str(torch.cuda.get_device_name(0))
    except Exception:  # torch without CUDA support, driver problems
        pass
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6

        err, props = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = props.name
            return name.decode(errors="replace").rstrip("\0") if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return None


def _parser_errors(parser: trt.OnnxParser) -> str:
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        where = (
            f"node {err.node()} {err.node_name()!r} ({err.node_operator()})" if err.node() >= 0 else "model"
        )
        lines.append(f"{where}: {err.desc()}")
    return "; ".join(lines) or "unknown parser error"


class TRTBackend(Backend):
    """``qexport trt``: TensorRT 10 engines from integer (QDQ) or float ONNX."""

    name = "trt"
    install_hint = "build in docker/Dockerfile.trt"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            return True, _require_trt()
        except BackendError as exc:
            return False, exc.message

    @staticmethod
    def check(model: Path | str) -> list[Finding]:
        """Lint only (no TensorRT needed): :func:`check_onnx_file`."""
        return check_onnx_file(model)

    def compile(self, model: Path, output: Path | None = None, **options: Any) -> Path:
        """Lint first (needs no TensorRT; refuses on errors), then :meth:`Backend.compile`.

        ``check_only=True``: only the lint; returns ``model`` unchanged.
        """
        model = Path(model)
        if not model.is_file():
            raise BackendError(f"ONNX model not found: {model}")
        findings = self._lint(model)
        if options.pop("check_only", False):
            return model
        # option errors before TensorRT is required: they are the user's to fix anywhere
        if str(options.get("precision", "int8")) not in PRECISIONS:
            raise BackendError(
                f"unknown precision {options['precision']!r}: choose one of {list(PRECISIONS)}"
            )
        parse_shapes(str(options.get("shapes", DEFAULT_SHAPES)))
        return super().compile(model, output, _lint_findings=findings, **options)

    @staticmethod
    def _lint(model: Path) -> list[Finding]:
        findings = check_onnx_file(model)
        errs = errors_only(findings)
        if errs:
            raise BackendError(
                f"{model} has {len(errs)} node(s) TensorRT cannot build:\n{format_findings(findings)}",
                hint="re-export for TensorRT (qexport onnx --linear qdq) or use the ort/tvm backend",
            )
        return findings

    def _compile_impl(self, model: Path, output: Path | None, **options: Any) -> Path:
        precision = str(options.pop("precision", "int8"))
        shapes_spec = str(options.pop("shapes", DEFAULT_SHAPES))
        workspace_mb = int(options.pop("workspace_mb", DEFAULT_WORKSPACE_MB))
        cache_opt = options.pop("timing_cache", None)
        timing_cache = None if cache_opt is None else Path(cache_opt)
        verbose = bool(options.pop("verbose", False))
        pre_lint = options.pop("_lint_findings", None)
        findings: list[Finding] = self._lint(model) if pre_lint is None else list(pre_lint)
        if options:
            raise BackendError(f"unknown trt compile options {sorted(options)}")
        if precision not in PRECISIONS:
            raise BackendError(f"unknown precision {precision!r}: choose one of {list(PRECISIONS)}")
        if workspace_mb <= 0:
            raise BackendError(f"workspace must be a positive number of MiB, got {workspace_mb}")
        shapes = parse_shapes(shapes_spec)
        out = output if output is not None else model.with_suffix(".plan")

        onnx_model = onnx.load(str(model), load_external_data=False)
        profiles = _input_profiles(onnx_model, shapes)
        if precision == "int8" and not any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx_model.graph.node
        ):
            raise BackendError(
                "precision int8 needs an explicitly quantized (Q/DQ) graph",
                hint="export with qexport onnx --linear qdq, or build with --precision fp16/fp32",
            )

        import tensorrt as trt

        logger = trt.Logger(trt.Logger.VERBOSE if verbose else trt.Logger.WARNING)
        builder = trt.Builder(logger)
        strongly_typed = precision in ("int8", "fp32")
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(model)):
            raise BackendError(f"TensorRT's ONNX parser rejected {model}: {_parser_errors(parser)}")

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
        if precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)

        profile = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            name = network.get_input(i).name
            if name not in profiles:
                raise BackendError(f"TensorRT network input {name!r} is not an ONNX graph input")
            lo, opt, hi = profiles[name]
            profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
        config.add_optimization_profile(profile)

        cache_bytes = (
            timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
        )
        if timing_cache is not None:
            cache = config.create_timing_cache(cache_bytes)
            config.set_timing_cache(cache, False)

        t0 = time.perf_counter()
        serialized = builder.build_serialized_network(network, config)
        build_s = time.perf_counter() - t0
        if serialized is None:
            raise BackendError(
                f"TensorRT failed to build an engine from {model} (see the TensorRT log above)"
            )
        plan = bytes(memoryview(serialized))
        atomic_write_bytes(out, plan)
        if timing_cache is not None:
            atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))

        sidecar = {
            "backend": "trt",
            "tensorrt_version": str(trt.__version__),
            "gpu": _gpu_name(),
            "onnx": str(model),
            "precision": precision,
            "strongly_typed": strongly_typed,
            "shapes": {k: [r.min, r.opt, r.max] for k, r in shapes.items()},
            "input_profiles": {k: [list(d) for d in v] for k, v in profiles.items()},
            "workspace_mb": workspace_mb,
            "timing_cache": None if timing_cache is None else str(timing_cache),
            "build_seconds": round(build_s, 3),
            "engine_bytes": len(plan),
            "lint_warnings": [str(f) for f in findings],
        }
        atomic_write_json(out.with_name(out.name + ".json"), sidecar)
        return out

    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner:
        if device != "cuda":
            raise BackendError("TensorRT engines run on CUDA only: use --device cuda")
        if options:
            raise BackendError(f"unknown trt load options {sorted(options)}")
        return TRTRunner(artifact)


class TRTRunner(Runner):
    """A deserialized engine plus one execution context and one torch CUDA stream."""

    def __init__(self, plan: Path) -> None:
        _require_trt()
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise BackendError("TensorRT needs a CUDA GPU; torch.cuda.is_available() is False")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if engine is None:
            raise BackendError(
                f"cannot deserialize TensorRT engine {plan} (built with another TensorRT or GPU?)"
            )
        self._engine = engine
        context = engine.create_execution_context()
        if context is None:
            raise BackendError(f"cannot create an execution context for {plan}")
        self._context = context
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT)
        self.output_names = tuple(n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._torch_dtype = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        stream_type: Any = torch.cuda.Stream  # untyped constructor in torch's annotations
        self._stream = stream_type()

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ctx = self._context
        keep: list[torch.Tensor] = []
        with torch.cuda.stream(self._stream):
            for name in self.input_names:
                want = self._torch_dtype[name]
                arr = np.ascontiguousarray(feeds[name])
                host = torch.from_numpy(arr)
                if host.dtype != want:
                    if not host.dtype.is_floating_point and not want.is_floating_point:
                        info = torch.iinfo(want)
                        if arr.size and (arr.min() < info.min or arr.max() > info.max):
                            raise BackendError(f"input {name!r} has values outside {want}")
                    host = host.to(want)
                dev = host.to("cuda", non_blocking=False)
                keep.append(dev)
                if not ctx.set_input_shape(name, tuple(int(s) for s in dev.shape)):
                    raise BackendError(
                        f"input {name!r} shape {tuple(dev.shape)} is outside the engine's profile"
                    )
                ctx.set_tensor_address(name, dev.data_ptr())
            outputs: dict[str, torch.Tensor] = {}
            for name in self.output_names:
                dims = ctx.get_tensor_shape(name)
                shape = tuple(int(dims[i]) for i in range(len(dims)))
                if any(s < 0 for s in shape):
                    raise BackendError(f"output {name!r} shape {shape} is unresolved: set every input shape")
                out = torch.empty(shape, dtype=self._torch_dtype[name], device="cuda")
                outputs[name] = out
                ctx.set_tensor_address(name, out.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise BackendError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        self._stream.synchronize()
        del keep
        return {name: t.cpu().numpy() for name, t in outputs.items()}

    def synchronize(self) -> None:
        import torch

        torch.cuda.synchronize()


def _torch_dtype(dt: trt.DataType) -> Any:
    import tensorrt as trt
    import torch

    table = {
        trt.DataType.FLOAT: torch.float32,
        trt.DataType.HALF: torch.float16,
        trt.DataType.BF16: torch.bfloat16,
        trt.DataType.INT32: torch.int32,
        trt.DataType.INT64: torch.int64,
        trt.DataType.INT8: torch.int8,
        trt.DataType.UINT8: torch.uint8,
        trt.DataType.BOOL: torch.bool,
    }
    if dt not in table:
        raise BackendError(f"TensorRT I/O tensor type {dt} has no torch equivalent")
    return table[dt]

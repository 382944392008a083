"""ONNX Runtime backend: CPU here, CUDA when ``onnxruntime-gpu`` is installed.

:func:`make_session` is the one way qexport opens an ORT session (the backend, the report's
baselines, ``bench/cpu_latency.py``).

On CPU a spec-form model (``qexport onnx``) is loaded through
:func:`qexport.backends.ort_rewrite.rewrite_for_ort`: ORT runs an equivalent, faster graph built in
memory (bit-exact by construction; the file is untouched). ``load(..., rewrite=False)`` or
``QEXPORT_ORT_REWRITE=0`` runs the file exactly as exported.

The saved ORT-CPU form (``qexport onnx --form ort-cpu``, or ``compile(model, output)``) is that
rewritten graph written to a file that plain ``onnxruntime`` runs at the same speed. Its
``metadata_props`` record the form, the rewrites applied and the u8 x s8 policy:

``portable`` (the default)
    ``uint8 x int8`` matmuls only where AVX2's saturating ``vpmaddubsw`` provably cannot
    saturate (``2 max(a) max|w| <= 32767``), ``uint8 x uint8`` elsewhere: exact on any x86 CPU.
``vnni``
    ``uint8 x int8`` for every int8 matmul: exact only where MLAS accumulates u8 x s8 products
    straight into int32 (AVX512-VNNI, AVX-VNNI, AMX). Loading such a file through the backend on
    a CPU whose kernel is not exact (the probe :func:`~qexport.backends.ort_rewrite.exact_int8_gemms`)
    raises :class:`~qexport.errors.BackendError`; it never runs to a wrong answer.

Loading a saved ORT-CPU file does not rewrite it again.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.backends.base import Backend, Runner
from qexport.errors import BackendError
from qexport.io import atomic_path

#: ``metadata_props`` keys of the saved ORT-CPU form.
META_FORM, META_REWRITES, META_U8S8 = "qexport_form", "qexport_ort_rewrites", "qexport_ort_u8s8"
ORT_CPU_FORM = "ort-cpu"
#: Saved-form u8 x s8 policies -> the rewrite's matmul rule (see the module docstring).
U8S8_POLICIES = {"portable": "bounded", "vnni": "full"}


def make_session(model: Path | str | bytes, threads: int | None = None, device: str = "cpu", *,
                 qdq_fusion: bool = False, profile_prefix: str | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` (ORT_ENABLE_ALL, warnings off) on ``device``.

    ``threads``: intra-op threads (None: ORT's default). ``qdq_fusion``: let ORT fuse
    DequantizeLinear -> MatMul into its int8 GEMM (off for qexport's models: its AVX2 u8s8 kernel
    saturates int16 pair sums, so the fused QDQ form is not bit-exact; on for float and
    ``quantize_dynamic`` baselines, which run as ORT would run them). ``profile_prefix``: turn on
    ORT's profiler, writing ``PREFIX_*.json`` (read it after ``session.end_profiling()``).
    On CUDA the session must run on the CUDA provider (no silent CPU fallback).
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError(f"ONNX Runtime is not installed: {ORTBackend.install_hint}") from None

    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError("ONNX Runtime has no CUDA provider here: pip install onnxruntime-gpu")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    elif device != "cpu":
        raise BackendError(f"unknown device {device!r}: use cpu or cuda")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if not qdq_fusion:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    if threads:
        so.intra_op_num_threads = int(threads)
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    source = model if isinstance(model, bytes) else str(model)
    try:
        sess = ort.InferenceSession(source, so, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
        what = "the model" if isinstance(model, bytes) else str(model)
        raise BackendError(f"ONNX Runtime cannot load {what}: {str(exc).splitlines()[0]}") from None
    if device == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise BackendError("ONNX Runtime could not start its CUDA provider (CUDA/cuDNN libraries?)")
    return sess


class ORTRunner(Runner):
    """A session behind the ``Runner`` contract; int64 ids/mask in (qexport's inputs)."""

    def __init__(self, session: Any, rewrite_report: Any = None, form: Mapping[str, str] | None = None,
                 ) -> None:
        self.session = session
        #: what the rewrites did (:class:`~qexport.backends.ort_rewrite.RewriteReport`): at load
        #: for a spec file, as recorded for a saved ORT-CPU file; None when the file runs as exported
        self.rewrite_report = rewrite_report
        #: the saved form's metadata (``qexport_form``, ...), empty for a spec-form file
        self.form = dict(form or {})
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = [o.name for o in session.get_outputs()]

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {k: np.asarray(feeds[k], dtype=np.int64) for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


def form_metadata(model: Any) -> dict[str, str]:
    """The saved ORT-CPU form's ``metadata_props`` of an ``onnx.ModelProto`` (empty: not that form)."""
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(META_FORM) != ORT_CPU_FORM:
        return {}
    return {k: v for k, v in props.items() if k in (META_FORM, META_REWRITES, META_U8S8)}


def check_form_runs_exactly(meta: Mapping[str, str], where: str) -> None:
    """BackendError unless this CPU's int8 GEMMs are exact for what a saved ORT-CPU file uses."""
    from qexport.backends.ort_rewrite import exact_int8_gemms

    policy = meta.get(META_U8S8, "")
    if policy not in U8S8_POLICIES:
        raise BackendError(f"{where}: unknown u8s8 policy {policy!r} in its metadata "
                           f"(known: {', '.join(U8S8_POLICIES)})")
    applied = json.loads(meta.get(META_REWRITES, "{}") or "{}")
    exact = exact_int8_gemms()
    if policy == "vnni" and applied.get("matmul-u8s8") and "u8s8" not in exact:
        raise BackendError(
            f"{where} was written with --u8s8 vnni (uint8 x int8 matmuls for any operands), but this "
            "CPU's ONNX Runtime u8 x s8 kernel is not exact (no VNNI/AMX: AVX2 saturates int16 pair "
            "sums); re-export it with --u8s8 portable")
    if applied.get("matmul-u8u8") and "u8u8" not in exact:
        raise BackendError(f"{where}: this CPU's ONNX Runtime u8 x u8 kernel is not exact; "
                           "run the spec-form model instead (qexport onnx --form functions)")


def rewrite_to_ort_cpu(model: Any, u8s8: str = "portable") -> tuple[Any, Any]:
    """The saved ORT-CPU form of a spec-form ``onnx.ModelProto``: ``(model, RewriteReport)``.

    All rewrites on, the matmul rule from the ``u8s8`` policy, the metadata recorded. BackendError
    for an unknown policy or a model that is already in this form."""
    from qexport.backends.ort_rewrite import RewriteOptions, rewrite_for_ort

    if u8s8 not in U8S8_POLICIES:
        raise BackendError(f"unknown u8s8 policy {u8s8!r}: choose {' or '.join(U8S8_POLICIES)}")
    if form_metadata(model):
        raise BackendError("the model is already in the ORT-CPU form")
    new, report = rewrite_for_ort(model, RewriteOptions(u8s8=U8S8_POLICIES[u8s8]))
    if report.kept:
        raise BackendError(f"ORT-CPU form: qexport functions the rewrites do not cover: {report.summary()}")
    props = {p.key: p.value for p in new.metadata_props}
    props.update({META_FORM: ORT_CPU_FORM, META_U8S8: u8s8,
                  META_REWRITES: json.dumps(dict(sorted(report.applied.items())))})
    del new.metadata_props[:]
    for k, v in props.items():
        new.metadata_props.add(key=k, value=v)
    return new, report


def export_ort_cpu(checkpoint: Path | str, out: Path | str, u8s8: str = "portable", linear: str = "integer",
                   opset: int | None = None) -> Path:
    """Integer checkpoint -> the saved ORT-CPU form at ``out`` (atomic): the spec-form export
    (:func:`~qexport.export.exporter.export_onnx`, functions form) compiled by the ORT backend."""
    import tempfile

    from qexport.export.exporter import export_onnx

    if u8s8 not in U8S8_POLICIES:
        raise BackendError(f"unknown u8s8 policy {u8s8!r}: choose {' or '.join(U8S8_POLICIES)}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        spec = export_onnx(checkpoint, Path(tmp) / "model.functions.onnx", form="functions", linear=linear,
                           opset=opset)
        return ORTBackend().compile(spec, out, u8s8=u8s8)


class ORTBackend(Backend):
    name = "ort"
    install_hint = "pip install onnxruntime (CPU) or onnxruntime-gpu (CUDA)"

    @classmethod
    def available(cls) -> tuple[bool, str]:
        try:
            import onnxruntime
        except ImportError:
            return False, f"ONNX Runtime is not installed: {cls.install_hint}"
        return True, str(onnxruntime.__version__)

    def _compile_impl(self, model: Path, output: Path | None, **options: Any) -> Path:
        """Write the saved ORT-CPU form of ``model`` to ``output`` (atomic) and check that ORT loads
        it; without ``output``, only check that ORT loads ``model``.

        Options: ``u8s8`` (``portable``, the default, or ``vnni``). A model already in the
        ORT-CPU form is copied as it is."""
        import onnx

        if output is None or Path(output) == model:
            make_session(model, 1)
            return model
        u8s8 = str(options.get("u8s8") or "portable")
        proto = self._read(model)
        if form_metadata(proto):
            new = proto
        else:
            try:
                new, _ = rewrite_to_ort_cpu(proto, u8s8)
            except BackendError:
                raise
            except Exception as exc:
                raise BackendError(f"ORT-CPU form of {model} failed: {type(exc).__name__}: {exc}") from None
        data = new.SerializeToString()
        make_session(data, 1)  # ORT takes it (a vnni file is not run here: it may target another CPU)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(Path(output)) as tmp:
            onnx.save_model(new, str(tmp))
        return Path(output)

    @staticmethod
    def _read(model: Path) -> Any:
        import onnx

        try:
            return onnx.load(str(model))
        except Exception as exc:
            raise BackendError(f"cannot read ONNX model {model}: {str(exc).splitlines()[0]}") from None

    def _session_and_report(self, model: Path, device: str, threads: int | None = None,
                            rewrite: bool | None = None) -> tuple[Any, Any, dict[str, str]]:
        """The session, the rewrite report (None when the file runs as exported) and the saved
        form's metadata (empty for a spec-form file).

        ``rewrite``: None follows ``QEXPORT_ORT_REWRITE`` (on unless ``0``); rewrites are CPU-only.
        """
        from qexport.backends.ort_rewrite import RewriteOptions, RewriteReport

        try:
            opts = RewriteOptions.from_env()
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if rewrite is False or device != "cpu":
            opts = None
        elif rewrite and opts is None:
            opts = RewriteOptions()
        proto = None
        try:
            import onnx

            proto = onnx.load(str(model))
        except Exception:  # let ORT report what is wrong with the file
            pass
        meta = form_metadata(proto) if proto is not None else {}
        if meta and proto is not None:
            check_form_runs_exactly(meta, str(model))
            recorded = RewriteReport(applied=Counter(json.loads(meta.get(META_REWRITES, "{}") or "{}")),
                                     u8s8_full=meta.get(META_U8S8) == "vnni")
            return make_session(proto.SerializeToString(), threads, device), recorded, meta
        source: Path | bytes = model
        report: Any = None
        if opts is not None and proto is not None:
            rewritten = self._rewrite(model, proto, opts)
            if rewritten is not None:
                source, report = rewritten
        return make_session(source, threads, device), report, meta

    @staticmethod
    def _rewrite(model: Path, proto: Any, opts: Any) -> tuple[bytes, Any] | None:
        """The rewritten model's bytes and report; None (run the file as is) when a rewrite fails
        unexpectedly (a warning says so)."""
        import warnings

        from qexport.backends.ort_rewrite import rewrite_for_ort

        try:
            new, report = rewrite_for_ort(proto, opts)
            return new.SerializeToString(), report
        except Exception as exc:  # a bug in a rewrite must not make a valid model unloadable
            warnings.warn(f"ORT rewrites skipped for {model}: {type(exc).__name__}: {exc}", stacklevel=3)
            return None

    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner:
        session, report, meta = self._session_and_report(artifact, device, options.get("threads"),
                                                         options.get("rewrite"))
        return ORTRunner(session, report, meta)

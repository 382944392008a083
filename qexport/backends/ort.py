"""ONNX Runtime backend: CPU here, CUDA when ``onnxruntime-gpu`` is installed.

On CPU the model is loaded through :func:`qexport.backends.ort_rewrite.rewrite_for_ort`: ORT runs
an equivalent, faster graph built in memory (bit-exact by construction; the file is untouched).
``load(..., rewrite=False)`` or ``QEXPORT_ORT_REWRITE=0`` runs the file exactly as exported.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.backends.base import Backend, Runner
from qexport.errors import BackendError


class ORTRunner(Runner):
    def __init__(self, session: Any, rewrite_report: Any = None) -> None:
        self.session = session
        #: what the load-time rewrites did (:class:`~qexport.backends.ort_rewrite.RewriteReport`), or None
        self.rewrite_report = rewrite_report
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = [o.name for o in session.get_outputs()]

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {k: np.asarray(feeds[k], dtype=np.int64) for k in self.input_names})
        return dict(zip(self.output_names, outs, strict=True))


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
        """ORT compiles at load; ``compile`` validates the model (and copies it to ``output``)."""
        self._session(model, "cpu")
        if output is None or Path(output) == model:
            return model
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(output).with_name(f".{Path(output).name}.tmp")
        shutil.copyfile(model, tmp)
        tmp.replace(output)
        return Path(output)

    def _session(self, model: Path, device: str, threads: int | None = None, rewrite: bool | None = None,
                 ) -> Any:
        return self._session_and_report(model, device, threads, rewrite)[0]

    def _session_and_report(self, model: Path, device: str, threads: int | None = None,
                            rewrite: bool | None = None) -> tuple[Any, Any]:
        """The session, and the rewrite report (None when the file runs as exported).

        ``rewrite``: None follows ``QEXPORT_ORT_REWRITE`` (on unless ``0``); rewrites are CPU-only.
        """
        import onnxruntime as ort

        from qexport.backends.ort_rewrite import RewriteOptions

        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("ONNX Runtime has no CUDA provider here: pip install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's QDQ transformer would fuse DequantizeLinear -> MatMul into its int8 GEMM, whose
        # AVX2 u8s8 kernel saturates int16 pair sums (vpmaddubsw): not bit-exact. The QDQ form is
        # float MatMul on exact integers by contract; the integer form is MatMulInteger.
        so.add_session_config_entry("session.disable_quant_qdq", "1")
        if threads:
            so.intra_op_num_threads = threads
        try:
            opts = RewriteOptions.from_env()
        except ValueError as exc:
            raise BackendError(str(exc)) from None
        if rewrite is False or device != "cpu":
            opts = None
        elif rewrite and opts is None:
            opts = RewriteOptions()
        source: str | bytes = str(model)
        report = None
        if opts is not None:
            rewritten = self._rewrite(model, opts)
            if rewritten is not None:
                source, report = rewritten
        try:
            return ort.InferenceSession(source, so, providers=providers), report
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"ONNX Runtime cannot load {model}: {str(exc).splitlines()[0]}") from None

    @staticmethod
    def _rewrite(model: Path, opts: Any) -> tuple[bytes, Any] | None:
        """The rewritten model's bytes and report; None (run the file as is) when it is not ONNX
        that onnx can read, or when a rewrite fails unexpectedly (a warning says so)."""
        import warnings

        import onnx

        from qexport.backends.ort_rewrite import rewrite_for_ort

        try:
            proto = onnx.load(str(model))
        except Exception:  # let ORT report what is wrong with the file
            return None
        try:
            new, report = rewrite_for_ort(proto, opts)
            return new.SerializeToString(), report
        except Exception as exc:  # a bug in a rewrite must not make a valid model unloadable
            warnings.warn(f"ORT rewrites skipped for {model}: {type(exc).__name__}: {exc}", stacklevel=3)
            return None

    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner:
        session, report = self._session_and_report(artifact, device, options.get("threads"),
                                                   options.get("rewrite"))
        return ORTRunner(session, report)

"""ONNX Runtime backend: CPU here, CUDA when ``onnxruntime-gpu`` is installed."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.backends.base import Backend, Runner
from qexport.errors import BackendError


class ORTRunner(Runner):
    def __init__(self, session: Any) -> None:
        self.session = session
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

    def _session(self, model: Path, device: str, threads: int | None = None) -> Any:
        import onnxruntime as ort

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
            return ort.InferenceSession(str(model), so, providers=providers)
        except Exception as exc:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            raise BackendError(f"ONNX Runtime cannot load {model}: {str(exc).splitlines()[0]}") from None

    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner:
        return ORTRunner(self._session(artifact, device, options.get("threads")))

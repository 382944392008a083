"""Float baselines of an integer checkpoint's architecture: PyTorch models and float ONNX files.

Latency and size do not depend on weight values, so the float model is built from the
checkpoint's ``config.json`` with seeded random weights (offline, and the same for a
trained or a PTQ checkpoint). Float ONNX is exported with the TorchScript exporter
(``dynamo=False``; opset 17; dynamic ``batch``/``seq`` axes; inputs ``input_ids`` and
``attention_mask``, output ``logits``) from the eager-attention model, in two variants:
the HF graph as traced, whose MatMul/Softmax pattern ONNX Runtime's transformer optimizer
fuses into its ``Attention`` kernels (the ORT FP32/FP16 rows run that optimized graph: a
strong baseline), and a simple-mask graph for TVM and TensorRT (which cannot run
``com.microsoft`` ops, and whose importers choke on transformers 5's mask subgraph).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import BackendError, ExportError

FLOAT_OPSET = 17


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _atomic_path(out: Path) -> Iterator[Path]:
    """A temp path next to ``out`` that is renamed onto ``out`` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def float_model(checkpoint: Path, attn: str = "sdpa", seed: int = 0) -> Any:
    """FP32 HF ``*ForSequenceClassification`` of the checkpoint's architecture (random weights)."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    cfg = AutoConfig.from_pretrained(str(checkpoint))
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(cfg, attn_implementation=attn)
    return model.eval()


def _simple_mask_wrapper(model: Any) -> Any:
    """``model`` behind the classic additive 4-D mask ``(1 - mask) * -10000`` and zero token types.

    Same logits as the HF model (HF takes a 4-D float mask as given), but without the
    mask-building subgraph (Range / GreaterOrEqual / And / ConstantOfShape) that
    transformers 5 traces into the graph and TVM's ONNX importer rejects.
    """
    import torch

    class SimpleMask(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
            types = torch.zeros_like(input_ids)
            return self.inner(input_ids=input_ids, attention_mask=ext, token_type_ids=types).logits

    return SimpleMask(model)


def export_float_onnx(model: Any, out: Path, opset: int = FLOAT_OPSET, simple_mask: bool = False) -> Path:
    """Export a float HF classifier to ONNX with dynamic batch and sequence axes (atomic).

    ``simple_mask``: export through :func:`_simple_mask_wrapper` (the graph TVM and
    TensorRT get); without it, the HF graph as traced (ORT's optimizer fuses its attention).
    """
    import torch

    ids = torch.full((2, 16), 1000 % int(model.config.vocab_size), dtype=torch.int64)
    mask = torch.ones_like(ids)
    model = model.cpu().float().eval()
    module = _simple_mask_wrapper(model) if simple_mask else model
    axes = {
        "input_ids": {0: "batch", 1: "seq"},
        "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch"},
    }
    out = Path(out)
    try:
        with _quiet(), torch.no_grad(), _atomic_path(out) as tmp:
            torch.onnx.export(
                module,
                (ids, mask),
                str(tmp),
                input_names=["input_ids", "attention_mask"],
                output_names=["logits"],
                dynamic_axes=axes,
                opset_version=opset,
                dynamo=False,
            )
    except Exception as exc:
        raise ExportError(f"float ONNX export failed: {type(exc).__name__}: {exc}") from exc
    return out


def ort_optimize(
    src: Path, out: Path, num_heads: int, hidden_size: int, fp16: bool, use_gpu: bool
) -> tuple[Path, dict[str, int]]:
    """ONNX Runtime's transformer fusions (Attention, SkipLayerNorm, BiasGelu), optionally to FP16.

    Returns the optimized file and the fused-operator counts. FP16 keeps float32 graph
    inputs/outputs (``keep_io_types``), so every row takes the same feeds.
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet():
        opt = optimize_model(
            str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, use_gpu=use_gpu
        )
        if fp16:
            opt.convert_float_to_float16(keep_io_types=True)
        stats = {k: int(v) for k, v in opt.get_fused_operator_statistics().items() if v}
        with _atomic_path(Path(out)) as tmp:
            opt.save_model_to_file(str(tmp))
    return Path(out), stats


def fp16_onnx(src: Path, out: Path) -> Path:
    """Plain float16 conversion (no fusions) with float32 inputs/outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        with _atomic_path(Path(out)) as tmp:
            onnx.save(model, str(tmp))
    return Path(out)


class TorchRunner:
    """A PyTorch model behind the ``Runner`` calling convention (numpy in, numpy out)."""

    def __init__(
        self, model: Any, device: str, half: bool = False, compile_model: bool = False, max_shapes: int = 8
    ) -> None:
        import torch

        self.device = torch.device(device)
        model = model.to(self.device)
        if half:
            model = model.half()
        if compile_model:
            import torch._dynamo as dynamo

            # one specialization per (batch, seq): make sure none falls back to eager
            for knob in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, knob):
                    setattr(dynamo.config, knob, max(int(getattr(dynamo.config, knob)), max_shapes + 2))
            model = torch.compile(model, dynamic=False)
        self.model = model

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            t = {
                k: torch.from_numpy(np.ascontiguousarray(feeds[k])).to(self.device)
                for k in ("input_ids", "attention_mask")
            }
            logits = self.model(**t).logits
            return {"logits": logits.float().cpu().numpy()}

    def synchronize(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


class OrtRunner:
    """A float ONNX model in an ONNX Runtime session (CPU, or CUDA with no silent CPU fallback).

    Session options match :class:`qexport.backends.ort.ORTBackend`'s (ORT_ENABLE_ALL).
    """

    def __init__(self, path: Path, device: str, threads: int | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendError("onnxruntime has no CUDA provider: install onnxruntime-gpu")
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendError("onnxruntime could not start its CUDA provider (CUDA/cuDNN libraries?)")
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {n: feeds[n] for n in self.input_names})
        return {o.name: np.asarray(v) for o, v in zip(self.session.get_outputs(), outs, strict=True)}

    def synchronize(self) -> None:
        """``session.run`` returns host arrays: already synchronous."""

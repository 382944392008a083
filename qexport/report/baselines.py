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

The CPU user's INT8 baseline is ONNX Runtime's ``quantize_dynamic`` of the fused graph
(:func:`dynamic_int8_onnx`); :func:`dynamic_int8_accuracy` measures its accuracy on a task for a
fine-tuned FP model. The runners here are :class:`~qexport.backends.base.Runner` s, like the
backends'.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.backends.base import Runner
from qexport.errors import CheckpointError, ExportError
from qexport.io import atomic_path

FLOAT_OPSET = 17


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No Python warnings, and no root-logger warnings (onnxruntime.quantization logs through it)."""
    previous = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(previous)


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
        with _quiet(), torch.no_grad(), atomic_path(out) as tmp:
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
        with atomic_path(Path(out)) as tmp:
            opt.save_model_to_file(str(tmp))
    return Path(out), stats


def fp16_onnx(src: Path, out: Path) -> Path:
    """Plain float16 conversion (no fusions) with float32 inputs/outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with _quiet():
        model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
        with atomic_path(Path(out)) as tmp:
            onnx.save(model, str(tmp))
    return Path(out)


class TorchRunner(Runner):
    """A PyTorch model behind the ``Runner`` contract (numpy in, numpy out)."""

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

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
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


class OrtRunner(Runner):
    """A float (or ``quantize_dynamic``) ONNX model in an ONNX Runtime session, opened by
    :func:`qexport.backends.ort.make_session` as ORT would run it (its QDQ fusions on)."""

    def __init__(self, path: Path, device: str, threads: int | None = None) -> None:
        from qexport.backends.ort import make_session

        self.session = make_session(path, threads, device, qdq_fusion=True)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        outs = self.session.run(None, {n: np.asarray(feeds[n], dtype=np.int64) for n in self.input_names})
        return {n: np.asarray(v) for n, v in zip(self.output_names, outs, strict=True)}


def dynamic_int8_onnx(src: Path, out: Path) -> Path:
    """ONNX Runtime's ``quantize_dynamic`` of a float ONNX (what Optimum's CPU quantization does):
    int8 weights per output channel (``QInt8``), activations quantized per call to uint8.

    ``src`` is best the transformer optimizer's fused graph (:func:`ort_optimize`); its
    ``com.microsoft`` ops carry no type annotations, hence ``DefaultTensorType`` FLOAT."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet(), atomic_path(Path(out)) as tmp:
        quantize_dynamic(str(src), str(tmp), per_channel=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return Path(out)


def dynamic_int8_accuracy(fp_model_dir: Path, task: str, split: str = "test", *, limit: int | None = None,
                          batch_size: int = 32, max_length: int = 128, threads: int | None = None,
                          work_dir: Path | None = None, keep_preds: int = 0) -> dict[str, Any]:
    """Metric of a fine-tuned FP model (an HF ``save_pretrained`` directory with its tokenizer, e.g.
    the trainer's ``fp/``) after ORT's transformer fusions and ``quantize_dynamic``, on a task split:
    the accuracy a CPU user gets from the usual INT8 route, to set beside qexport's integer model.

    Returns :meth:`qexport.evaluation.Evaluation.as_dict` plus ``model``: ``"ORT quantize_dynamic INT8"``.
    ``work_dir`` keeps the ONNX files (default: a temporary directory); ``keep_preds``: also return
    the first N predictions."""
    import tempfile

    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from qexport.evaluation import evaluate, runner_predictor

    fp_model_dir = Path(fp_model_dir)
    if not (fp_model_dir / "config.json").is_file():
        raise CheckpointError(f"no fine-tuned FP model in {fp_model_dir} (config.json missing)")
    with contextlib.ExitStack() as stack:
        work = Path(work_dir) if work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        cfg = AutoConfig.from_pretrained(str(fp_model_dir))
        with _quiet():
            model = AutoModelForSequenceClassification.from_pretrained(str(fp_model_dir),
                                                                       attn_implementation="eager").eval()
        fp32 = export_float_onnx(model, work / "float32.onnx")
        del model
        fused, _ = ort_optimize(fp32, work / "float32.ort.onnx", int(cfg.num_attention_heads),
                                int(cfg.hidden_size), fp16=False, use_gpu=False)
        dyn = dynamic_int8_onnx(fused, work / "int8.dynamic.onnx")
        runner = OrtRunner(dyn, "cpu", threads)
        tok = AutoTokenizer.from_pretrained(str(fp_model_dir))
        ev = evaluate(runner_predictor(runner, "logits"), task, tok, split, limit=limit,
                      batch_size=batch_size, max_length=max_length)
    return {"model": "ORT quantize_dynamic INT8", **ev.as_dict(keep_preds)}

"""qexport: integer-only transformer encoders, trained, exported and shipped.

The Python API, for a model and a training loop of your own (the same objects the CLI uses)::

    import qexport

    qexport.quantize_model(model, "full")          # HF BERT/RoBERTa classifier, in place
    qexport.calibrate(model, batches)              # activation ranges (EMA), no gradients
    ...                                            # fine-tune: your loop or transformers.Trainer
    qexport.save_checkpoint(model, "ckpt", tokenizer=tok)   # freeze -> integer checkpoint
    onnx_file = qexport.export_onnx("ckpt", "ckpt/model.onnx")
    runner = qexport.load_backend(onnx_file, "ort")          # or "tvm" (compiles first)
    out = runner.run({"input_ids": ids, "attention_mask": mask})   # logits, logits_int

Names are imported on first use (``import qexport`` loads neither torch nor onnx). Every bad
input raises a :class:`QexportError` subclass with a one-line message.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Public name -> the module that defines it (one definition; the CLI uses the same objects).
_API: dict[str, str] = {
    # quantization: presets, the reversible swap, calibration, freezing, checkpoints
    "PRESETS": "qexport.quant.presets",
    "QuantPreset": "qexport.quant.presets",
    "get_preset": "qexport.quant.presets",
    "quantize_model": "qexport.quant.swap",
    "dequantize_model": "qexport.quant.swap",
    "calibrate": "qexport.quant.swap",
    "freeze": "qexport.quant.freeze",
    "save_checkpoint": "qexport.quant.checkpoint",
    "load_checkpoint": "qexport.quant.checkpoint",
    "read_manifest": "qexport.quant.checkpoint",
    "post_training_quantize": "qexport.ptq",
    # models and data
    "load_model": "qexport.models",
    "IntegerModel": "qexport.models.integer",
    "get_task": "qexport.data",
    "encode": "qexport.data",
    # export, backends, evaluation
    "export_onnx": "qexport.export.exporter",
    "Backend": "qexport.backends.base",
    "Runner": "qexport.backends.base",
    "get_backend": "qexport.backends.base",
    "load_backend": "qexport.backends.base",
    "evaluate": "qexport.evaluation",
    "Evaluation": "qexport.evaluation",
    "iter_batches": "qexport.evaluation",
    "load_tokenizer": "qexport.evaluation",
    "reference_predictor": "qexport.evaluation",
    "runner_predictor": "qexport.evaluation",
    # errors
    "QexportError": "qexport.errors",
    "ConfigError": "qexport.errors",
    "CheckpointError": "qexport.errors",
    "ModelError": "qexport.errors",
    "DataError": "qexport.errors",
    "ExportError": "qexport.errors",
    "BackendError": "qexport.errors",
    "OverflowRisk": "qexport.errors",
    "ParityError": "qexport.errors",
}

__all__ = [
    "__version__",
    "PRESETS",
    "QuantPreset",
    "get_preset",
    "quantize_model",
    "dequantize_model",
    "calibrate",
    "freeze",
    "save_checkpoint",
    "load_checkpoint",
    "read_manifest",
    "post_training_quantize",
    "load_model",
    "IntegerModel",
    "get_task",
    "encode",
    "export_onnx",
    "Backend",
    "Runner",
    "get_backend",
    "load_backend",
    "evaluate",
    "Evaluation",
    "iter_batches",
    "load_tokenizer",
    "reference_predictor",
    "runner_predictor",
    "QexportError",
    "ConfigError",
    "CheckpointError",
    "ModelError",
    "DataError",
    "ExportError",
    "BackendError",
    "OverflowRisk",
    "ParityError",
]

if TYPE_CHECKING:
    from qexport.backends.base import Backend, Runner, get_backend, load_backend
    from qexport.data import encode, get_task
    from qexport.errors import (
        BackendError,
        CheckpointError,
        ConfigError,
        DataError,
        ExportError,
        ModelError,
        OverflowRisk,
        ParityError,
        QexportError,
    )
    from qexport.evaluation import (
        Evaluation,
        evaluate,
        iter_batches,
        load_tokenizer,
        reference_predictor,
        runner_predictor,
    )
    from qexport.export.exporter import export_onnx
    from qexport.models import load_model
    from qexport.models.integer import IntegerModel
    from qexport.ptq import post_training_quantize
    from qexport.quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
    from qexport.quant.freeze import freeze
    from qexport.quant.presets import PRESETS, QuantPreset, get_preset
    from qexport.quant.swap import calibrate, dequantize_model, quantize_model


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'qexport' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))

"""QAT modules, presets, the reversible swap, freezing and integer checkpoints."""

from qexport.quant.checkpoint import load_checkpoint, read_manifest, save_checkpoint
from qexport.quant.freeze import freeze
from qexport.quant.presets import PRESETS, QuantPreset, get_preset
from qexport.quant.swap import calibrate, dequantize_model, quantize_model

__all__ = [
    "PRESETS",
    "QuantPreset",
    "calibrate",
    "dequantize_model",
    "freeze",
    "get_preset",
    "load_checkpoint",
    "quantize_model",
    "read_manifest",
    "save_checkpoint",
]

"""Named quantization presets: the seeds' five combinations plus full precision.

The seeds (COMS 6998 RoBERTa project) built each combination by quantizing
everything and then "dequantizing the layer we do not want"; a preset here is
the same thing stated positively: which parts run as integers. Parts that are
not quantized stay float, between a dequantize and a quantize.
"""

from __future__ import annotations

from dataclasses import dataclass

from qexport.errors import ConfigError


@dataclass(frozen=True)
class QuantPreset:
    """What runs as integers. ``linear`` covers every matmul (embeddings, Q/K/V,
    attention products, FFN, head); the others are I-BERT's nonlinear kernels."""

    name: str
    linear: bool
    gelu: bool
    softmax: bool
    layernorm: bool
    tanh: bool

    @property
    def quantized(self) -> bool:
        return self.linear

    @property
    def integer_only(self) -> bool:
        return self.linear and self.gelu and self.softmax and self.layernorm and self.tanh


PRESETS: dict[str, QuantPreset] = {
    p.name: p
    for p in (
        QuantPreset("fp", linear=False, gelu=False, softmax=False, layernorm=False, tanh=False),
        QuantPreset("linear", linear=True, gelu=False, softmax=False, layernorm=False, tanh=False),
        QuantPreset("linear+gelu+softmax", linear=True, gelu=True, softmax=True, layernorm=False, tanh=False),
        QuantPreset(
            "linear+gelu+layernorm", linear=True, gelu=True, softmax=False, layernorm=True, tanh=False
        ),
        QuantPreset(
            "linear+softmax+layernorm", linear=True, gelu=False, softmax=True, layernorm=True, tanh=False
        ),
        QuantPreset("full", linear=True, gelu=True, softmax=True, layernorm=True, tanh=True),
    )
}

WEIGHT_BITS = (2, 4, 8)


def get_preset(name: str) -> QuantPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def check_weight_bits(bits: int, what: str = "weight_bits") -> int:
    if bits not in WEIGHT_BITS:
        raise ConfigError(f"{what} must be one of {', '.join(map(str, WEIGHT_BITS))}, got {bits}")
    return bits

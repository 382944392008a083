"""Exact integer kernels: the ground truth every other part is checked against.

See :mod:`qexport.ops.kernels` for the contracts (input ranges, output scales,
int32 bounds) of each op.
"""

from qexport.ops.kernels import (
    ChannelRequant,
    ExpConsts,
    GeluConsts,
    LayerNormConsts,
    RequantParams,
    SoftmaxConsts,
    TanhConsts,
    dyadic,
    exp_constants,
    gelu_constants,
    gelu_out_scale,
    i_exp,
    i_exp_int,
    i_gelu,
    i_gelu_int,
    i_layernorm,
    i_layernorm_int,
    i_softmax,
    i_softmax_int,
    i_sqrt,
    i_tanh,
    i_tanh_int,
    int_matmul,
    layernorm_constants,
    quantize,
    requant_from_ratio,
    requant_params,
    requantize,
    requantize_channels,
    requantize_int,
    softmax_constants,
    tanh_constants,
)

__all__ = [
    "ChannelRequant", "ExpConsts", "GeluConsts", "LayerNormConsts", "RequantParams", "SoftmaxConsts",
    "TanhConsts", "dyadic", "exp_constants", "gelu_constants", "gelu_out_scale", "i_exp", "i_exp_int",
    "i_gelu", "i_gelu_int", "i_layernorm", "i_layernorm_int", "i_softmax", "i_softmax_int", "i_sqrt",
    "i_tanh", "i_tanh_int", "int_matmul", "layernorm_constants", "quantize", "requant_from_ratio",
    "requant_params", "requantize", "requantize_channels", "requantize_int", "softmax_constants",
    "tanh_constants",
]

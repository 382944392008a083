"""Reversible module swap: HF BERT/RoBERTa <-> QAT modules, by a handler table.

``quantize_model`` walks the model once; each module type has a handler that
builds its quant twin (sharing the same parameters, so an FP checkpoint's
weights carry over and gradients reach them). ``dequantize_model`` calls each
twin's ``to_float()``. HF's attention is pluggable: the integer attention is
registered as the ``"qexport"`` attention implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qexport.errors import ModelError
from qexport.quant.modules import (
    QuantAct,
    QuantAttention,
    QuantEmbedding,
    QuantGELU,
    QuantLayerNorm,
    QuantLinear,
    QuantTanh,
    qexport_attention,
)
from qexport.quant.presets import QuantPreset, check_weight_bits, get_preset

SUPPORTED = ("bert", "roberta")
ATTN_NAME = "qexport"


class QuantRobertaHead(nn.Module):
    """RobertaClassificationHead with its functional ``torch.tanh`` made a module."""

    def __init__(self, dense: Any, out_proj: Any, dropout: nn.Module, tanh: nn.Module) -> None:
        super().__init__()
        self.dense = dense
        self.out_proj = out_proj
        self.dropout = dropout
        self.activation = tanh

    def forward(self, features: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        x = self.dropout(features[:, 0, :])
        x = self.activation(self.dense(x))
        return self.out_proj(self.dropout(x))

    def to_float(self) -> nn.Module:
        from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

        cfg = type("Cfg", (), {})()
        cfg.hidden_size = self.dense.in_features
        cfg.classifier_dropout = None
        cfg.hidden_dropout_prob = float(getattr(self.dropout, "p", 0.1))
        cfg.num_labels = self.out_proj.out_features
        head = RobertaClassificationHead(cfg)
        head.dense = _to_float(self.dense)
        head.out_proj = _to_float(self.out_proj)
        head.dropout = self.dropout
        return head


def _to_float(m: nn.Module) -> nn.Module:
    fn = getattr(m, "to_float", None)
    return fn() if callable(fn) else m


def register_attention() -> None:
    """Make ``config._attn_implementation = "qexport"`` resolve to :func:`qexport_attention`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_NAME, qexport_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


def model_arch(model: Any) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in SUPPORTED:
        raise ModelError(f"unsupported model type {mt!r}: qexport quantizes BERT and RoBERTa encoders")
    return str(mt)


def _set(parent: nn.Module, name: str, new: nn.Module) -> None:
    setattr(parent, name, new)


def quantize_model(
    model: Any,
    preset: str | QuantPreset = "full",
    weight_bits: int = 8,
    act_bits: int = 8,
    emb_bits: int = 8,
    **_: Any,
) -> Any:
    """Swap the QAT modules into an HF ``*ForSequenceClassification`` model, in place.

    Raises ConfigError for an unknown preset or bit width, ModelError for a model that is not
    BERT/RoBERTa or is already quantized.

    ``weight_bits`` applies to the encoder's linear layers; embeddings use
    ``emb_bits`` (8 by default, as I-BERT); the classifier's last linear is
    quantized per tensor so that the logits have one scale.
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    check_weight_bits(weight_bits)
    check_weight_bits(emb_bits, "emb_bits")
    arch = model_arch(model)
    done: QuantPreset | None = getattr(model, "qexport_preset", None)
    if done is not None and done.quantized:
        raise ModelError(
            f"model is already quantized (preset {done.name!r}): quantize_model takes a float model; "
            "call qexport.dequantize_model first to quantize it again"
        )
    model.qexport_preset = p
    model.qexport_bits = {"weight": weight_bits, "act": act_bits, "emb": emb_bits}
    if not p.quantized:
        return model
    base = getattr(model, arch)
    ql: Callable[..., QuantLinear] = lambda lin, **kw: QuantLinear.from_float(  # noqa: E731
        lin, weight_bits=weight_bits, **kw
    )
    emb = base.embeddings
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        _set(emb, name, QuantEmbedding.from_float(getattr(emb, name), emb_bits))
    emb.LayerNorm = QuantLayerNorm.from_float(emb.LayerNorm, integer=p.layernorm, act_bits=act_bits)
    for layer in base.encoder.layer:
        sa = layer.attention.self
        for name in ("query", "key", "value"):
            _set(sa, name, ql(getattr(sa, name), out_bits=act_bits))
        sa.qexport_attn = QuantAttention(integer=p.softmax, act_bits=act_bits)
        ao = layer.attention.output
        ao.dense = ql(ao.dense)
        ao.LayerNorm = QuantLayerNorm.from_float(ao.LayerNorm, integer=p.layernorm, act_bits=act_bits)
        layer.intermediate.dense = ql(layer.intermediate.dense)
        layer.intermediate.intermediate_act_fn = QuantGELU(integer=p.gelu, act_bits=act_bits)
        layer.output.dense = ql(layer.output.dense)
        layer.output.LayerNorm = QuantLayerNorm.from_float(
            layer.output.LayerNorm, integer=p.layernorm, act_bits=act_bits
        )
    if arch == "bert":
        if base.pooler is None:
            raise ModelError("BERT model without a pooler: cannot build the classification head")
        base.pooler.dense = ql(base.pooler.dense)
        base.pooler.activation = QuantTanh(integer=p.tanh)
        model.classifier = QuantLinear.from_float(model.classifier, weight_bits=8, per_channel=False)
    else:
        head = model.classifier
        model.classifier = QuantRobertaHead(
            ql(head.dense),
            QuantLinear.from_float(head.out_proj, weight_bits=8, per_channel=False),
            head.dropout,
            QuantTanh(integer=p.tanh),
        )
    register_attention()
    model.config._attn_implementation = ATTN_NAME
    return model


def dequantize_model(model: Any) -> Any:
    """Undo :func:`quantize_model`: every quant module back to its float twin (same parameters)."""
    for name, child in list(model.named_children()):
        if hasattr(child, "to_float"):
            setattr(model, name, _to_float(child))
        else:
            dequantize_model(child)
        if hasattr(child, "qexport_attn"):
            del child.qexport_attn
    if hasattr(model, "qexport_attn"):
        del model.qexport_attn
    if hasattr(model, "qexport_preset"):
        model.config._attn_implementation = "eager"
        del model.qexport_preset
    return model


def quant_acts(model: Any) -> list[QuantAct]:
    return [m for m in model.modules() if isinstance(m, QuantAct)]


@torch.no_grad()
def calibrate(model: Any, batches: Any, max_batches: int | None = None) -> int:
    """Post-training calibration: run ``batches`` in train mode (EMA updates), no gradients.

    Dropout is disabled during calibration. Returns the number of batches used.
    """
    was_training = model.training
    model.train()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    saved = [d.p for d in drops]
    for d in drops:
        d.p = 0.0
    n = 0
    try:
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            feeds = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
            model(**feeds)
            n += 1
    finally:
        for d, p in zip(drops, saved, strict=True):
            d.p = p
        model.train(was_training)
    return n

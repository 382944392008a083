"""Freeze a QAT model into integer parameters: the content of an integer checkpoint.

Naming (``L`` = layer index)::

    emb.{word,pos,tt}.w / .s      int8 (or packed) table, per-tensor scale
    emb.ln.{in_s,g,b,out_s}       16-bit input scale, LayerNorm affine, int8 output scale
    l{L}.{q,k,v,o,f1,f2}.w/.ws/.b weights (int8 or packed), per-channel scales, int32 bias
    l{L}.{q,k,v}.out_s            int8 scales of Q, K, V
    l{L}.ctx_s                    int8 scale of the attention context
    l{L}.ln{1,2}.{in_s,g,b,out_s} residual-sum scale (16-bit), affine, output scale
    l{L}.gelu.{in_s,out_s}        16-bit GELU input scale, int8 output scale
    pool.w/.ws/.b, tanh.in_s      pooler (BERT) / head dense (RoBERTa) and its tanh
    cls.w/.ws/.b                  last linear, per-tensor scale: logits = logits_int * cls.ws / 127

Scales are float32 (they are folded into integer constants at load, see
:mod:`qexport.ops`). Biases are quantized to int32 at scale ``s_in * s_w``.
"""

from __future__ import annotations

from typing import Any

import torch

from qexport.errors import ModelError
from qexport.ops.intmath import qmax
from qexport.ops.kernels import quantize
from qexport.quant.modules import QuantAct, QuantLinear, QuantTanh, weight_scale
from qexport.quant.packing import pack
from qexport.quant.presets import QuantPreset
from qexport.quant.swap import model_arch

LINEARS = ("q", "k", "v", "o", "f1", "f2")
PROB_SCALE = 1.0 / 127


def _scalar(x: torch.Tensor | float) -> torch.Tensor:
    return torch.tensor(float(x), dtype=torch.float32).reshape(())


def _act_scale(a: QuantAct, where: str) -> torch.Tensor:
    if not bool(a.initialized):
        raise ModelError(f"activation range of {where} was never observed: calibrate or train first")
    return _scalar(a.scale)


def freeze(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """QAT model -> ``(tensors, meta)``: integer weights and biases, float scales, config."""
    arch = model_arch(model)
    preset: QuantPreset | None = getattr(model, "qexport_preset", None)
    if preset is None or not preset.quantized:
        raise ModelError("model is not quantized: call qexport.quant.quantize_model first (preset != fp)")
    bits = dict(model.qexport_bits)
    base = getattr(model, arch)
    cfg = model.config
    T: dict[str, torch.Tensor] = {}
    wbits: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}

    def put_weight(key: str, w: torch.Tensor, s: torch.Tensor, nbits: int) -> torch.Tensor:
        q = quantize(w.detach().float(), nbits, s.unsqueeze(1) if s.numel() > 1 else s)
        T[key + ".w"] = pack(q, nbits)
        wbits[key] = nbits
        shapes[key] = list(w.shape)
        return q

    def put_int_weight(key: str, mod: Any) -> torch.Tensor | None:
        """Pluggable quantizers (qexport.quant.quantizers) give their own integers and scales."""
        int_weight = getattr(mod, "int_weight", None)
        if not callable(int_weight):
            return None
        q, s = int_weight()
        T[key + ".w"] = pack(q, mod.weight_bits)
        wbits[key] = mod.weight_bits
        shapes[key] = list(mod.weight.shape)
        return s.detach().float()

    def put_linear(key: str, lin: Any, s_in: torch.Tensor) -> None:
        if not isinstance(lin, QuantLinear):
            raise ModelError(f"{key}: expected a QuantLinear, found {type(lin).__name__}")
        ws = put_int_weight(key, lin)
        if ws is None:
            ws = weight_scale(lin.weight, lin.weight_bits, lin.per_channel).float()
            if not lin.per_channel:
                ws = ws.expand(lin.out_features).clone()
            put_weight(key, lin.weight, ws, lin.weight_bits)
        elif ws.dim() == 0:
            ws = ws.expand(lin.out_features).clone()
        T[key + ".ws"] = ws
        b = lin.bias.detach().float() if lin.bias is not None else torch.zeros(lin.out_features)
        bq = torch.round(b / (float(s_in) * ws.double()).float())
        T[key + ".b"] = bq.clamp(-(2**30), 2**30).to(torch.int32)

    def put_ln(key: str, ln: Any) -> torch.Tensor:
        T[key + ".in_s"] = _act_scale(ln.in_act, key + " input")
        T[key + ".g"] = ln.weight.detach().float().clone()
        T[key + ".b"] = ln.bias.detach().float().clone()
        T[key + ".out_s"] = _act_scale(ln.out_act, key + " output")
        return T[key + ".out_s"]

    emb = base.embeddings
    for key, mod in (("emb.word", emb.word_embeddings), ("emb.pos", emb.position_embeddings),
                     ("emb.tt", emb.token_type_embeddings)):
        s = put_int_weight(key, mod)
        if s is None:
            s = weight_scale(mod.weight, mod.weight_bits, per_channel=False).float().reshape(())
            put_weight(key, mod.weight, s, mod.weight_bits)
        T[key + ".s"] = s.reshape(())
    s_h = put_ln("emb.ln", emb.LayerNorm)
    for i, layer in enumerate(base.encoder.layer):
        sa = layer.attention.self
        for name, mod in (("q", sa.query), ("k", sa.key), ("v", sa.value)):
            put_linear(f"l{i}.{name}", mod, s_h)
            T[f"l{i}.{name}.out_s"] = _act_scale(mod.out_act, f"layer {i} {name}")
        T[f"l{i}.ctx_s"] = _act_scale(sa.qexport_attn.ctx_act, f"layer {i} context")
        put_linear(f"l{i}.o", layer.attention.output.dense, T[f"l{i}.ctx_s"])
        s_h1 = put_ln(f"l{i}.ln1", layer.attention.output.LayerNorm)
        put_linear(f"l{i}.f1", layer.intermediate.dense, s_h1)
        g = layer.intermediate.intermediate_act_fn
        T[f"l{i}.gelu.in_s"] = _act_scale(g.in_act, f"layer {i} GELU input")
        T[f"l{i}.gelu.out_s"] = _act_scale(g.out_act, f"layer {i} GELU output")
        put_linear(f"l{i}.f2", layer.output.dense, T[f"l{i}.gelu.out_s"])
        s_h = put_ln(f"l{i}.ln2", layer.output.LayerNorm)
    if arch == "bert":
        pool, act, cls = base.pooler.dense, base.pooler.activation, model.classifier
    else:
        head = model.classifier
        pool, act, cls = head.dense, head.activation, head.out_proj
    put_linear("pool", pool, s_h)
    if not isinstance(act, QuantTanh):
        raise ModelError("classification head was not quantized")
    T["tanh.in_s"] = _act_scale(act.in_act, "head tanh input")
    put_linear("cls", cls, _scalar(PROB_SCALE))
    meta: dict[str, Any] = {
        "format": "qexport-int-checkpoint",
        "format_version": 1,
        "arch": arch,
        "preset": preset.name,
        "bits": bits,
        "weight_bits": wbits,
        "weight_shapes": shapes,
        "act_bits": bits.get("act", 8),
        "num_layers": len(base.encoder.layer),
        "hidden_size": cfg.hidden_size,
        "num_heads": cfg.num_attention_heads,
        "num_labels": cfg.num_labels,
        "pad_token_id": cfg.pad_token_id,
        "layer_norm_eps": cfg.layer_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "logits_scale": float(T["cls.ws"][0]) * PROB_SCALE,
        "qmax8": qmax(8),
    }
    return T, meta

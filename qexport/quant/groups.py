"""Layer groups and the seeds' weight-quantization experiments on HF BERT/RoBERTa.

Groups (resolved to module names of a ``*ForSequenceClassification`` model,
before or after :func:`qexport.quant.quantize_model`, which keeps the names):

=========  ===================================================================
``EMB``    word embeddings (seed 003: 46% of RoBERTa's weights)
``QKV``    query, key, value of every layer (seed 003)
``QK``     query and key only
``MHA``    query, key, value and the attention output dense (seeds 002, 004)
``FFN``    intermediate and output dense of every layer (seeds 002/003/004)
``CLS``    head: BERT pooler dense + classifier; RoBERTa classifier.dense + out_proj
``ALL``    MHA + FFN + CLS: every linear layer (seed 002; embeddings excluded)
``ALL_QK`` ALL without the value projections (seed 002: query and key are
           robust to binarization, value is not)
=========  ===================================================================

Unions with ``+`` (``"FFN+EMB"``; seed 003's "All Together" is ``"FFN+EMB+QKV"``).
``keep_last=True`` (default) leaves the classifier's last linear out of every
group (seed 002: binarizing it collapses training).

:func:`apply_weight_quantization` puts a :mod:`qexport.quant.quantizers`
quantizer on the selected layers; ``mode="basic"`` quantizes weights only
(activation quantizers only observe their ranges), ``"fully"`` weights and
activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from qexport.errors import ConfigError, ModelError
from qexport.quant.modules import QuantAct, QuantEmbedding, QuantLinear
from qexport.quant.quantizers import (
    QUANTIZERS,
    IdentityQuantizer,
    IRNetQuantizer,
    MinMaxQuantizer,
    PluggableQuantEmbedding,
    PluggableQuantLinear,
    WeightQuantizer,
    make_quantizer,
    weight_quantizers,
)

GROUPS = ("EMB", "QKV", "QK", "MHA", "FFN", "CLS", "ALL", "ALL_QK")
MODES = ("basic", "fully")
RESTS = ("int8", "fp")


def _arch(model: nn.Module) -> str:
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ("bert", "roberta"):
        raise ModelError(f"unsupported model type {mt!r}: layer groups are defined for BERT and RoBERTa")
    return str(mt)


def last_linear_name(model: nn.Module) -> str:
    """The classifier's last linear (the one producing the logits)."""
    return "classifier" if _arch(model) == "bert" else "classifier.out_proj"


def group_table(model: nn.Module) -> dict[str, list[str]]:
    """Every group's module names, in model order (``keep_last`` not applied)."""
    arch = _arch(model)
    base = getattr(model, arch)
    n_layers = len(base.encoder.layer)
    q, k, v, o, f1, f2 = [], [], [], [], [], []
    for i in range(n_layers):
        p = f"{arch}.encoder.layer.{i}"
        q.append(f"{p}.attention.self.query")
        k.append(f"{p}.attention.self.key")
        v.append(f"{p}.attention.self.value")
        o.append(f"{p}.attention.output.dense")
        f1.append(f"{p}.intermediate.dense")
        f2.append(f"{p}.output.dense")
    if arch == "bert":
        cls = ([f"{arch}.pooler.dense"] if getattr(base, "pooler", None) is not None else []) + ["classifier"]
    else:
        cls = ["classifier.dense", "classifier.out_proj"]
    qkv = [n for i in range(n_layers) for n in (q[i], k[i], v[i])]
    qk = [n for i in range(n_layers) for n in (q[i], k[i])]
    mha = [n for i in range(n_layers) for n in (q[i], k[i], v[i], o[i])]
    ffn = [n for i in range(n_layers) for n in (f1[i], f2[i])]
    table = {
        "EMB": [f"{arch}.embeddings.word_embeddings"],
        "QKV": qkv,
        "QK": qk,
        "MHA": mha,
        "FFN": ffn,
        "CLS": cls,
        "ALL": mha + ffn + cls,
    }
    vs = set(v)
    table["ALL_QK"] = [n for n in table["ALL"] if n not in vs]
    mods = dict(model.named_modules())
    missing = [n for names in table.values() for n in names if n not in mods]
    if missing:
        raise ModelError(f"model does not have the expected BERT/RoBERTa modules: {', '.join(missing[:3])}")
    return table


def parse_groups(spec: str | Sequence[str]) -> list[str]:
    """``"FFN+EMB"`` or ``["FFN", "EMB"]`` -> ``["FFN", "EMB"]`` (checked; ``""``/``"NONE"`` -> [])."""
    parts = spec.replace(",", "+").split("+") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for p in parts:
        g = p.strip().upper().replace("-", "_")
        if g in ("", "NONE"):
            continue
        if g not in GROUPS:
            raise ConfigError(
                f"unknown layer group {p.strip()!r}: choose from {', '.join(GROUPS)} (join with '+')"
            )
        if g not in out:
            out.append(g)
    return out


def resolve_groups(model: nn.Module, spec: str | Sequence[str], keep_last: bool = True) -> list[str]:
    """Module names selected by ``spec`` (a union of groups), in model order, without duplicates."""
    table = group_table(model)
    wanted: set[str] = set()
    for g in parse_groups(spec):
        wanted.update(table[g])
    if keep_last:
        wanted.discard(last_linear_name(model))
    return [n for n, _ in model.named_modules() if n in wanted]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def _act_observe(module: nn.Module, args: tuple[Any, ...]) -> None:
    if module.training and isinstance(module, QuantAct):
        module.observe(args[0])


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Activation fake-quantization on or off. Off = observe only: the EMA ranges keep
    updating in training (forward pre-hook), so quantization can be switched on
    later (latent quantization, seed 004's PTQ) and checkpoints can be frozen."""
    for a in model.modules():
        if not isinstance(a, QuantAct):
            continue
        a.enabled = enabled
        hooks = a._forward_pre_hooks
        mine = [k for k, h in hooks.items() if h is _act_observe]
        if enabled:
            for k in mine:
                del hooks[k]
        elif not mine:
            a.register_forward_pre_hook(_act_observe)


def set_weight_quant(model: nn.Module, enabled: bool) -> None:
    """Weight fake-quantization of every pluggable quantizer on or off (off: float weights)."""
    for q in weight_quantizers(model):
        q.enabled = enabled


def set_quant_enabled(model: nn.Module, enabled: bool, reinit: bool = False) -> None:
    """Weights and activations together (latent quantization's switch). ``reinit``:
    re-initialise learned quantizer state (LSQ's step) from the current weights."""
    if enabled and reinit:
        reinit_quantizers(model)
    set_weight_quant(model, enabled)
    mode = getattr(model, "qexport_weight_quant", {}).get("mode", "fully")
    set_act_quant(model, enabled and mode == "fully")


def reinit_quantizers(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, PluggableQuantLinear | PluggableQuantEmbedding):
            m.weight_quantizer.init_from(m.weight)


def set_weight_bits(model: nn.Module, bits: int) -> None:
    """Bit width of the selected groups' quantizers (CPT); the rest keep theirs."""
    for m in model.modules():
        if isinstance(m, PluggableQuantLinear | PluggableQuantEmbedding) and m.weight_quantizer.selected:
            m.weight_quantizer.set_bits(bits)
            m.weight_bits = m.weight_quantizer.storage_bits


def set_act_bits(model: nn.Module, bits: int) -> None:
    """Bit width of the activation quantizers that are not the 16-bit wide intermediates."""
    for a in model.modules():
        if isinstance(a, QuantAct) and a.bits != 16:
            a.bits = bits
    info = getattr(model, "qexport_bits", None)
    if isinstance(info, dict):
        info["act"] = bits


def set_ede(model: nn.Module, t: float, k: float) -> None:
    """IR-Net's EDE parameters on every IR-Net quantizer."""
    for q in weight_quantizers(model):
        if isinstance(q, IRNetQuantizer):
            q.set_ede(t, k)


def _rest_quantizer(mod: nn.Module, rest: str) -> WeightQuantizer:
    pc = bool(getattr(mod, "per_channel", False)) if isinstance(mod, QuantLinear) else False
    if rest == "fp":
        return IdentityQuantizer(pc)
    return MinMaxQuantizer(int(getattr(mod, "weight_bits", 8)), pc)


def apply_weight_quantization(
    model: nn.Module,
    groups: str | Sequence[str] = "ALL",
    quantizer: str = "minmax",
    bits: int = 8,
    mode: str = "fully",
    *,
    act_bits: int = 8,
    keep_last: bool = True,
    preset: str = "full",
    rest: str = "int8",
    per_channel: bool | None = None,
    **quantizer_kw: Any,
) -> list[str]:
    """Put ``quantizer`` at ``bits`` on the layers of ``groups``; returns their module names.

    Two paths:

    * integer path (``preset != "fp"``, the default): the model is swapped with
      :func:`qexport.quant.quantize_model` if it is not already; every
      QuantLinear/QuantEmbedding becomes a pluggable one. Selected layers get
      the chosen quantizer; the others (``rest``) keep the I-BERT 8-bit min/max
      (``"int8"``, bit-identical to :mod:`qexport.quant.modules`) or train in float
      (``"fp"``; they still export as 8-bit). The integer checkpoint stores each
      layer's ``int_weight()`` (:func:`qexport.quant.freeze.freeze`).
    * research path (``preset="fp"`` on a float model, the seeds' setting):
      only the selected layers are replaced; everything else stays float;
      ``mode="fully"`` adds an input activation quantizer (``act_bits``) to them.

    ``per_channel``: None = the quantizer's default (see :func:`make_quantizer`).
    ``mode``: ``"basic"`` weights only (activation quantizers observe their
    ranges but do not quantize), ``"fully"`` weights and activations.
    The classifier's last linear and the embedding tables are always quantized
    per tensor (one logits scale; one scale per table). Records
    ``model.qexport_weight_quant`` (a dict for the checkpoint manifest).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if rest not in RESTS:
        raise ConfigError(f"rest must be one of {', '.join(RESTS)}, got {rest!r}")
    qname = quantizer.lower().replace("_", "-")
    if qname == "irnet":
        qname = "ir-net"
    if qname not in QUANTIZERS:
        raise ConfigError(f"unknown weight quantizer {quantizer!r}: choose one of {', '.join(QUANTIZERS)}")
    if act_bits not in (8, 16):
        raise ConfigError(f"act_bits must be 8 or 16, got {act_bits}")
    names = resolve_groups(model, groups, keep_last=keep_last)
    last = last_linear_name(model)
    already = getattr(model, "qexport_preset", None)
    integer_path = (already is not None and already.quantized) or preset != "fp"
    if integer_path and (already is None or not already.quantized):
        from qexport.quant.swap import quantize_model

        quantize_model(model, preset, weight_bits=8, act_bits=act_bits)
    elif integer_path:
        set_act_bits(model, act_bits)
    selected = set(names)
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear | nn.Embedding):
            continue
        is_emb = isinstance(mod, nn.Embedding)
        if name in selected:
            pc: bool | None = False if (is_emb or name == last) else per_channel
            wq = make_quantizer(qname, bits, mod.weight, pc, **quantizer_kw)
            wq.selected = True
        elif integer_path and isinstance(mod, QuantLinear | QuantEmbedding):
            wq = _rest_quantizer(mod, rest)
        else:
            continue
        parent, child = _parent(model, name)
        new: nn.Module
        if is_emb:
            new = PluggableQuantEmbedding.wrap(mod, wq)
        else:
            in_bits = act_bits if (not integer_path and mode == "fully") else None
            new = PluggableQuantLinear.wrap(mod, wq, in_bits=in_bits)
        new.train(mod.training)
        new.to(mod.weight.device)
        setattr(parent, child, new)
    model.qexport_weight_quant = {  # type: ignore[assignment]
        "groups": "+".join(parse_groups(groups)),
        "quantizer": qname,
        "bits": bits,
        "mode": mode,
        "act_bits": act_bits,
        "keep_last": keep_last,
        "rest": rest,
        "per_channel": per_channel,
        "integer_path": integer_path,
        "modules": names,
        **{k: v for k, v in quantizer_kw.items() if isinstance(v, int | float | str | bool)},
    }
    set_act_quant(model, mode == "fully")
    return names


@torch.no_grad()
def weight_quant_error(model: nn.Module) -> dict[str, float]:
    """Relative L2 error ``|w_q - w| / |w|`` of every pluggable layer (diagnostics, logs)."""
    out: dict[str, float] = {}
    for name, m in model.named_modules():
        if isinstance(m, PluggableQuantLinear | PluggableQuantEmbedding):
            w = m.weight
            out[name] = float((m.weight_quantizer(w) - w).norm() / w.norm().clamp(min=1e-12))
    return out

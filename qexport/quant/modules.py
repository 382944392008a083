"""QAT modules that stand in for HF BERT/RoBERTa modules.

Training emulates the integer graph in float with straight-through gradients
(I-BERT's recipe): weights are fake-quantized per output channel, every
activation the integer graph stores is fake-quantized by a :class:`QuantAct`
that tracks its range by EMA, and the nonlinear ops use I-BERT's polynomials.
In eval mode the same modules keep their frozen scales; the exact integer
forward is :class:`qexport.models.integer.IntegerModel`, built from
:func:`qexport.quant.freeze` (the model's ``integer_forward`` uses it).

Every module can go back to float with ``to_float()`` (see :mod:`qexport.quant.swap`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qexport.ops.intmath import qmax
from qexport.ops.kernels import EXP_A, EXP_B, EXP_C, GELU_A, GELU_B, LN2


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.round(x)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g


def round_ste(x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _RoundSTE.apply(x)
    return out


def fake_quant(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """``clamp(round(x / s)) * s`` with a straight-through gradient (clipped outside the range)."""
    m = qmax(bits)
    return torch.clamp(round_ste(x / scale), -m, m) * scale


def weight_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Symmetric min/max scale: ``max|w| / qmax`` per output channel (rows) or per tensor."""
    a = w.detach().abs().amax(dim=1) if per_channel else w.detach().abs().max().reshape(1)
    return torch.clamp(a, min=1e-8) / qmax(bits)


#: Activation quantizers at or above this width only observe ranges in the float emulation.
WIDE_PASSTHROUGH_BITS = 16


class QuantAct(nn.Module):
    """Activation quantizer with an EMA of ``max |x|`` (I-BERT's QuantAct, symmetric).

    ``scale = running_max / qmax(bits)``. Training updates the EMA and
    fake-quantizes; eval fake-quantizes with the frozen scale. ``bits=16``
    marks the wide intermediates the integer graph keeps (residual sums,
    GELU/tanh inputs).
    """

    running_max: torch.Tensor
    initialized: torch.Tensor

    def __init__(self, bits: int = 8, momentum: float = 0.95, enabled: bool = True) -> None:
        super().__init__()
        self.bits = bits
        self.momentum = momentum
        self.enabled = enabled
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @property
    def scale(self) -> torch.Tensor:
        return torch.clamp(self.running_max, min=1e-8) / qmax(self.bits)

    def observe(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            cur = x.detach().abs().max().to(self.running_max.dtype)
            if not bool(self.initialized):
                self.running_max.copy_(cur)
                self.initialized.fill_(True)
            else:
                self.running_max.mul_(self.momentum).add_(cur * (1 - self.momentum))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        if self.training:
            self.observe(x)
        if not bool(self.initialized) or self.bits >= WIDE_PASSTHROUGH_BITS:
            # 16-bit intermediates: range tracking only; their rounding (2**-15 relative) is far
            # below the int8 noise the QAT emulates, and skipping it keeps QAT steps cheap
            return x
        return fake_quant(x, self.scale.to(x.dtype), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, max={float(self.running_max):.4g}"


class QuantLinear(nn.Linear):
    """``nn.Linear`` with symmetric fake-quantized weights (per output channel by default).

    ``out_act`` (optional) quantizes the output where the integer graph stores
    it as int8 (Q, K, V). The bias is quantized at freeze time to int32 with
    scale ``s_in * s_w``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: int = 8,
        per_channel: bool = True,
        out_bits: int | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight_bits = weight_bits
        self.per_channel = per_channel
        self.out_act = QuantAct(out_bits) if out_bits else None

    @classmethod
    def from_float(cls, lin: nn.Linear, **kw: object) -> QuantLinear:
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, **kw)  # type: ignore[arg-type]
        q.weight = lin.weight
        q.bias = lin.bias
        return q

    def to_float(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin

    def quant_weight(self) -> torch.Tensor:
        s = weight_scale(self.weight, self.weight_bits, self.per_channel)
        return fake_quant(self.weight, s.unsqueeze(1), self.weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.quant_weight(), self.bias)
        return self.out_act(y) if self.out_act is not None else y


class QuantEmbedding(nn.Embedding):
    """``nn.Embedding`` with a per-tensor symmetric fake-quantized table."""

    def __init__(self, num: int, dim: int, padding_idx: int | None = None, weight_bits: int = 8) -> None:
        super().__init__(num, dim, padding_idx=padding_idx)
        self.weight_bits = weight_bits

    @classmethod
    def from_float(cls, emb: nn.Embedding, weight_bits: int = 8) -> QuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, weight_bits)
        q.weight = emb.weight
        return q

    def to_float(self) -> nn.Embedding:
        e = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        e.weight = self.weight
        return e

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        s = weight_scale(self.weight, self.weight_bits, per_channel=False)
        return F.embedding(ids, fake_quant(self.weight, s, self.weight_bits), self.padding_idx)


def gelu_poly(x: torch.Tensor) -> torch.Tensor:
    """I-BERT's i-GELU in float: ``x/2 (1 + sign(u) (a (min(|u|, -b) + b)^2 + 1))``, ``u = x/sqrt2``."""
    u = x / math.sqrt(2.0)
    t = torch.clamp(u.abs(), max=-GELU_B) + GELU_B
    erf = torch.sign(u) * (GELU_A * t * t + 1.0)
    return 0.5 * x * (1.0 + erf)


def softmax_poly(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """I-BERT's i-softmax in float: ``exp(p - z ln2) ~ (0.3585 (p + 1.353)^2 + 0.344) 2^-z``."""
    x = x - x.amax(dim=dim, keepdim=True).detach()
    z = torch.floor(-x.detach() / LN2)
    live = z <= 30  # beyond 2**-30 the integer kernel's output is 0 (masked keys too)
    z = z.clamp(max=30)
    p = torch.clamp(x + z * LN2, min=-LN2)
    e = (EXP_A * (p + EXP_B) ** 2 + EXP_C) * torch.pow(2.0, -z) * live
    return e / e.sum(dim=dim, keepdim=True)


class QuantGELU(nn.Module):
    """GELU between a 16-bit input quantizer and an 8-bit output quantizer; i-GELU when ``integer``."""

    def __init__(self, integer: bool = True, act_bits: int = 8) -> None:
        super().__init__()
        self.integer = integer
        self.in_act = QuantAct(16)
        self.out_act = QuantAct(act_bits)

    def to_float(self) -> nn.Module:
        return nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_act(x)
        y = gelu_poly(x) if self.integer else F.gelu(x)
        return self.out_act(y)


class QuantTanh(nn.Module):
    """Tanh after a 16-bit input quantizer; output on the ``1/127`` grid (i-tanh's)."""

    def __init__(self, integer: bool = True) -> None:
        super().__init__()
        self.integer = integer
        self.in_act = QuantAct(16)

    def to_float(self) -> nn.Module:
        return nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.in_act(x))
        return fake_quant(y, torch.tensor(1.0 / 127, dtype=y.dtype, device=y.device), 8)


class QuantLayerNorm(nn.LayerNorm):
    """LayerNorm whose input (a residual sum) is a 16-bit integer and whose output is int8."""

    def __init__(self, normalized_shape: int, eps: float = 1e-12, integer: bool = True, act_bits: int = 8):
        super().__init__(normalized_shape, eps=eps)
        self.integer = integer
        self.in_act = QuantAct(16)
        self.out_act = QuantAct(act_bits)

    @classmethod
    def from_float(cls, ln: nn.LayerNorm, integer: bool = True, act_bits: int = 8) -> QuantLayerNorm:
        q = cls(ln.normalized_shape[0], eps=ln.eps, integer=integer, act_bits=act_bits)
        q.weight = ln.weight
        q.bias = ln.bias
        return q

    def to_float(self) -> nn.LayerNorm:
        ln = nn.LayerNorm(self.normalized_shape, eps=self.eps)
        ln.weight = self.weight
        ln.bias = self.bias
        return ln

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_act(x)
        y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.out_act(y)


class QuantAttention(nn.Module):
    """The state the integer attention needs, hung on HF's self-attention module.

    HF computes attention in a pluggable function (``ALL_ATTENTION_FUNCTIONS``);
    :func:`qexport_attention` is registered there and reads this module: the
    score softmax (i-softmax polynomial when ``integer``), the ``1/127`` grid of
    the probabilities and the int8 quantizer of the context.
    """

    def __init__(self, integer: bool = True, act_bits: int = 8) -> None:
        super().__init__()
        self.integer = integer
        self.ctx_act = QuantAct(act_bits)


def qexport_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention as the integer graph computes it (see :class:`QuantAttention`)."""
    qa: QuantAttention | None = getattr(module, "qexport_attn", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask
    integer = qa is not None and qa.integer
    probs = softmax_poly(scores, dim=-1) if integer else F.softmax(scores, dim=-1)
    if qa is not None:
        probs = fake_quant(probs, torch.tensor(1.0 / 127, dtype=probs.dtype, device=probs.device), 8)
    probs = F.dropout(probs, p=dropout, training=module.training)
    out = torch.matmul(probs, value)
    if qa is not None:
        out = qa.ctx_act(out)
    return out.transpose(1, 2).contiguous(), probs

"""Pluggable weight quantizers (seeds 002/003/004): min/max, PACT, LSQ, binary, IR-Net, ternary.

Every quantizer is a small ``nn.Module`` with one contract:

* ``forward(w) -> w_fake``: the fake-quantized weight used in training and in
  float evaluation (identity when ``enabled`` is False: latent quantization);
* ``int_repr(w) -> (q, scale)``: the integers and scales for export, with
  ``q`` int64 of ``w``'s shape, ``scale`` float32 of shape ``[rows]`` when
  per channel (one scale per output row) or ``[]`` per tensor, such that
  ``q * scale`` (scale broadcast over rows) equals ``forward(w)`` in eval mode;
* ``storage_bits``: the field width :func:`qexport.quant.packing.pack` needs for
  ``q`` (binary ``{-1, +1}`` and ternary ``{-1, 0, 1}`` values take 2 bits);
* ``param_hints()``: per-parameter optimizer hints (``lr_scale``,
  ``weight_decay``), collected into optimizer groups by :func:`quant_param_groups`.

All integer grids are symmetric (``[-qmax, qmax]``, ``qmax = 2**(bits-1) - 1``)
like the rest of the integer graph, except :class:`LSQQuantizer` with
``symmetric=False`` (the LSQ paper's ``[-2**(b-1), 2**(b-1) - 1]``).
The modules that use a quantizer are :class:`PluggableQuantLinear` and
:class:`PluggableQuantEmbedding` (subclasses of the QAT modules in :mod:`qexport.quant.modules`,
so ``freeze`` and ``dequantize_model`` still recognise them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qexport.errors import ConfigError
from qexport.ops.intmath import qmax
from qexport.quant.modules import QuantAct, QuantEmbedding, QuantLinear, round_ste

QUANTIZERS = ("minmax", "pact", "lsq", "binary", "ir-net", "ternary")
#: bit widths a multi-bit quantizer accepts (16 only for training-time schedules such as CPT;
#: an integer checkpoint takes 2, 4 or 8).
MULTIBIT_RANGE = range(2, 17)
EPS = 1e-8


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``[rows]`` -> ``[rows, 1]`` (broadcast over a weight's rows); scalars unchanged."""
    return t.reshape(-1, 1) if t.dim() == 1 else t


def _check_bits(name: str, bits: int) -> int:
    if int(bits) not in MULTIBIT_RANGE:
        hint = " (use quantizer 'binary' or 'ir-net' for 1 bit)" if bits == 1 else ""
        raise ConfigError(f"{name}: weight bits must be 2..16, got {bits}{hint}")
    return int(bits)


class WeightQuantizer(nn.Module):
    """Base class. Subclasses implement :meth:`_fake` and :meth:`int_repr`."""

    #: bit widths this quantizer can switch to with :meth:`set_bits` (None: any in MULTIBIT_RANGE)
    fixed_bits: int | None = None

    def __init__(self, bits: int, per_channel: bool) -> None:
        super().__init__()
        self.bits = int(bits)
        self.per_channel = per_channel
        self.enabled = True
        #: True for the quantizers of the selected layer groups (schedules act on those only)
        self.selected = False

    @property
    def storage_bits(self) -> int:
        return self.bits

    def set_bits(self, bits: int) -> None:
        if self.fixed_bits is not None:
            if bits != self.fixed_bits:
                raise ConfigError(f"{type(self).__name__} has fixed {self.fixed_bits}-bit weights")
            return
        self.bits = _check_bits(type(self).__name__, bits)

    def init_from(self, w: torch.Tensor) -> None:
        """(Re)initialise learned state from the weight (LSQ's step); a no-op by default."""

    def param_hints(self) -> dict[str, dict[str, float]]:
        """``{parameter name: {"lr_scale": .., "weight_decay": ..}}`` for the optimizer."""
        return {}

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        return self._fake(w)

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, enabled={self.enabled}"


class IdentityQuantizer(WeightQuantizer):
    """Full precision in training; exports as 8-bit symmetric min/max (the integer graph needs integers)."""

    def __init__(self, per_channel: bool = True) -> None:
        super().__init__(8, per_channel)

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        return w

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return MinMaxQuantizer(8, self.per_channel).int_repr(w)


class MinMaxQuantizer(WeightQuantizer):
    """Symmetric min/max (I-BERT): ``s = max|w| / qmax`` per output row or per tensor; STE.

    With ``momentum`` the range is an EMA of ``max|w|`` updated in training
    (seed 004's qparams by moving average); otherwise it is the current
    weight's. Identical to :meth:`QuantLinear.quant_weight` when ``momentum`` is None.
    """

    running_max: torch.Tensor
    initialized: torch.Tensor

    def __init__(
        self, bits: int = 8, per_channel: bool = True, momentum: float | None = None, rows: int = 1
    ) -> None:
        super().__init__(_check_bits("minmax", bits), per_channel)
        self.momentum = momentum
        if momentum is not None:
            self.register_buffer("running_max", torch.zeros(rows if per_channel else ()))
            self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _range(self, w: torch.Tensor) -> torch.Tensor:
        cur = w.detach().abs().amax(dim=1) if self.per_channel else w.detach().abs().max()
        if self.momentum is None:
            return cur
        if self.training:
            with torch.no_grad():
                if not bool(self.initialized):
                    self.running_max.copy_(cur)
                    self.initialized.fill_(True)
                else:
                    self.running_max.mul_(self.momentum).add_(cur * (1 - self.momentum))
        return self.running_max.to(w.dtype) if bool(self.initialized) else cur

    def scale(self, w: torch.Tensor) -> torch.Tensor:
        return torch.clamp(self._range(w), min=EPS) / qmax(self.bits)

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        s = _rows(self.scale(w))
        m = qmax(self.bits)
        return torch.clamp(round_ste(w / s), -m, m) * s

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale(w)
        m = qmax(self.bits)
        q = torch.clamp(torch.round(w / _rows(s)), -m, m)
        return q.to(torch.int64), s.float()


class PACTQuantizer(WeightQuantizer):
    """PACT (Choi et al. 2018) for weights, symmetric: learnable clip ``alpha``.

    ``w_c = clip(w, -alpha, alpha)``, ``s = alpha / qmax``, ``w_q = round(w_c / s) * s``.
    Gradients follow the paper's STE: ``d w_q / d w = 1`` inside ``[-alpha, alpha]``
    and 0 outside; ``d w_q / d alpha = +1`` for ``w > alpha``, ``-1`` for
    ``w < -alpha`` and 0 inside (the scale's dependence on ``alpha`` is passed
    straight through, as in the paper's eq. 3).

    Seed 003 (4-bit FFN weights, RoBERTa SST-2): init 1, LR scale 1000, weight
    decay 0.5 on ``alpha`` gave 94.2 vs 94.6 FP; those are the defaults, exposed
    through :meth:`param_hints`.
    """

    def __init__(
        self,
        bits: int = 4,
        init: float = 1.0,
        per_channel: bool = False,
        rows: int = 1,
        lr_scale: float = 1000.0,
        weight_decay: float = 0.5,
    ) -> None:
        super().__init__(_check_bits("pact", bits), per_channel)
        if init <= 0:
            raise ConfigError(f"pact: clip init must be > 0, got {init}")
        self.alpha = nn.Parameter(torch.full((rows,) if per_channel else (), float(init)))
        self.lr_scale = lr_scale
        self.weight_decay = weight_decay

    def param_hints(self) -> dict[str, dict[str, float]]:
        return {"alpha": {"lr_scale": self.lr_scale, "weight_decay": self.weight_decay}}

    def _alpha(self) -> torch.Tensor:
        return _rows(torch.clamp(self.alpha.abs(), min=EPS))

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        a = self._alpha().to(w.dtype)
        wc = torch.minimum(torch.maximum(w, -a), a)
        s = a.detach() / qmax(self.bits)
        return round_ste(wc / s) * s

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alpha()
        s = a / qmax(self.bits)
        m = qmax(self.bits)
        q = torch.clamp(torch.round(torch.minimum(torch.maximum(w, -a), a) / s), -m, m)
        scale = s.reshape(-1) if self.per_channel else s.reshape(())
        return q.to(torch.int64), scale.float()


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """Value ``x``, gradient ``g * dL/dx`` (LSQ's gradient scaling)."""
    return (x - x * g).detach() + x * g


class LSQQuantizer(WeightQuantizer):
    """LSQ (Esser et al. 2020): learned step size ``s``.

    ``w_q = round(clip(w / s, -Qn, Qp)) * s``; the step's gradient is the
    paper's ``(-w/s + round(w/s))`` inside the range, ``-Qn`` / ``Qp`` at the
    clip, times ``g = 1 / sqrt(N * Qp)`` (``N`` = weights per step: the tensor
    size, or the row length per channel). Init ``s = 2 mean|w| / sqrt(Qp)``.
    ``symmetric=True`` (default) uses ``Qn = Qp = qmax`` (the integer graph's
    grid); ``False`` the paper's ``Qn = 2**(b-1)``, ``Qp = 2**(b-1) - 1``.
    """

    def __init__(
        self,
        bits: int = 4,
        per_channel: bool = False,
        rows: int = 1,
        symmetric: bool = True,
        lr_scale: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(_check_bits("lsq", bits), per_channel)
        self.symmetric = symmetric
        self.step = nn.Parameter(torch.ones((rows,) if per_channel else ()))
        self.lr_scale = lr_scale
        self.weight_decay = weight_decay

    @property
    def qn(self) -> int:
        return qmax(self.bits) if self.symmetric else 1 << (self.bits - 1)

    @property
    def qp(self) -> int:
        return qmax(self.bits)

    def param_hints(self) -> dict[str, dict[str, float]]:
        return {"step": {"lr_scale": self.lr_scale, "weight_decay": self.weight_decay}}

    @torch.no_grad()
    def init_from(self, w: torch.Tensor) -> None:
        m = w.detach().abs().mean(dim=1) if self.per_channel else w.detach().abs().mean()
        self.step.copy_(torch.clamp(2 * m / math.sqrt(self.qp), min=EPS).reshape(self.step.shape))

    def grad_factor(self, w: torch.Tensor) -> float:
        n = w.shape[1] if self.per_channel else w.numel()
        return 1.0 / math.sqrt(n * self.qp)

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        s = _rows(grad_scale(self.step, self.grad_factor(w))).to(w.dtype)
        s = torch.clamp(s, min=EPS)
        return round_ste(torch.clamp(w / s, -self.qn, self.qp)) * s

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.clamp(self.step.detach(), min=EPS)
        q = torch.round(torch.clamp(w / _rows(s), -self.qn, self.qp))
        return q.to(torch.int64), s.float()


class _SignSTE(torch.autograd.Function):
    """``sign`` with ``0 -> +1``; backward: identity where ``|x| <= clip`` (BinaryConnect's hard-tanh STE)."""

    @staticmethod
    def forward(ctx, x, clip):
        ctx.save_for_backward(x)
        ctx.clip = clip
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.clip is None:
            return g, None
        return g * (x.abs() <= ctx.clip).to(g.dtype), None


class _SignEDE(torch.autograd.Function):
    """IR-Net's error-decay estimator: forward ``sign`` (``0 -> +1``), backward ``k t (1 - tanh^2(t x))``."""

    @staticmethod
    def forward(ctx, x, t, k):
        ctx.save_for_backward(x)
        ctx.t, ctx.k = t, k
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t, k = ctx.t, ctx.k
        return g * (k * t * (1 - torch.tanh(t * x) ** 2)), None, None


def sign_ste(x: torch.Tensor, clip: float | None = 1.0) -> torch.Tensor:
    return _SignSTE.apply(x, clip)


def sign_ede(x: torch.Tensor, t: float, k: float) -> torch.Tensor:
    return _SignEDE.apply(x, t, k)


def ede_t_k(progress: float, t_min: float = 0.1, t_max: float = 10.0) -> tuple[float, float]:
    """IR-Net's EDE schedule: ``t = 10**(log10 t_min + progress (log10 t_max - log10 t_min))``,
    ``k = max(1/t, 1)``; ``progress`` in ``[0, 1]`` (epoch / epochs in the paper)."""
    p = min(max(float(progress), 0.0), 1.0)
    lo, hi = math.log10(t_min), math.log10(t_max)
    t = 10.0 ** (lo + (hi - lo) * p)
    return t, max(1.0 / t, 1.0)


class BinaryQuantizer(WeightQuantizer):
    """1-bit weights: ``sign(w) * mean|w|`` per output row (or per tensor) (XNOR-Net / BinaryConnect).

    ``sign(0) = +1`` so every weight is ``+-alpha``. Backward: straight-through
    where ``|w| <= ste_clip`` (None: everywhere); the gradient also flows
    through ``alpha = mean|w|``. Stored as 2-bit fields (``pack`` has no 1-bit format).
    """

    fixed_bits = 1

    def __init__(self, per_channel: bool = True, ste_clip: float | None = 1.0) -> None:
        super().__init__(1, per_channel)
        self.ste_clip = ste_clip

    @property
    def storage_bits(self) -> int:
        return 2

    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        a = w.abs().mean(dim=1) if self.per_channel else w.abs().mean()
        return torch.clamp(a, min=EPS)

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        return sign_ste(w, self.ste_clip) * _rows(self._alpha(w))

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.where(w >= 0, 1, -1).to(torch.int64)
        return q, self._alpha(w).float()


class IRNetQuantizer(BinaryQuantizer):
    """IR-Net (Qin et al. 2020) binarization: balanced weights, EDE backward.

    Forward: ``w_b = (w - mean) / std`` per row (the balanced weights: zero
    mean, unit std; gradients flow through mean and std as in IR-Net's code),
    ``w_q = sign(w_b) * alpha``. ``scale="mean"`` (default): ``alpha = mean|w -
    mean|`` in weight units (the L2-optimal scale of ``sign(w - mean)``; a
    transformer has no BatchNorm to absorb the scale). ``scale="pow2"``: IR-Net's
    ``2**round(log2 mean|w_b|)`` times the row std. ``alpha`` is detached (as in IR-Net).
    Backward through ``sign``: EDE ``k t (1 - tanh^2(t w_b))``; set ``t, k`` with
    :meth:`set_ede` (schedule: :func:`ede_t_k`; IR-Net anneals ``t`` from 0.1 to 10).
    """

    def __init__(
        self, per_channel: bool = True, scale: str = "mean", t: float = 0.1, k: float = 10.0
    ) -> None:
        super().__init__(per_channel, ste_clip=None)
        if scale not in ("mean", "pow2"):
            raise ConfigError(f"ir-net: scale must be 'mean' or 'pow2', got {scale!r}")
        self.scale_mode = scale
        self.t = float(t)
        self.k = float(k)

    def set_ede(self, t: float, k: float) -> None:
        self.t, self.k = float(t), float(k)

    def _centered(self, w: torch.Tensor) -> torch.Tensor:
        """``w - mean`` as ``[rows, cols]`` (one row when per tensor)."""
        r = w if self.per_channel else w.reshape(1, -1)
        return r - r.mean(dim=1, keepdim=True)

    def balance(self, w: torch.Tensor) -> torch.Tensor:
        """``(w - mean) / std`` per row (per tensor when not per channel); ``w``'s shape."""
        c = self._centered(w)
        return (c / torch.clamp(c.std(dim=1, keepdim=True), min=EPS)).reshape(w.shape)

    @torch.no_grad()
    def _alpha(self, w: torch.Tensor) -> torch.Tensor:
        c = self._centered(w)
        if self.scale_mode == "mean":
            a = c.abs().mean(dim=1)
        else:
            sd = torch.clamp(c.std(dim=1), min=EPS)
            mb = (c / sd.unsqueeze(1)).abs().mean(dim=1)
            a = torch.pow(2.0, torch.round(torch.log2(torch.clamp(mb, min=EPS)))) * sd
        a = torch.clamp(a, min=EPS)
        return a if self.per_channel else a.reshape(())

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        return sign_ede(self.balance(w), self.t, self.k) * _rows(self._alpha(w))

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.where(self.balance(w) >= 0, 1, -1).to(torch.int64)
        return q, self._alpha(w).float()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale_mode}, t={self.t:.4g}, k={self.k:.4g}"


class TernaryQuantizer(WeightQuantizer):
    """Ternary weights (TWN, as TernaryBERT): ``{-alpha, 0, +alpha}``.

    ``delta = threshold * mean|w|`` (0.7 in TWN), ``alpha = mean(|w| : |w| > delta)``,
    per output row or per tensor; both detached; backward straight-through
    (identity; zero where ``|w| > ste_clip`` if given).
    """

    fixed_bits = 2

    def __init__(
        self, per_channel: bool = True, threshold: float = 0.7, ste_clip: float | None = None
    ) -> None:
        super().__init__(2, per_channel)
        self.threshold = threshold
        self.ste_clip = ste_clip

    @torch.no_grad()
    def delta_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(delta, alpha, mask)``: threshold and scale (``[rows]`` or ``[]``), and ``|w| > delta``."""
        a = w.abs()
        if self.per_channel:
            delta = self.threshold * a.mean(dim=1)
            mask = a > delta.unsqueeze(1)
            alpha = (a * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
        else:
            delta = self.threshold * a.mean()
            mask = a > delta
            alpha = (a * mask).sum() / mask.sum().clamp(min=1)
        return delta, torch.clamp(alpha, min=EPS), mask

    def _fake(self, w: torch.Tensor) -> torch.Tensor:
        _, alpha, mask = self.delta_alpha(w)
        wq = torch.sign(w) * mask * _rows(alpha)
        x = w if self.ste_clip is None else torch.clamp(w, -self.ste_clip, self.ste_clip)
        return x + (wq - x).detach()

    @torch.no_grad()
    def int_repr(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, alpha, mask = self.delta_alpha(w)
        return (torch.sign(w) * mask).to(torch.int64), alpha.float()


def make_quantizer(
    name: str, bits: int, weight: torch.Tensor, per_channel: bool | None = None, **kw: Any
) -> WeightQuantizer:
    """Build and initialise a quantizer for ``weight`` (``[rows, cols]``).

    ``name`` in :data:`QUANTIZERS` (or ``"fp"`` for :class:`IdentityQuantizer`);
    ``bits`` must be 1 for binary/ir-net and 2 for ternary. ``per_channel=None``
    takes the method's own default: one clip/step per layer for PACT and LSQ
    (seed 003, the LSQ paper), one scale per output row for the others. Extra keyword
    options go to the quantizer (e.g. ``init``, ``lr_scale``, ``weight_decay``
    for PACT; ``symmetric`` for LSQ; ``scale``, ``t``, ``k`` for IR-Net;
    ``threshold`` for ternary; ``momentum`` for min/max).
    """
    rows = int(weight.shape[0])
    key = name.lower().replace("_", "-")
    if per_channel is None:
        per_channel = key not in ("pact", "lsq")
    try:
        q: WeightQuantizer
        if key == "minmax":
            q = MinMaxQuantizer(bits, per_channel, rows=rows, **kw)
        elif key == "pact":
            q = PACTQuantizer(bits, per_channel=per_channel, rows=rows, **kw)
        elif key == "lsq":
            q = LSQQuantizer(bits, per_channel=per_channel, rows=rows, **kw)
        elif key in ("binary", "ir-net", "irnet"):
            if bits != 1:
                raise ConfigError(f"{name}: binarization has 1-bit weights, got bits={bits}")
            q = BinaryQuantizer(per_channel, **kw) if key == "binary" else IRNetQuantizer(per_channel, **kw)
        elif key == "ternary":
            if bits != 2:
                raise ConfigError(f"ternary: weights are 2-bit (ternary), got bits={bits}")
            q = TernaryQuantizer(per_channel, **kw)
        elif key == "fp":
            q = IdentityQuantizer(per_channel)
        else:
            raise ConfigError(f"unknown weight quantizer {name!r}: choose one of {', '.join(QUANTIZERS)}")
    except TypeError as exc:
        raise ConfigError(f"bad option for quantizer {name!r}: {exc}") from None
    q.init_from(weight)
    return q


# ----------------------------------------------------------------------------- modules using them


class PluggableQuantLinear(QuantLinear):
    """A :class:`QuantLinear` whose weight fake-quantization is delegated to ``weight_quantizer``.

    ``in_act`` (optional) quantizes the input (seed 002's "fully" mode on an
    otherwise float model). ``weight_bits`` / ``per_channel`` mirror the
    quantizer's storage width and granularity. :meth:`int_weight` is what the
    integer checkpoint stores (:func:`qexport.quant.freeze.freeze` calls it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_quantizer: WeightQuantizer | None = None,
        in_bits: int | None = None,
        out_bits: int | None = None,
    ) -> None:
        wq = weight_quantizer if weight_quantizer is not None else MinMaxQuantizer(8)
        super().__init__(
            in_features, out_features, bias=bias, weight_bits=wq.storage_bits,
            per_channel=wq.per_channel, out_bits=out_bits,
        )
        self.weight_quantizer = wq
        self.in_act = QuantAct(in_bits) if in_bits else None

    @classmethod
    def wrap(
        cls, lin: nn.Linear, quantizer: WeightQuantizer, in_bits: int | None = None
    ) -> PluggableQuantLinear:
        """Same parameters as ``lin`` (and its ``out_act`` when it is a QuantLinear)."""
        q = cls(lin.in_features, lin.out_features, bias=lin.bias is not None, weight_quantizer=quantizer,
                in_bits=in_bits)
        q.weight = lin.weight
        q.bias = lin.bias
        if isinstance(lin, QuantLinear):
            q.out_act = lin.out_act
        if isinstance(lin, PluggableQuantLinear) and in_bits is None:
            q.in_act = lin.in_act
        return q

    def quant_weight(self) -> torch.Tensor:
        return self.weight_quantizer(self.weight)

    def int_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q int64 [out, in], scale float32 [out] or [])`` for export."""
        return self.weight_quantizer.int_repr(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_act is not None:
            x = self.in_act(x)
        return super().forward(x)


class PluggableQuantEmbedding(QuantEmbedding):
    """A :class:`QuantEmbedding` whose table fake-quantization is delegated to ``weight_quantizer``.

    Embedding tables are per tensor (the integer checkpoint has one scale per table).
    """

    def __init__(
        self,
        num: int,
        dim: int,
        padding_idx: int | None = None,
        weight_quantizer: WeightQuantizer | None = None,
    ) -> None:
        wq = weight_quantizer if weight_quantizer is not None else MinMaxQuantizer(8, per_channel=False)
        if wq.per_channel:
            raise ConfigError("embedding tables take one scale: use a quantizer with per_channel=False")
        super().__init__(num, dim, padding_idx, weight_bits=wq.storage_bits)
        self.weight_quantizer = wq

    @classmethod
    def wrap(cls, emb: nn.Embedding, quantizer: WeightQuantizer) -> PluggableQuantEmbedding:
        q = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, weight_quantizer=quantizer)
        q.weight = emb.weight
        return q

    def int_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight_quantizer.int_repr(self.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_quantizer(self.weight), self.padding_idx)


def weight_quantizers(model: nn.Module) -> list[WeightQuantizer]:
    return [m for m in model.modules() if isinstance(m, WeightQuantizer)]


def quant_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    no_decay: Iterable[str] = ("bias", "LayerNorm.weight", "LayerNorm.bias"),
) -> list[dict[str, Any]]:
    """Optimizer parameter groups honouring the quantizers' hints.

    Returns ``[{"name", "params", "lr", "weight_decay", "lr_scale"}, ...]``: model
    weights (``weight_decay``), no-decay parameters (names ending in one of
    ``no_decay``), and one group per distinct ``(lr_scale, weight_decay)`` hint
    (PACT's ``alpha``: ``lr * 1000``, decay 0.5). Only parameters with
    ``requires_grad``; empty groups are dropped. LR schedulers that scale each
    group's initial ``lr`` keep the ratios.
    """
    hinted: dict[int, tuple[float, float]] = {}
    for m in weight_quantizers(model):
        for pname, h in m.param_hints().items():
            p = getattr(m, pname)
            hinted[id(p)] = (float(h.get("lr_scale", 1.0)), float(h.get("weight_decay", 0.0)))
    nd = tuple(no_decay)
    decay: list[nn.Parameter] = []
    plain: list[nn.Parameter] = []
    special: dict[tuple[float, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in hinted:
            special.setdefault(hinted[id(p)], []).append(p)
        elif name.endswith(nd):
            plain.append(p)
        else:
            decay.append(p)
    groups: list[dict[str, Any]] = [
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": weight_decay, "lr_scale": 1.0},
        {"name": "no_decay", "params": plain, "lr": lr, "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    for (scale, wd), ps in special.items():
        groups.append({"name": f"quant(lr x{scale:g}, wd {wd:g})", "params": ps, "lr": lr * scale,
                       "weight_decay": wd, "lr_scale": scale})
    return [g for g in groups if g["params"]]

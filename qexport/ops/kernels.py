"""The exact integer reference: I-BERT's integer-only kernels, once.

Every op is split in two:

* ``*_constants(scale, ...)`` folds the float scales into a frozen dataclass of
  Python ints (done once, in float64, at export/freeze time: I-BERT's
  ``b/S``, ``c/S^2``, ``ln2/S`` ...);
* ``*_int(q, consts)`` is integer arithmetic only (``torch.int64`` tensors
  holding int32 values, no float anywhere).

The ONNX functions in :mod:`qexport.export.functions` are emitted from the same
dataclasses and mirror ``*_int`` node by node, which is why the reference, ORT,
TVM and TensorRT agree bit for bit. Convenience wrappers ``i_gelu(q, scale)``
etc. return ``(q_out, scale_out)``.

Rounding: ``quantize`` rounds half to even (as ONNX QuantizeLinear); every
integer rescale rounds half away from zero (sign-magnitude, see
:mod:`qexport.ops.intmath`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from qexport.errors import OverflowRisk
from qexport.ops.intmath import (
    POW2_MAX_EXP,
    apply_sign,
    as_int,
    bitlen,
    bitlen_tensor,
    div_pos,
    div_round,
    pow2_lut,
    qmax,
    sign_split,
)

# --------------------------------------------------------------------------- quantize / requantize

#: Bits of precision of a dyadic multiplier ``m`` (``2**(P-1) <= m < 2**P``).
DYADIC_BITS = 15


def quantize(x: torch.Tensor, bits: int, scale: float | torch.Tensor) -> torch.Tensor:
    """Float -> symmetric integer: ``clamp(round_half_even(x / scale), -qmax, qmax)``.

    The only float-to-int step of the pipeline (used for weights at freeze time,
    and by presets that keep an op in float).
    """
    q = torch.round(x / scale)
    m = qmax(bits)
    return q.clamp(-m, m).to(torch.int64)


def dyadic(scale_ratio: float) -> tuple[int, int]:
    """``scale_ratio ~= m / 2**shift`` with ``m`` a ``DYADIC_BITS``-bit integer.

    Relative error of the ratio is below ``2**-DYADIC_BITS``. ``shift`` may be
    larger than 31; :func:`requant_params` pre-shifts the input so that every
    product stays inside int32.
    """
    if not (scale_ratio > 0 and math.isfinite(scale_ratio)):
        raise OverflowRisk(f"requantization ratio must be positive and finite, got {scale_ratio}")
    e = math.frexp(scale_ratio)[1]  # ratio = f * 2**e, 0.5 <= f < 1
    shift = DYADIC_BITS - e
    m = round(scale_ratio * 2.0**shift)
    if m >= 1 << DYADIC_BITS:  # rounding reached 2**P
        m, shift = m // 2, shift - 1
    if shift < 0:
        raise OverflowRisk(
            f"requantization ratio {scale_ratio:.3g} is too large (output scale far below input scale)"
        )
    return m, shift


@dataclass(frozen=True)
class RequantParams:
    """Frozen integer rescale ``q -> round(q * m / 2**shift)`` into ``bits`` bits.

    Computed as::

        a = min(|q|, bound)                     # saturation point: exact, keeps products small
        a = (a + 2**(pre-1)) // 2**pre          # pre-shift (pre may be 0)
        r = (a * m + 2**(post-1)) // 2**post    # post = shift - pre
        out = sign(q) * min(r, qmax)

    ``bound`` is the smallest ``|q|`` whose output saturates, so clamping to it
    changes nothing; ``pre`` is the smallest pre-shift that keeps
    ``a * m + 2**(post-1)`` below ``2**31``. Every intermediate fits int32 for
    any int32 input.
    """

    m: int
    shift: int
    bits: int
    bound: int
    pre: int

    @property
    def post(self) -> int:
        return self.shift - self.pre

    @property
    def qmax(self) -> int:
        return qmax(self.bits)


#: Requantization input contract: ``|q| <= 2**30`` (larger values are clamped there).
REQUANT_IN_MAX = 2**30


def requant_params(m: int, shift: int, bits: int = 8) -> RequantParams:
    """Derive the exact int32 schedule for ``round(q * m / 2**shift)`` into ``bits`` bits."""
    if bits < 2 or bits > 24:
        raise OverflowRisk(f"requantization target of {bits} bits is not supported (2..24)")
    top = qmax(bits)
    # smallest |q| with |q| m >= (top + 0.5) 2**shift: from there on the output saturates
    bound = min(-((-(2 * top + 1) << shift) // (2 * m)), REQUANT_IN_MAX)
    for pre in range(shift + 1):
        a_max = (bound + ((1 << pre) >> 1)) >> pre
        if a_max * m + ((1 << (shift - pre)) >> 1) < 2**31:
            break
    else:  # pragma: no cover - m < 2**15 always leaves room
        raise OverflowRisk(f"cannot requantize with m={m}, shift={shift} inside int32")
    return RequantParams(m=m, shift=shift, bits=bits, bound=bound, pre=pre)


def requant_from_ratio(scale_ratio: float, bits: int = 8) -> RequantParams:
    """``RequantParams`` for multiplying by ``scale_ratio`` (= input scale / output scale)."""
    return requant_params(*dyadic(scale_ratio), bits=bits)


def requantize_int(q: torch.Tensor, p: RequantParams) -> torch.Tensor:
    """Integer rescale, see :class:`RequantParams`. Input: any int32 values."""
    q = as_int(q)
    neg, a = sign_split(q)
    a = torch.clamp(a, max=p.bound)
    if p.pre:
        a = div_pos(a + (1 << (p.pre - 1)), 1 << p.pre)
    post = p.post
    r = a * p.m
    if post:
        r = div_pos(r + (1 << (post - 1)), 1 << post)
    r = torch.clamp(r, max=p.qmax)
    return apply_sign(neg, r)


def requantize(q: torch.Tensor, m: int, shift: int, bits: int = 8) -> torch.Tensor:
    """``round(q * m / 2**shift)``, ties away from zero, saturated to ``bits`` bits."""
    return requantize_int(q, requant_params(m, shift, bits))


@dataclass(frozen=True)
class ChannelRequant:
    """Per-channel (last axis) :class:`RequantParams`, as int lists (ONNX initializers)."""

    m: tuple[int, ...]
    bound: tuple[int, ...]
    pre: tuple[int, ...]
    post: tuple[int, ...]
    bits: int

    @classmethod
    def from_ratios(cls, ratios: list[float] | torch.Tensor, bits: int = 8) -> ChannelRequant:
        ps = [requant_from_ratio(float(r), bits) for r in ratios]
        return cls(
            m=tuple(p.m for p in ps),
            bound=tuple(p.bound for p in ps),
            pre=tuple(p.pre for p in ps),
            post=tuple(p.post for p in ps),
            bits=bits,
        )

    @property
    def qmax(self) -> int:
        return qmax(self.bits)

    def half_pre(self) -> list[int]:
        return [(1 << p) >> 1 for p in self.pre]

    def half_post(self) -> list[int]:
        return [(1 << p) >> 1 for p in self.post]


def requantize_channels(q: torch.Tensor, p: ChannelRequant) -> torch.Tensor:
    """Per-channel integer rescale over the last axis (same schedule as :func:`requantize_int`).

    Pre/post shifts are divisions by per-channel powers of two (a constant
    vector), which is what the ONNX ``Requant`` function receives.
    """
    q = as_int(q)
    dev = q.device
    t = lambda v: torch.tensor(v, dtype=torch.int64, device=dev)  # noqa: E731
    neg, a = sign_split(q)
    a = torch.minimum(a, t(p.bound))
    a = div_pos(a + t(p.half_pre()), t([1 << x for x in p.pre]))
    r = div_pos(a * t(p.m) + t(p.half_post()), t([1 << x for x in p.post]))
    r = torch.clamp(r, max=p.qmax)
    return apply_sign(neg, r)


# --------------------------------------------------------------------------- i-sqrt

#: Newton steps that make :func:`i_sqrt` exact for every ``0 <= n < 2**31``
#: (checked exhaustively by a slow test) and for ``n < 2**62`` with ``ISQRT_ITERS_64``.
ISQRT_ITERS_32 = 6
ISQRT_ITERS_64 = 7


def i_sqrt(n: torch.Tensor, iters: int | None = None) -> torch.Tensor:
    """``floor(sqrt(n))`` by I-BERT's integer Newton iteration (Algorithm 4).

    ``x0 = 2**ceil(bits(n)/2) >= sqrt(n)``; then ``x <- min(x, (x + n // x) // 2)``
    a fixed number of times (the ``min`` is the algorithm's stop rule written
    without a branch, so it unrolls into a static graph). Exact for every
    ``0 <= n < 2**62``; intermediates never exceed ``2 * x0 <= 2**32``, and for
    ``n < 2**31`` (the ONNX lowering) never exceed int32.
    """
    n = as_int(n)
    if n.numel() and int(n.min()) < 0:
        raise OverflowRisk("i_sqrt needs n >= 0")
    big = n.numel() and int(n.max()) >= 2**31
    if iters is None:
        iters = ISQRT_ITERS_64 if big else ISQRT_ITERS_32
    nbits = 63 if big else 31
    m = torch.clamp(n, min=1)  # n = 0 runs as n = 1 (x stays >= 1: no division by zero)
    half_bits = div_pos(bitlen_tensor(m, nbits) + 1, 2)
    x = torch.pow(torch.full_like(m, 2), half_bits)  # 2**ceil(bits/2): a Gather LUT in ONNX
    for _ in range(iters):
        x = torch.minimum(x, div_pos(x + div_pos(m, x), 2))  # x >= floor(sqrt(m)) >= 1
    return torch.where(n == 0, torch.zeros_like(n), x)


# --------------------------------------------------------------------------- i-GELU

GELU_A = -0.2888
GELU_B = -1.769
#: Bits kept for the ``1 + erf`` factor so that ``q * (1 + erf)`` stays below 2**30.
GELU_SIG_BITS = 14
GELU_IN_BITS = 16


@dataclass(frozen=True)
class GeluConsts:
    """Folded i-GELU constants for input scale ``S`` (input ``|q| <= 2**15 - 1``).

    ``pre``: right shift of ``|q|`` for the erf polynomial only (a fine input
    scale would make ``one`` overflow), ``S' = S 2**pre``;
    ``clip = round(|b| sqrt2 / S')``, ``one = round(1 / (|a| (S'/sqrt2)^2))``
    (``< 2**30``); ``shift``: right shift of the erf term so ``one_s < 2**14``.
    """

    pre: int
    clip: int
    one: int
    shift: int
    one_s: int
    in_max: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def gelu_constants(scale: float) -> GeluConsts:
    if not (scale > 0 and math.isfinite(scale)):
        raise OverflowRisk(f"i-GELU needs a positive input scale, got {scale}")
    pre = 0
    while True:
        s_erf = scale * (1 << pre) / math.sqrt(2.0)
        one = round(1.0 / (-GELU_A * s_erf * s_erf))
        if one < 2**30:
            break
        pre += 1
    clip = max(1, round(-GELU_B / s_erf))
    one = max(one, clip * clip)  # a (x+b)^2 + 1 >= 0 must hold on [0, -b]
    shift = max(0, bitlen(one) - GELU_SIG_BITS)
    one_s = (one + ((1 << shift) >> 1)) >> shift
    return GeluConsts(pre=pre, clip=clip, one=one, shift=shift, one_s=one_s, in_max=qmax(GELU_IN_BITS))


def gelu_out_scale(scale: float, c: GeluConsts) -> float:
    s_erf = scale * (1 << c.pre) / math.sqrt(2.0)
    return scale * (-GELU_A) * s_erf * s_erf * (1 << c.shift) / 2.0


def i_gelu_int(q: torch.Tensor, c: GeluConsts) -> torch.Tensor:
    """i-GELU on integers: ``q * (1 + L(q))`` with I-BERT's erf polynomial.

    Input ``|q| <= 2**15 - 1`` (clamped). ``a = round(|q| / 2**pre)``;
    ``L = sign(q) (one - (clip - min(a, clip))^2)`` scaled down by ``2**shift``:
    ``|erf term| <= one_s <= 2**14``, so the output
    ``|q * (one_s + L)| <= 2**15 * 2**15 = 2**30``. All intermediates:
    ``clip^2 <= one < 2**30``.
    """
    q = torch.clamp(as_int(q), -c.in_max, c.in_max)
    neg, a = sign_split(q)
    if c.pre:
        a = div_pos(a + (1 << (c.pre - 1)), 1 << c.pre)
    d = c.clip - torch.clamp(a, max=c.clip)  # >= 0
    t = c.one - d * d  # >= 0 (one >= clip^2)
    if c.shift:
        t = div_pos(t + (1 << (c.shift - 1)), 1 << c.shift)
    erf = apply_sign(neg, t)
    return q * (c.one_s + erf)


def i_gelu(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Integer-only GELU (I-BERT). Input: ``|q| < 2**15`` with real value ``q * scale``.

    Returns ``(q_out, scale_out)`` with ``|q_out| <= 2**30``. Accuracy vs
    ``torch.nn.functional.gelu`` on ``x in [-8, 8]`` with a 16-bit input scale:
    max abs error <= 0.02 (I-BERT's polynomial; the integer folding adds
    < 1e-3). Asserted in tests.
    """
    c = gelu_constants(scale)
    return i_gelu_int(q, c), gelu_out_scale(scale, c)


# --------------------------------------------------------------------------- i-exp / i-softmax

LN2 = math.log(2.0)
EXP_A = 0.3585
EXP_B = 1.353
EXP_C = 0.344
#: Finest exponent grid: at most 2**12 integer steps per ln 2.
EXP_LN2_STEPS = 12
#: Bits of one i-exp output (sums over 2**11 keys stay below 2**31).
EXP_OUT_BITS = 20
#: Scores are clamped to this magnitude; masked keys are set to ``-MASK_FILL``.
SCORE_MAX = 2**28
MASK_FILL = 2**28


@dataclass(frozen=True)
class ExpConsts:
    """Folded i-exp constants for input scale ``S`` (inputs ``<= 0``).

    ``pre``: right shift that coarsens the input so ``ln2 / S' <= 2**12``;
    ``ln2 = round(ln2 / S')``; ``b = round(1.353 / S')``;
    ``c = round(0.344 / (0.3585 S'^2))``; ``e``: extra right shift so that
    ``exp(0) ~ (b^2 + c) >> e < 2**20``.
    """

    pre: int
    ln2: int
    b: int
    c: int
    e: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def exp_constants(scale: float) -> ExpConsts:
    steps = LN2 / scale
    pre = max(0, math.ceil(math.log2(steps)) - EXP_LN2_STEPS) if steps > 1 else 0
    s = scale * (1 << pre)
    ln2 = max(1, round(LN2 / s))
    b = round(EXP_B / s)
    c = round(EXP_C / (EXP_A * s * s))
    top = b * b + c
    e = max(0, bitlen(top) - EXP_OUT_BITS)
    if top >= 2**31 or e > POW2_MAX_EXP:
        raise OverflowRisk(f"i-exp scale {scale:.3g} out of range")
    return ExpConsts(pre=pre, ln2=ln2, b=b, c=c, e=e)


def exp_out_scale(scale: float, c: ExpConsts) -> float:
    s = scale * (1 << c.pre)
    return EXP_A * s * s * (1 << c.e)


def i_exp_int(x: torch.Tensor, c: ExpConsts) -> torch.Tensor:
    """``exp`` of non-positive integers: ``L(p) >> z`` with ``x = -z ln2 + p``.

    Input ``-2**30 <= x <= 0``. ``z = (-x) // ln2`` and ``p = x + z ln2`` in
    ``(-ln2, 0]``; ``L(p) = (p + b)^2 + c <= b^2 + c < 2**27``; the shift by
    ``z + e`` is a division by ``POW2[min(z + e, 30)]`` (a Gather table in ONNX).
    Output in ``[0, 2**20)``.
    """
    x = as_int(x)
    nx = -x  # >= 0
    if c.pre:
        nx = div_pos(nx, 1 << c.pre)
    z = div_pos(nx, c.ln2)
    p = z * c.ln2 - nx  # in (-ln2, 0]
    poly = (p + c.b) * (p + c.b) + c.c
    idx = torch.clamp(z + c.e, max=POW2_MAX_EXP)
    lut = pow2_lut(x.device)
    return div_pos(poly, lut[idx])


def i_exp(q: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """Integer-only ``exp`` for ``q <= 0`` (I-BERT's i-exp).

    Returns ``(q_out, scale_out)``, ``0 <= q_out < 2**20``. Relative error vs
    ``exp`` over ``x in [-10, 0]`` (12-step ln 2 grid): <= 0.5% + one output step.
    """
    c = exp_constants(scale)
    return i_exp_int(q, c), exp_out_scale(scale, c)


@dataclass(frozen=True)
class SoftmaxConsts:
    exp: ExpConsts
    out_max: int

    def as_dict(self) -> dict[str, int]:
        return {**self.exp.as_dict(), "out_max": self.out_max}


def softmax_constants(scale: float, out_bits: int = 8) -> SoftmaxConsts:
    return SoftmaxConsts(exp=exp_constants(scale), out_max=qmax(out_bits))


def i_softmax_int(q: torch.Tensor, c: SoftmaxConsts, dim: int = -1) -> torch.Tensor:
    """Integer softmax along ``dim``: ``round(out_max * e_i / sum e)``.

    Input ``|q| <= 2**28`` (clamped). Row length up to 2**11 keeps the sum of
    i-exp outputs (each ``< 2**20``) below ``2**31``; ``e_i * out_max < 2**27``.
    The maximum element has ``e >= 2**19``, so the divisor is never zero.
    Output in ``[0, out_max]`` with scale ``1 / out_max``.
    """
    q = torch.clamp(as_int(q), -SCORE_MAX, SCORE_MAX)
    x = q - q.amax(dim=dim, keepdim=True)
    e = i_exp_int(x, c.exp)
    total = torch.clamp(e.sum(dim=dim, keepdim=True), min=1)
    return div_pos(e * c.out_max + div_pos(total, 2), total)


def i_softmax(
    q: torch.Tensor, scale: float, dim: int = -1, out_bits: int = 8
) -> tuple[torch.Tensor, float]:
    """Integer-only softmax (I-BERT). Returns ``(q_out, 1 / (2**(out_bits-1) - 1))``.

    Max abs error vs ``torch.softmax`` on rows of scores in ``[-20, 20]``:
    <= 1.5 output steps (1/127 each at 8 bits). Asserted in tests.
    """
    c = softmax_constants(scale, out_bits)
    return i_softmax_int(q, c, dim), 1.0 / c.out_max


# --------------------------------------------------------------------------- i-tanh (pooler / RoBERTa head)


@dataclass(frozen=True)
class TanhConsts:
    exp: ExpConsts
    one: int
    out_max: int
    in_max: int

    def as_dict(self) -> dict[str, int]:
        return {**self.exp.as_dict(), "one": self.one, "out_max": self.out_max, "in_max": self.in_max}


def tanh_constants(scale: float, out_bits: int = 8, in_bits: int = 16) -> TanhConsts:
    ec = exp_constants(2.0 * scale)
    one = (ec.b * ec.b + ec.c) >> ec.e  # i-exp(0)
    return TanhConsts(exp=ec, one=one, out_max=qmax(out_bits), in_max=qmax(in_bits))


def i_tanh_int(q: torch.Tensor, c: TanhConsts) -> torch.Tensor:
    """``tanh(x) = sign(x) (1 - e) / (1 + e)`` with ``e = i-exp(-2|x|)``.

    Input ``|q| < 2**15``; ``e <= one < 2**20``; ``(one - e) * out_max < 2**27``.
    Output in ``[-out_max, out_max]``, scale ``1 / out_max``.
    """
    q = torch.clamp(as_int(q), -c.in_max, c.in_max)
    neg, a = sign_split(q)
    e = torch.clamp(i_exp_int(-a, c.exp), max=c.one)
    den = c.one + e
    r = div_pos((c.one - e) * c.out_max + div_pos(den, 2), den)
    return apply_sign(neg, r)


def i_tanh(q: torch.Tensor, scale: float, out_bits: int = 8) -> tuple[torch.Tensor, float]:
    """Integer-only tanh built on i-exp. Max abs error vs ``tanh`` <= 0.015 on ``[-6, 6]``."""
    c = tanh_constants(scale, out_bits)
    return i_tanh_int(q, c), 1.0 / c.out_max


# --------------------------------------------------------------------------- i-LayerNorm

#: LayerNorm input contract: ``|q| <= 2**17`` (a sum of up to four 16-bit terms).
LN_IN_MAX = 2**17
#: ``norm = y * 2**LN_G / sqrt(sum y^2)`` has ``LN_G`` fractional bits.
LN_G = 12
LN_GAMMA_BITS = 16


@dataclass(frozen=True)
class LayerNormConsts:
    """Folded i-LayerNorm constants for a row length ``n`` and output scale.

    ``keep``: bits of ``|y|`` kept for the variance (``n * 2**(2 keep) < 2**31``);
    ``gamma``: per-channel integer gain, ``beta``: per-channel integer offset in
    ``norm * gamma`` units; ``out``: requantization of ``norm * gamma + beta``.
    """

    n: int
    keep: int
    gamma: tuple[int, ...]
    beta: tuple[int, ...]
    out: ChannelRequant

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def layernorm_constants(
    weight: torch.Tensor, bias: torch.Tensor, out_scale: float, out_bits: int = 8
) -> LayerNormConsts:
    """Fold LayerNorm's affine parameters and the output scale into integers.

    The normalised value has scale ``sqrt(n) / 2**LN_G`` whatever the input
    scale (LayerNorm is scale-invariant), so the input scale is not needed.
    """
    w = weight.detach().double().flatten()
    b = bias.detach().double().flatten()
    n = w.numel()
    keep = int((30 - math.log2(n)) // 2)
    if keep < 4:
        raise OverflowRisk(f"i-LayerNorm row length {n} too long for int32 variance")
    s_norm = math.sqrt(n) / (1 << LN_G)
    gmax = float(w.abs().max()) or 1.0
    s_gamma = gmax / qmax(LN_GAMMA_BITS)
    gamma = torch.round(w / s_gamma).to(torch.int64)
    s_acc = s_norm * s_gamma
    beta = torch.round(b / s_acc).to(torch.int64)
    if int(beta.abs().max()) >= 2**29:
        raise OverflowRisk("i-LayerNorm bias too large for its output scale")
    ratio = s_acc / out_scale
    out = ChannelRequant.from_ratios([ratio] * n, bits=out_bits)
    return LayerNormConsts(
        n=n, keep=keep, gamma=tuple(gamma.tolist()), beta=tuple(beta.tolist()), out=out
    )


def i_layernorm_int(q: torch.Tensor, c: LayerNormConsts) -> torch.Tensor:
    """Integer LayerNorm over the last axis (I-BERT, with a per-row shift).

    1. ``y = q - round(sum q / n)``, ``|y| <= 2**18`` (input ``|q| <= 2**17``, clamped).
    2. per row ``k = max(0, bits(max |y|) - keep)``; ``ys = sign(y) (|y| // 2**k)``,
       so ``S = sum ys^2 < n * 2**(2 keep) < 2**31``.
    3. ``sd = max(i_sqrt(S), 1)`` (the guard that makes a constant row safe),
       ``den = sd * 2**k <= 2**(keep + k) * sqrt(n) < 2**31``.
    4. ``norm = round(y * 2**12 / den)``, ``|norm| <= 2**13`` (``|y| <~ den``).
    5. ``out = requant(norm * gamma + beta)``, ``|norm * gamma| <= 2**28``.
    """
    q = torch.clamp(as_int(q), -LN_IN_MAX, LN_IN_MAX)
    dev = q.device
    n = c.n
    mean = div_round(q.sum(-1, keepdim=True), n)
    y = q - mean
    neg, a = sign_split(y)
    amax = a.amax(-1, keepdim=True)
    k = torch.clamp(bitlen_tensor(amax, 20) - c.keep, min=0)
    p2 = pow2_lut(dev)[k]
    ys = div_pos(a, p2)
    ssq = (ys * ys).sum(-1, keepdim=True)
    sd = torch.clamp(i_sqrt(ssq, ISQRT_ITERS_32), min=1)
    den = sd * p2
    norm = apply_sign(neg, div_pos(a * (1 << LN_G) + div_pos(den, 2), den))
    gamma = torch.tensor(c.gamma, dtype=torch.int64, device=dev)
    beta = torch.tensor(c.beta, dtype=torch.int64, device=dev)
    return requantize_channels(norm * gamma + beta, c.out)


def i_layernorm(
    q: torch.Tensor,
    scale: float,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    out_scale: float | None = None,
    out_bits: int = 8,
) -> tuple[torch.Tensor, float]:
    """Integer-only LayerNorm. Input ``|q| <= 2**17`` with scale ``scale``.

    ``eps`` only matters for rows of (near) zero variance; the integer version
    replaces it by the guard ``sqrt >= 1`` (a constant row maps to ``bias``).
    ``out_scale`` defaults to ``max(|weight| sqrt(n) + |bias|) / qmax`` (no
    clipping possible). Accuracy vs ``torch.nn.functional.layer_norm`` for
    rows with std >= 2**10 input steps: max abs error <= 1 output step + 0.01.
    """
    del scale, eps  # LayerNorm is invariant to the input scale; see docstring for eps
    n = weight.numel()
    if out_scale is None:
        out_scale = float((weight.abs() * math.sqrt(n) + bias.abs()).max()) / qmax(out_bits)
    c = layernorm_constants(weight, bias, out_scale, out_bits)
    return i_layernorm_int(q, c), out_scale


# --------------------------------------------------------------------------- integer linear


def int_matmul(x: torch.Tensor, w_t: torch.Tensor) -> torch.Tensor:
    """Exact ``x @ w_t`` for integer tensors (int8-valued operands).

    Runs in float64, which is exact while ``|acc| < 2**53`` (int8 x int8 over
    any realistic K), then converts back to int64.
    """
    return torch.matmul(x.double(), w_t.double()).round().to(torch.int64)

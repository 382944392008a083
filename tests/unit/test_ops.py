"""The exact integer kernels: exactness, int32 bounds at the documented extremes, accuracy.

Every kernel runs under :class:`Int32Guard`, a TorchFunctionMode that checks
*every* integer intermediate the kernel creates stays inside int32 - the
property the ONNX lowering (int32 only) depends on.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import TorchFunctionMode

from qexport.errors import OverflowRisk
from qexport.ops import (
    dyadic,
    i_exp,
    i_gelu,
    i_layernorm,
    i_softmax,
    i_sqrt,
    i_tanh,
    quantize,
    requant_from_ratio,
    requantize,
    requantize_int,
)
from qexport.ops.kernels import MASK_FILL, SCORE_MAX

I32 = 2**31


class Int32Guard(TorchFunctionMode):
    """Fail if any integer tensor produced inside the block leaves [-2**31, 2**31)."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple) else (out,)
        for o in outs:
            integer = isinstance(o, torch.Tensor) and not o.is_floating_point() and o.dtype != torch.bool
            if integer and o.numel():
                lo, hi = int(o.min()), int(o.max())
                self.peak = max(self.peak, abs(lo), abs(hi))
                assert lo >= -I32 and hi < I32, f"{func.__name__} produced {lo}..{hi} (outside int32)"
        return out


def guarded(fn, *args, **kw):  # type: ignore[no-untyped-def]
    with Int32Guard() as g:
        out = fn(*args, **kw)
    return out, g.peak


# --------------------------------------------------------------------------- i-sqrt


def _squares_edges(limit_bits: int) -> torch.Tensor:
    vals = {0, 1, 2, 3}
    for k in range(1, limit_bits // 2 + 1):
        for base in (1 << (2 * k), (1 << (2 * k - 1))):
            for d in range(-3, 4):
                if 0 <= base + d < 2**limit_bits:
                    vals.add(base + d)
    r = torch.randint(1, 2 ** (limit_bits // 2) - 1, (2000,), generator=torch.Generator().manual_seed(0))
    for x in r.tolist():
        vals.update({x * x - 1, x * x, x * x + 2 * x})
    vals.add(2**limit_bits - 1)
    return torch.tensor(sorted(v for v in vals if 0 <= v < 2**limit_bits), dtype=torch.int64)


@pytest.mark.parametrize("bits", [31, 62])
def test_isqrt_exact_on_edges(bits: int) -> None:
    n = _squares_edges(bits)
    x = i_sqrt(n)
    assert [int(v) for v in x] == [math.isqrt(int(v)) for v in n]


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**62 - 1))
def test_isqrt_exact_random(n: int) -> None:
    assert int(i_sqrt(torch.tensor([n]))[0]) == math.isqrt(n)


def test_isqrt_int32_inputs_stay_int32() -> None:
    n = _squares_edges(31)
    _, peak = guarded(i_sqrt, n)
    assert peak < I32


def test_isqrt_rejects_negative() -> None:
    with pytest.raises(OverflowRisk):
        i_sqrt(torch.tensor([-1]))


@pytest.mark.slow
def test_isqrt_exhaustive_int32() -> None:
    """Every 0 <= n < 2**31 (the ONNX ISqrt domain), in chunks."""
    step = 1 << 25
    for start in range(0, 2**31, step):
        n = torch.arange(start, start + step, dtype=torch.int64)
        x = i_sqrt(n)
        assert bool(((x * x <= n) & ((x + 1) * (x + 1) > n)).all()), f"chunk at {start}"


# --------------------------------------------------------------------------- requantization


@settings(max_examples=200, deadline=None)
@given(
    ratio=st.floats(1e-7, 200.0, allow_nan=False),
    bits=st.sampled_from([8, 16]),
    seed=st.integers(0, 2**16),
)
def test_requantize_close_to_exact_and_int32(ratio: float, bits: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.cat([
        torch.randint(-(2**30), 2**30, (4000,), generator=g),
        torch.randint(-3000, 3000, (1000,), generator=g),
        torch.tensor([0, 1, -1, 2**30, -(2**30), 2**31 - 1, -(2**31) + 1]),
    ])
    m, shift = dyadic(ratio)
    assert 2**14 <= m < 2**15
    assert abs(m / 2**shift - ratio) <= ratio * 2**-14
    out, _ = guarded(requantize, q, m, shift, bits)
    top = 2 ** (bits - 1) - 1
    qc = q.clamp(-(2**30), 2**30)
    exact = torch.clamp(torch.round(qc.double() * m / 2**shift), -top, top).to(torch.int64)
    assert int((out - exact).abs().max()) <= 1
    p = requant_from_ratio(ratio, bits)
    if p.pre == 0:  # single rounding: exact (ties away from zero vs torch's half-even: compare off-ties)
        off_tie = (qc.double() * m / 2**shift) % 1 != 0.5
        assert torch.equal(out[off_tie], exact[off_tie])


def test_requantize_saturates_and_is_symmetric() -> None:
    p = requant_from_ratio(0.01, 8)
    q = torch.tensor([0, 49, 50, 51, 12700, 12750, 10**9, -49, -50, -51, -(10**9)])
    out = requantize_int(q, p)
    assert out.tolist() == [0, 0, 1, 1, 127, 127, 127, 0, -1, -1, -127]
    assert torch.equal(requantize_int(-q, p), -out)


def test_dyadic_rejects_bad_ratio() -> None:
    for bad in (0.0, -1.0, float("nan"), float("inf"), 2.0**20):
        with pytest.raises(OverflowRisk):
            dyadic(bad)


def test_quantize_rounds_half_even_and_clamps() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, 1000.0, -1000.0])
    assert quantize(x, 8, 1.0).tolist() == [0, 2, 2, 0, 127, -127]
    assert quantize(x, 4, 1.0).tolist() == [0, 2, 2, 0, 7, -7]


# --------------------------------------------------------------------------- nonlinear kernels


@settings(max_examples=40, deadline=None)
@given(xmax=st.floats(0.5, 40.0))
def test_i_gelu_bounds_at_extremes(xmax: float) -> None:
    s = xmax / 32767
    q = torch.tensor([-32767, -32766, -1, 0, 1, 32766, 32767, -(2**20), 2**20])  # last two: clamped
    out, peak = guarded(i_gelu, q, s)
    assert int(out[0].abs().max()) <= 2**30 and peak < I32


def test_i_gelu_accuracy() -> None:
    x = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    s = 8 / 32767
    (y, so), _ = guarded(i_gelu, quantize(x, 16, s), s)
    assert float((y * so - F.gelu(x)).abs().max()) <= 0.02


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-7, 0.5))
def test_i_exp_bounds(scale: float) -> None:
    q = torch.cat([torch.arange(-5000, 1), torch.tensor([-(2**30), -MASK_FILL - SCORE_MAX])])
    (e, _), peak = guarded(i_exp, q, scale)
    assert int(e.min()) >= 0 and int(e.max()) < 2**20 and peak < I32


def test_i_exp_accuracy() -> None:
    x = torch.linspace(-10, 0, 10001, dtype=torch.float64)
    s = 10 / 2**20
    (e, se), _ = guarded(i_exp, torch.round(x / s).to(torch.int64), s)
    err = (e * se - torch.exp(x)).abs()
    assert float((err / torch.exp(x))[x > -5].max()) <= 0.025
    assert float(err.max()) <= 0.005


@settings(max_examples=40, deadline=None)
@given(scale=st.floats(1e-6, 0.2), seed=st.integers(0, 1000), n=st.sampled_from([1, 7, 128, 2048]))
def test_i_softmax_bounds_and_sum(scale: float, seed: int, n: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-SCORE_MAX, SCORE_MAX, (3, n), generator=g)
    q[1] = -MASK_FILL  # a fully masked row
    q[2, : n // 2] = SCORE_MAX
    (p, sp), peak = guarded(i_softmax, q, scale)
    assert peak < I32 and int(p.min()) >= 0 and int(p.max()) <= 127
    assert sp == pytest.approx(1 / 127)
    assert (p.sum(-1) - 127).abs().max() <= n  # per-element rounding only


def test_i_softmax_accuracy() -> None:
    x = torch.randn(256, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    s = 40 / 2**20
    (p, sp), _ = guarded(i_softmax, torch.round(x / s).to(torch.int64), s)
    assert float((p * sp - torch.softmax(x, -1)).abs().max()) <= 1.5 * sp


def test_i_tanh_accuracy_and_bounds() -> None:
    x = torch.linspace(-6, 6, 6001, dtype=torch.float64)
    s = 6 / 32767
    (t, st_), peak = guarded(i_tanh, torch.round(x / s).to(torch.int64), s)
    assert float((t * st_ - torch.tanh(x)).abs().max()) <= 0.015 and peak < I32
    assert torch.equal(t, -t.flip(0))  # odd


@pytest.mark.parametrize("n", [64, 384, 768, 1024])
def test_i_layernorm_bounds_at_extremes(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, generator=g) * 2, torch.randn(n, generator=g)
    rows = torch.stack([
        torch.full((n,), 2**17),  # constant row: variance 0
        torch.full((n,), -(2**17)),
        torch.where(torch.arange(n) % 2 == 0, 2**17, -(2**17)),  # max spread
        torch.zeros(n, dtype=torch.int64).index_fill(0, torch.tensor([0]), 2**17),  # one outlier
        torch.randint(-3, 4, (n,), generator=g),  # tiny variance
    ]).to(torch.int64)
    (out, _), peak = guarded(i_layernorm, rows, 1e-3, w, b, out_scale=0.05)
    assert peak < I32 and int(out.abs().max()) <= 127


@pytest.mark.parametrize("std", [0.05, 1.0, 20.0])
def test_i_layernorm_accuracy(std: float) -> None:
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(384, generator=g) * 0.3 + 1, torch.randn(384, generator=g) * 0.1
    x = torch.randn(64, 384, dtype=torch.float64, generator=g) * std + 0.5
    s = float(x.abs().max()) / 2**16
    (o, so), _ = guarded(i_layernorm, torch.round(x / s).to(torch.int64), s, w, b, out_scale=6 / 127)
    ref = F.layer_norm(x, (384,), w.double(), b.double())
    assert float((o * so - ref.clamp(-6, 6)).abs().max()) <= so + 0.01


def test_i_layernorm_constant_row_gives_bias() -> None:
    w, b = torch.ones(32), torch.linspace(-1, 1, 32)
    o, so = i_layernorm(torch.full((1, 32), 777), 1.0, w, b, out_scale=1 / 127)
    assert torch.equal(o[0], torch.round(b * 127).to(torch.int64))


def test_kernels_reject_float_inputs() -> None:
    with pytest.raises(TypeError):
        i_sqrt(torch.tensor([4.0]))

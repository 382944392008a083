"""Integer building blocks shared by every integer op.

All functions take and return ``torch.int64`` tensors whose values are kept
inside the int32 range by each caller's documented bounds; the int64 dtype
only lets tests *see* an overflow instead of wrapping.

Division is only ever done on non-negative operands with a positive divisor,
so truncating division (ONNX, TensorRT, C) and floor division agree; a signed
value is split into sign and magnitude first. This is the rule the ONNX
lowering follows too (see :mod:`qexport.export.functions`).
"""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1
#: Largest power of two kept in the shift look-up tables (``POW2_LUT[i] == 2**i``).
POW2_MAX_EXP = 30


def qmax(bits: int) -> int:
    """Largest magnitude of a symmetric ``bits``-bit integer: ``2**(bits-1) - 1``."""
    return (1 << (bits - 1)) - 1


def bitlen(n: int) -> int:
    """Python-int bit length (``bitlen(0) == 0``)."""
    return int(n).bit_length()


def as_int(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.int64:
        if x.is_floating_point():
            raise TypeError(f"integer kernel got a {x.dtype} tensor")
        x = x.to(torch.int64)
    return x


def sign_split(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(neg, |q|)`` with ``neg`` a bool mask."""
    return q < 0, q.abs()


def apply_sign(neg: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    return torch.where(neg, -mag, mag)


def div_pos(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """``a // b`` for ``a >= 0`` and ``b > 0`` (truncation == floor here)."""
    return torch.div(a, b, rounding_mode="floor")


def div_round(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """``round(a / b)`` with ties away from zero, for signed ``a`` and ``b > 0``.

    Computed as ``sign(a) * ((|a| + b // 2) // b)``; ``|a| + b // 2`` must fit int32.
    """
    neg, mag = sign_split(a)
    half = div_pos(b, 2) if isinstance(b, torch.Tensor) else b // 2
    return apply_sign(neg, div_pos(mag + half, b))


def shift_round(a: torch.Tensor, s: int) -> torch.Tensor:
    """``round(a / 2**s)``, ties away from zero (``s >= 0``)."""
    if s == 0:
        return a
    return div_round(a, 1 << s)


def pow2_lut(device: torch.device | None = None) -> torch.Tensor:
    """``[2**0, ..., 2**30]``: the Gather table that replaces BitShift."""
    return torch.tensor([1 << i for i in range(POW2_MAX_EXP + 1)], dtype=torch.int64, device=device)


def bitlen_tensor(n: torch.Tensor, max_bits: int = 31) -> torch.Tensor:
    """Bit length of each non-negative element: ``sum_i [n >= 2**i]`` for ``i < max_bits``.

    Comparisons against constants only, so it lowers to GreaterOrEqual + Cast + ReduceSum.
    """
    thresholds = torch.tensor([1 << i for i in range(max_bits)], dtype=torch.int64, device=n.device)
    return (n.unsqueeze(-1) >= thresholds).to(torch.int64).sum(-1)


def check_range(x: torch.Tensor, bound: int, what: str) -> None:
    """Raise :class:`~qexport.errors.OverflowRisk` if ``|x| > bound`` anywhere (debug aid)."""
    from qexport.errors import OverflowRisk

    if x.numel() and int(x.abs().max()) > bound:
        raise OverflowRisk(f"{what}: |value| {int(x.abs().max())} exceeds {bound}")

"""Pack 4- and 2-bit signed weights 2 and 4 per byte (true size on disk).

Values are stored two's complement in ``bits``-bit fields, little end first:
element ``i`` of a row lives in byte ``i // per_byte`` at bit ``(i % per_byte) * bits``.
Rows are padded to a whole number of bytes.
"""

from __future__ import annotations

import torch

from qexport.errors import CheckpointError


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed ``bits``-bit values (last axis) -> uint8 bytes."""
    if bits == 8:
        return q.to(torch.int8)
    if bits not in (2, 4):
        raise ValueError(f"cannot pack {bits}-bit values")
    per = 8 // bits
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if q.numel() and (int(q.min()) < lo or int(q.max()) > hi):
        raise ValueError(f"values outside the {bits}-bit range")
    n = q.shape[-1]
    pad = (-n) % per
    u = (q.to(torch.int64) & ((1 << bits) - 1)).to(torch.uint8)
    if pad:
        u = torch.nn.functional.pad(u, (0, pad))
    u = u.reshape(*q.shape[:-1], -1, per)
    out = torch.zeros(u.shape[:-1], dtype=torch.uint8)
    for i in range(per):
        out |= u[..., i] << (i * bits)
    return out


def unpack(b: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 bytes -> int8 values, last axis cut to ``n``."""
    if bits == 8:
        return b.to(torch.int8)
    if b.dtype != torch.uint8:
        raise CheckpointError(f"packed {bits}-bit weights must be uint8, found {b.dtype}")
    per = 8 // bits
    mask = (1 << bits) - 1
    parts = [((b >> (i * bits)) & mask).to(torch.int16) for i in range(per)]
    v = torch.stack(parts, dim=-1).reshape(*b.shape[:-1], -1)[..., :n]
    v = torch.where(v >= (1 << (bits - 1)), v - (1 << bits), v)
    return v.to(torch.int8)

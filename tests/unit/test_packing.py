"""4- and 2-bit packing: lossless round trip and true byte counts."""

from __future__ import annotations

import pytest
import torch

from qexport.quant.packing import pack, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n", [1, 3, 8, 33])
def test_pack_roundtrip(bits: int, n: int) -> None:
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (5, n), generator=torch.Generator().manual_seed(n))
    b = pack(q, bits)
    assert b.numel() * b.element_size() == 5 * ((n * bits + 7) // 8)
    assert torch.equal(unpack(b, bits, n).to(torch.int64), q)


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        pack(torch.tensor([[8]]), 4)

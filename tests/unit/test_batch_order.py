"""Training batch order (plain and grouped by length) and evaluation splits in length order."""

from __future__ import annotations

import torch

from qexport.train.batches import EncodedSplit, EpochOrder


def _lengths(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 64, (n,), generator=torch.Generator().manual_seed(seed))


def _padding(batches: list[list[int]], lengths: torch.Tensor) -> int:
    return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in batches)


def test_grouped_epoch_is_a_permutation_with_less_padding() -> None:
    n, bs = 2000, 16
    lengths = _lengths(n)
    plain = EpochOrder(n, bs, seed=3).epoch(0)
    grouped = EpochOrder(n, bs, seed=3, lengths=lengths).epoch(0)
    assert sorted(i for b in grouped for i in b) == list(range(n))
    assert len(grouped) == len(plain) == -(-n // bs)
    assert _padding(grouped, lengths) < _padding(plain, lengths) / 4
    # batches come from the whole split, not in length order
    widths = [int(lengths[b].max()) for b in grouped]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)


def test_grouped_order_depends_on_seed_and_epoch_only() -> None:
    lengths = _lengths(500)
    a = EpochOrder(500, 8, seed=1, lengths=lengths)
    b = EpochOrder(500, 8, seed=1, lengths=lengths.clone())
    assert a.epoch(2) == b.epoch(2)  # a resumed run sees the same batches
    assert a.epoch(2) != a.epoch(3)
    assert a.epoch(2) != EpochOrder(500, 8, seed=2, lengths=lengths).epoch(2)


def test_grouped_order_shards_across_ranks() -> None:
    lengths = _lengths(301)
    rows = [i for r in range(2) for b in EpochOrder(301, 8, 0, world_size=2, rank=r, lengths=lengths).epoch(0)
            for i in b]
    assert set(rows) == set(range(301))  # DistributedSampler pads 301 to 302 with one repeat


def test_by_length_keeps_row_label_pairs() -> None:
    n = 40
    lengths = _lengths(n, seed=5)
    width = int(lengths.max())
    mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 1000, (n, width)) * mask
    labels = torch.randint(0, 3, (n,))
    split = EncodedSplit(ids, mask, labels, num_truncated=2)
    s = split.by_length()
    assert s.attention_mask.sum(1).tolist() == sorted(lengths.tolist())
    assert s.num_truncated == 2
    pairs = {(tuple(i.tolist()), int(y)) for i, y in zip(ids, labels, strict=True)}
    assert {(tuple(i.tolist()), int(y)) for i, y in zip(s.input_ids, s.labels, strict=True)} == pairs
    # batches of sorted rows carry less padding than the split's order
    pad = sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in split.sequential(8))
    pad_sorted = sum(int(b["attention_mask"].numel() - b["attention_mask"].sum()) for b in s.sequential(8))
    assert pad_sorted < pad / 2

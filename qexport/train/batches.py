"""Tokenised splits and a deterministic, resumable batch order.

A split is tokenised once (:func:`qexport.data.encode`, padded to its longest
row); a batch gathers rows and trims the padding columns no row in it uses
(right padding, so trimming is exact). The order of an epoch is
``DistributedSampler(seed=seed).set_epoch(epoch)`` - the same permutation for
the same ``(seed, epoch)`` in every process and on resume - so a position in
training is just ``(epoch, batch index within the epoch)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DistributedSampler


@dataclass
class EncodedSplit:
    """Rows of one split as int64 tensors: ``input_ids``/``attention_mask`` [N, L], ``labels`` [N]."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    num_truncated: int = 0

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, idx: Sequence[int] | torch.Tensor) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        mask = self.attention_mask[index]
        width = max(int(mask.sum(dim=1).max()), 1)
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[index],
        }

    def sequential(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in row order (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


def encode_split(
    examples: Sequence[Any], tokenizer: Any, max_length: int, limit: int | None = None
) -> EncodedSplit:
    from qexport.data import encode
    from qexport.errors import DataError

    rows = list(examples[:limit] if limit else examples)
    enc = encode(rows, tokenizer, max_length=max_length)
    if "labels" not in enc:
        raise DataError("training needs labelled examples: some rows have no label")
    return EncodedSplit(enc["input_ids"], enc["attention_mask"], enc["labels"], int(enc["num_truncated"]))


class EpochOrder:
    """Per-epoch shuffled batches of indices for this process (DDP-aware, seeded, resumable)."""

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self._sampler: DistributedSampler[int] = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=world_size,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self._sampler) / self.batch_size)

    def epoch(self, epoch: int) -> list[list[int]]:
        self._sampler.set_epoch(epoch)
        idx = list(self._sampler)
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

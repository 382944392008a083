"""Tokenised splits and a deterministic, resumable batch order.

A split is tokenised once (:func:`qexport.data.encode`, padded to its longest
row); a batch gathers rows and trims the padding columns no row in it uses
(right padding, so trimming is exact). With a ``cache_dir``, :func:`encode_split` keeps the
tensors on disk under a key of tokenizer, task, split, ``max_length``, ``limit`` and the rows'
content, so a later run of the same recipe skips tokenisation, and any change of those (another
tokenizer, another max length, edited data) is a new key: a stale cache is never read. The order of
an epoch is
``DistributedSampler(seed=seed).set_epoch(epoch)`` - the same permutation for
the same ``(seed, epoch)`` in every process and on resume - so a position in
training is just ``(epoch, batch index within the epoch)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
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

    def by_length(self) -> EncodedSplit:
        """The same rows ordered by token count (stable): evaluation batches of rows of about one
        length carry little padding (rt's dev split: ~2.4x faster than in split order). Metrics
        over (prediction, label) pairs do not depend on the order; padding columns do not change
        a row's result (masked keys get a zero attention weight)."""
        order = torch.argsort(self.attention_mask.sum(dim=1), stable=True)
        return EncodedSplit(self.input_ids[order], self.attention_mask[order], self.labels[order],
                            self.num_truncated)

    def sequential(self, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches in row order (evaluation)."""
        for start in range(0, len(self), batch_size):
            yield self.batch(range(start, min(start + batch_size, len(self))))


#: Bump when the cached file's layout changes (old caches then miss instead of misloading).
CACHE_FORMAT = 1


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's output: its class and full serialisation (fast
    tokenizers) or its vocabulary and init arguments (slow ones)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # truncation/padding are call-time state the last ``__call__`` left behind, not identity
        d = json.loads(backend.to_str())
        d.pop("truncation", None)
        d.pop("padding", None)
        body = json.dumps(d, sort_keys=True)
    else:
        body = json.dumps(
            {"vocab": tokenizer.get_vocab(), "init": getattr(tokenizer, "init_kwargs", {})},
            sort_keys=True, default=str,
        )
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(body.encode())
    return h.hexdigest()


def split_cache_key(rows: Sequence[Any], tokenizer: Any, max_length: int, name: str) -> str:
    """The cache key of one tokenised split (see the module docstring)."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "name": name, "max_length": max_length}).encode())
    h.update(tokenizer_digest(tokenizer).encode())
    for ex in rows:
        h.update(json.dumps([ex.text, ex.text_pair, ex.label]).encode())
    return h.hexdigest()


def encode_split(
    examples: Sequence[Any],
    tokenizer: Any,
    max_length: int,
    limit: int | None = None,
    *,
    cache_dir: Path | None = None,
    name: str = "split",
) -> EncodedSplit:
    """Tokenise ``examples[:limit]`` (labels required); with ``cache_dir``, through the on-disk
    cache ``cache_dir/<name>-<max_length>-<key>.pt`` (``name``: e.g. ``rt-train``)."""
    from qexport.data import encode
    from qexport.errors import DataError

    rows = list(examples[:limit] if limit else examples)
    path = None
    if cache_dir is not None:
        key = split_cache_key(rows, tokenizer, max_length, name)
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:60]
        path = Path(cache_dir) / f"{safe}-{max_length}-{key[:20]}.pt"
        if path.is_file():
            try:
                d = torch.load(path, map_location="cpu", weights_only=True)
                if d.get("key") == key:
                    return EncodedSplit(d["input_ids"], d["attention_mask"], d["labels"],
                                        int(d["num_truncated"]))
            except Exception:  # any unreadable cache file: tokenise again and rewrite it
                pass
    enc = encode(rows, tokenizer, max_length=max_length)
    if "labels" not in enc:
        raise DataError("training needs labelled examples: some rows have no label")
    out = EncodedSplit(enc["input_ids"], enc["attention_mask"], enc["labels"], int(enc["num_truncated"]))
    if path is not None:
        from qexport.io import atomic_path

        with atomic_path(path) as tmp:
            torch.save({"key": key, "input_ids": out.input_ids, "attention_mask": out.attention_mask,
                        "labels": out.labels, "num_truncated": out.num_truncated}, tmp)
    return out


class EpochOrder:
    """Per-epoch shuffled batches of indices for this process (DDP-aware, seeded, resumable)."""

    #: Rows per length group (``group_by_length``): 50 batches, as ``transformers``'
    #: ``LengthGroupedSampler`` does.
    GROUP_BATCHES = 50

    def __init__(self, n: int, batch_size: int, seed: int, world_size: int = 1, rank: int = 0,
                 lengths: torch.Tensor | None = None) -> None:
        self.n = n
        self.batch_size = batch_size
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.lengths = lengths
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
        """This process's batches of epoch ``epoch``: consecutive slices of the shuffled rows, or,
        with ``lengths`` (``train.group_by_length``), slices of groups of
        :data:`GROUP_BATCHES` batches of shuffled rows sorted by length, the batches then in a
        seeded random order: rows of similar length share a batch (little padding) while every
        batch still draws from the whole split. Both depend on ``(seed, epoch)`` only."""
        self._sampler.set_epoch(epoch)
        idx = list(self._sampler)
        if self.lengths is not None:
            group = self.GROUP_BATCHES * self.batch_size
            lengths = self.lengths
            idx = [i for g in range(0, len(idx), group)
                   for i in sorted(idx[g : g + group], key=lambda r: -int(lengths[r]))]
        batches = [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        if self.lengths is not None:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

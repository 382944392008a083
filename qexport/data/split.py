"""Deterministic, documented train/dev/test splits for corpora that ship without one.

Rule (used by ``rt`` and ``bbc``, and for ag_news's dev split):

1. Each text is normalised (whitespace runs -> one space, stripped); its dedup key is the
   case-folded normal form. Only the first row of each key is kept; a key seen with two
   different labels is dropped altogether. So no text occurs in two splits.
2. The bucket of a row is ``int(sha256(salt + "\\0" + key)[:8 bytes]) % 1000``: buckets
   ``< 800`` go to train, ``< 900`` to dev, the rest to test (about 80/10/10).
   The split of a text never depends on the other rows, so adding or removing rows moves nothing.
3. Inside a split, rows are ordered by that hash: a fixed pseudo-random order, so any prefix
   (``rows[:n]``) is a fair, class-mixed sample.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from qexport.data.base import Example


def normalize(text: str) -> str:
    """Collapse whitespace runs into one space and strip."""
    return " ".join(text.split())


def dedup_key(text: str) -> str:
    return normalize(text).casefold()


def digest(salt: str, key: str) -> int:
    """A stable 64-bit hash of ``key`` under ``salt`` (same on every machine and Python)."""
    return int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big")


def dedupe(examples: Iterable[Example]) -> list[Example]:
    """First example per dedup key; keys seen with conflicting labels are dropped."""
    first: dict[str, Example] = {}
    conflicting: set[str] = set()
    for ex in examples:
        key = dedup_key(ex.text if ex.text_pair is None else f"{ex.text}\0{ex.text_pair}")
        prev = first.get(key)
        if prev is None:
            first[key] = ex
        elif prev.label != ex.label:
            conflicting.add(key)
    return [ex for key, ex in first.items() if key not in conflicting]


def hash_split(
    examples: Iterable[Example], salt: str, bounds: Sequence[int] = (800, 900)
) -> dict[str, list[Example]]:
    """Dedupe, then split by hash bucket (per mille): train < bounds[0] <= dev < bounds[1] <= test."""
    out: dict[str, list[tuple[int, Example]]] = {"train": [], "dev": [], "test": []}
    for ex in dedupe(examples):
        key = dedup_key(ex.text if ex.text_pair is None else f"{ex.text}\0{ex.text_pair}")
        h = digest(salt, key)
        b = h % 1000
        name = "train" if b < bounds[0] else "dev" if b < bounds[1] else "test"
        out[name].append((h, ex))
    return {name: [ex for _, ex in sorted(rows, key=lambda r: r[0])] for name, rows in out.items()}

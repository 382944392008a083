"""The on-disk cache of tokenised splits: a hit returns the same tensors without tokenising,
and any change of tokenizer, max length or rows is a new key (a stale cache is never read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from qexport.data import get_task
from qexport.train import batches as B


@pytest.fixture(scope="module")
def rows() -> list[Any]:
    return list(get_task("rt").load("dev")[:40])


def _same(a: B.EncodedSplit, b: B.EncodedSplit) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            and torch.equal(a.labels, b.labels) and a.num_truncated == b.num_truncated)


def test_hit_skips_tokenisation(rows: list[Any], minilm_tokenizer: Any, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    first = B.encode_split(rows, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev")
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith("rt-dev-16-")
    assert _same(first, B.encode_split(rows, minilm_tokenizer, 16))  # the cache changes nothing

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("tokenised again")

    monkeypatch.setattr("qexport.data.encode", boom)
    assert _same(first, B.encode_split(rows, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev"))


def test_changed_key_is_a_miss(rows: list[Any], minilm_tokenizer: Any, tmp_path: Path) -> None:
    import copy
    import dataclasses

    base = B.encode_split(rows, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev")
    longer = B.encode_split(rows, minilm_tokenizer, 32, cache_dir=tmp_path, name="rt-dev")
    assert longer.input_ids.shape[1] > base.input_ids.shape[1]
    fewer = B.encode_split(rows, minilm_tokenizer, 16, limit=10, cache_dir=tmp_path, name="rt-dev")
    assert len(fewer) == 10
    edited = [dataclasses.replace(rows[0], text="extra words here " + rows[0].text), *rows[1:]]
    e = B.encode_split(edited, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev")
    assert not torch.equal(e.input_ids[0], base.input_ids[0])
    tok2 = copy.deepcopy(minilm_tokenizer)
    tok2.add_tokens(["qexportzzz"])
    assert B.tokenizer_digest(tok2) != B.tokenizer_digest(minilm_tokenizer)
    new_rows = [dataclasses.replace(rows[0], text="qexportzzz"), *rows[1:]]
    t = B.encode_split(new_rows, tok2, 16, cache_dir=tmp_path, name="rt-dev")
    assert int(t.input_ids[0, 1]) == len(minilm_tokenizer)  # the added token, not a stale row
    assert len(list(tmp_path.iterdir())) == 5


def test_corrupt_cache_file_is_rebuilt(rows: list[Any], minilm_tokenizer: Any, tmp_path: Path) -> None:
    base = B.encode_split(rows, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev")
    (f,) = tmp_path.iterdir()
    f.write_bytes(b"not a torch file")
    assert _same(base, B.encode_split(rows, minilm_tokenizer, 16, cache_dir=tmp_path, name="rt-dev"))
    assert torch.load(f, weights_only=True)["input_ids"].shape == base.input_ids.shape

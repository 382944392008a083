"""encode(): pair encoding, truncation counts, padding, labels, with the offline MiniLM tokenizer."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from qexport.data import Example, encode
from qexport.errors import DataError


def test_single_truncation_and_padding(minilm_tokenizer: Any) -> None:
    tok = minilm_tokenizer
    hello = tok.convert_tokens_to_ids("hello")
    exs = [Example("hello " * 3, label=0), Example("hello " * 6, label=1), Example("hello " * 7, label=1)]
    out = encode(exs, tok, max_length=8)
    assert out["num_truncated"] == 1 and isinstance(out["num_truncated"], int)
    assert out["input_ids"].dtype == torch.int64 and out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].shape == (3, 8)  # padded to the longest row, capped at max_length
    assert out["attention_mask"].sum(1).tolist() == [5, 8, 8]
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert out["input_ids"][0].tolist() == [cls, hello, hello, hello, sep] + [tok.pad_token_id] * 3
    assert out["input_ids"][2].tolist() == [cls] + [hello] * 6 + [sep]
    assert out["labels"].tolist() == [0, 1, 1] and out["labels"].dtype == torch.int64
    assert set(out) == {"input_ids", "attention_mask", "labels", "num_truncated"}

    padded = encode(exs, tok, max_length=8, pad_to=12)
    assert padded["input_ids"].shape == (3, 12)
    assert torch.equal(padded["input_ids"][:, :8], out["input_ids"])
    assert padded["attention_mask"][:, 8:].sum() == 0


def test_pair_encoding_matches_tokenizer_and_truncates_longest_first(minilm_tokenizer: Any) -> None:
    tok = minilm_tokenizer
    world = tok.convert_tokens_to_ids("world")
    exs = [Example("hello there", "general kenobi"), Example("hello " * 10, "world world")]
    out = encode(exs, tok, max_length=10)
    ref = tok("hello there", "general kenobi")["input_ids"]
    assert out["input_ids"][0, : len(ref)].tolist() == ref
    assert ref.count(tok.sep_token_id) == 2  # [CLS] a [SEP] b [SEP]
    row = out["input_ids"][1].tolist()
    assert len(row) == 10 and row.count(world) == 2  # the longer (first) text was cut, not the pair
    assert out["num_truncated"] == 1
    assert "labels" not in out  # unlabelled examples


def test_encode_rejects_bad_calls(minilm_tokenizer: Any) -> None:
    with pytest.raises(DataError, match="no examples"):
        encode([], minilm_tokenizer)
    with pytest.raises(DataError, match="1 of 2 examples have a text_pair"):
        encode([Example("a", "b"), Example("c")], minilm_tokenizer)
    with pytest.raises(DataError, match="pad_to"):
        encode([Example("a")], minilm_tokenizer, max_length=16, pad_to=8)
    mixed = encode([Example("a", label=1), Example("b")], minilm_tokenizer)
    assert "labels" not in mixed

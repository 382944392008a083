"""``qexport.evaluation``: the one loop (score / score_many and the tokenizing evaluate / evaluate_many)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from qexport.data import get_task
from qexport.evaluation import evaluate, evaluate_many, score, score_many
from tests.tiny import make_tiny_task


def _first_token_parity(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    """Class 1 when the first real token id after [CLS] is odd: a deterministic predictor."""
    odd = feeds["input_ids"][:, 1] % 2
    return np.stack([1 - odd, odd], axis=1).astype(np.float32)


def _batches(rows: list[tuple[int, int | None]]) -> list[tuple[dict[str, np.ndarray], list[int] | None, int]]:
    out = []
    for i in range(0, len(rows), 2):
        chunk = rows[i : i + 2]
        ids = np.array([[101, tok, 102] for tok, _ in chunk], dtype=np.int64)
        labels = [lab for _, lab in chunk if lab is not None]
        out.append(({"input_ids": ids, "attention_mask": np.ones_like(ids)},
                    labels if len(labels) == len(chunk) else None, i))
    return out


def test_score_predictions_metric_and_counts(tmp_path: Path) -> None:
    task = make_tiny_task(tmp_path / "t.csv", n_train=4, n_dev=4, n_test=4)
    rows = [(3, 1), (4, 1), (5, 0), (7, 1), (8, 0)]  # predictions 1, 0, 1, 1, 0
    ev = score(_first_token_parity, _batches(rows), f"csv:{task}", "dev")
    assert ev.preds == [1, 0, 1, 1, 0]
    assert ev.labels == [1, 1, 0, 1, 0]
    assert ev.truncated == 0 + 2 + 4
    assert ev.metric is not None and ev.metric["metric"] == pytest.approx(60.0)
    assert ev.as_dict(keep_preds=2)["predictions"] == [1, 0]
    # a task object works as well as a spec
    assert score(_first_token_parity, _batches(rows), get_task(f"csv:{task}")).metric == ev.metric


def test_score_without_every_label_has_no_metric(tmp_path: Path) -> None:
    task = make_tiny_task(tmp_path / "t.csv", n_train=4, n_dev=4, n_test=4)
    ev = score(_first_token_parity, _batches([(3, 1), (4, None), (5, 0)]), f"csv:{task}")
    assert ev.preds == [1, 0, 1] and ev.metric is None


def test_score_many_sees_every_output_of_every_batch(tmp_path: Path) -> None:
    task = make_tiny_task(tmp_path / "t.csv", n_train=4, n_dev=4, n_test=4)
    seen: list[tuple[str, ...]] = []
    evs = score_many(
        {"a": _first_token_parity, "b": lambda f: -_first_token_parity(f)},
        _batches([(3, 1), (4, 1), (5, 0)]), f"csv:{task}",
        on_outputs=lambda outs: seen.append(tuple(sorted(outs))),
    )
    assert seen == [("a", "b"), ("a", "b")]
    assert evs["a"].preds == [1, 0, 1] and evs["b"].preds == [0, 1, 0]


def test_evaluate_many_matches_evaluate(tmp_path: Path, minilm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    task = f"csv:{make_tiny_task(tmp_path / 't.csv', n_train=4, n_dev=4, n_test=11)}"
    one = evaluate(_first_token_parity, task, minilm_tokenizer, "test", batch_size=4, max_length=16)
    many = evaluate_many({"x": _first_token_parity}, task, minilm_tokenizer, "test",
                         batch_size=4, max_length=16)
    assert one.examples == 11
    assert many["x"].preds == one.preds and many["x"].metric == one.metric
    assert one.labels == [e.label for e in get_task(task).load("test")]

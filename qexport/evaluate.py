"""Run a model over a task split: the one loop behind ``train``'s, ``demo``'s, ``verify``'s and
``qexport ort``'s evaluations.

A *predictor* maps numpy feeds (``input_ids``, ``attention_mask``: int64 ``[batch, seq]``) to a
``[batch, classes]`` array; :func:`runner_predictor` makes one from any backend
:class:`~qexport.backends.base.Runner`, :func:`reference_predictor` from the integer reference
(:class:`~qexport.models.integer.IntegerModel`). :func:`iter_batches` tokenizes a split with the
model's own tokenizer; :func:`evaluate` scores one predictor on it.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import CheckpointError, DataError

Feeds = dict[str, np.ndarray]
Predictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def load_tokenizer(checkpoint: Path) -> Any:
    """The tokenizer saved with a checkpoint (``CHECKPOINT/tokenizer``)."""
    from transformers import AutoTokenizer

    tok_dir = Path(checkpoint) / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no tokenizer/ directory")
    return AutoTokenizer.from_pretrained(str(tok_dir))


def runner_predictor(runner: Any, output: str = "logits") -> Predictor:
    """``runner.run(feeds)[output]`` as an array (``logits_int`` for parity checks)."""

    def predict(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(runner.run(feeds)[output])

    return predict


def reference_predictor(model: Any) -> Predictor:
    """The integer reference's ``logits_int`` (int64) for numpy feeds."""
    import torch

    def predict(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        ids = torch.from_numpy(np.ascontiguousarray(feeds["input_ids"], dtype=np.int64))
        mask = torch.from_numpy(np.ascontiguousarray(feeds["attention_mask"], dtype=np.int64))
        with torch.no_grad():
            return np.asarray(model(ids, mask).numpy())

    return predict


def iter_batches(
    task_spec: str,
    tokenizer: Any,
    split: str = "test",
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
) -> Iterator[tuple[Feeds, list[int] | None, int]]:
    """``(feeds, labels, truncated)`` per batch of a task split, in the split's order.

    ``labels`` is ``None`` when any example of the batch has none; ``truncated`` counts the rows
    longer than ``max_length`` tokens.
    """
    from qexport.data import encode, get_task

    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    examples = get_task(task_spec).load(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"no examples in {task_spec}:{split}")
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = encode(chunk, tokenizer, max_length=max_length)
        feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        labels = [int(e.label) for e in chunk if e.label is not None]
        yield feeds, (labels if len(labels) == len(chunk) else None), int(enc.get("num_truncated", 0))


@dataclass
class Evaluation:
    """Predictions of one model on one split, and the task's metric when every row has a label."""

    task: str
    split: str
    preds: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    truncated: int = 0
    seconds: float = 0.0
    metric: dict[str, float] | None = None

    @property
    def examples(self) -> int:
        return len(self.preds)

    def as_dict(self, keep_preds: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {
            "data": f"{self.task}:{self.split}",
            "examples": self.examples,
            "truncated": self.truncated,
            "seconds": round(self.seconds, 3),
        }
        if self.metric is not None:
            out.update(self.metric)
        if keep_preds:
            out["predictions"] = self.preds[:keep_preds]
        return out


def evaluate(
    predict: Predictor,
    task_spec: str,
    tokenizer: Any,
    split: str = "test",
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """Argmax predictions of ``predict`` on ``task_spec:split`` and the task's metric.

    ``on_batch(n)`` is called after each batch with its row count (progress bars).
    """
    from qexport.data import get_task

    ev = Evaluation(task=task_spec, split=split)
    all_labelled = True
    t0 = time.perf_counter()
    for feeds, labels, truncated in iter_batches(
        task_spec, tokenizer, split, limit=limit, batch_size=batch_size, max_length=max_length
    ):
        logits = predict(feeds)
        ev.preds += np.asarray(logits).argmax(-1).tolist()
        ev.truncated += truncated
        if labels is None:
            all_labelled = False
        else:
            ev.labels += labels
        if on_batch is not None:
            on_batch(len(feeds["input_ids"]))
    ev.seconds = time.perf_counter() - t0
    if all_labelled and len(ev.labels) == len(ev.preds):
        ev.metric = dict(get_task(task_spec).compute_metric(ev.preds, ev.labels))
    return ev


class _CallableModule(types.ModuleType):
    """This module, callable: ``qexport.evaluate(...)`` is :func:`evaluate` (the package exports
    the function under the module's own name, and a submodule always wins that name)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Evaluation:
        return evaluate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

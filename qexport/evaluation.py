"""Run a model over a task split: the one loop behind ``train``'s, ``demo``'s, ``verify``'s and
``qexport ort``'s evaluations.

A *predictor* maps numpy feeds (``input_ids``, ``attention_mask``: int64 ``[batch, seq]``) to a
``[batch, classes]`` array; :func:`runner_predictor` makes one from any backend
:class:`~qexport.backends.base.Runner`, :func:`reference_predictor` from the integer reference
(:class:`~qexport.models.integer.IntegerModel`). :func:`iter_batches` tokenizes a split with the
model's own tokenizer; :func:`evaluate` scores one predictor on it, :func:`evaluate_many` several
on the same batches (``verify``: the reference and a backend, compared batch by batch), and
:func:`score` / :func:`score_many` do the same on batches tokenized beforehand (training's
encoded splits).

The module imports only the base layers (``qexport.data``, ``qexport.errors``): any stage may run
its loop on a predictor of its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import CheckpointError, DataError

Feeds = dict[str, np.ndarray]
Predictor = Callable[[Mapping[str, np.ndarray]], np.ndarray]
Batch = tuple[Mapping[str, np.ndarray], "list[int] | None", int]


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
    return evaluate_many(
        {"model": predict}, task_spec, tokenizer, split,
        limit=limit, batch_size=batch_size, max_length=max_length, on_batch=on_batch,
    )["model"]


def evaluate_many(
    predictors: Mapping[str, Predictor],
    task_spec: str,
    tokenizer: Any,
    split: str = "test",
    *,
    limit: int | None = None,
    batch_size: int = 32,
    max_length: int = 128,
    on_batch: Callable[[int], None] | None = None,
    on_outputs: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> dict[str, Evaluation]:
    """:func:`evaluate` for several predictors on the same batches (the split is tokenized once).

    ``on_outputs({name: array})`` sees every predictor's raw output of each batch (a parity check).
    """
    batches = iter_batches(
        task_spec, tokenizer, split, limit=limit, batch_size=batch_size, max_length=max_length
    )
    return score_many(predictors, batches, task_spec, split, on_batch=on_batch, on_outputs=on_outputs)


def score(
    predict: Predictor,
    batches: Iterable[Batch],
    task: Any,
    split: str = "test",
    *,
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """:func:`evaluate` on batches tokenized beforehand: ``(feeds, labels or None, truncated)``.

    ``task`` is a task spec or a :class:`~qexport.data.base.Task` (its metric scores the split).
    """
    return score_many({"model": predict}, batches, task, split, on_batch=on_batch)["model"]


def score_many(
    predictors: Mapping[str, Predictor],
    batches: Iterable[Batch],
    task: Any,
    split: str = "test",
    *,
    on_batch: Callable[[int], None] | None = None,
    on_outputs: Callable[[Mapping[str, np.ndarray]], None] | None = None,
) -> dict[str, Evaluation]:
    """The loop: every predictor on every batch, argmax predictions, then the task's metric."""
    from qexport.data import get_task

    task_obj = get_task(task) if isinstance(task, str) else task
    name = task if isinstance(task, str) else str(task_obj.name)
    evs = {key: Evaluation(task=name, split=split) for key in predictors}
    labels: list[int] = []
    truncated = 0
    all_labelled = True
    t0 = time.perf_counter()
    for feeds, batch_labels, batch_truncated in batches:
        outputs = {key: np.asarray(predict(feeds)) for key, predict in predictors.items()}
        for key, out in outputs.items():
            evs[key].preds += out.argmax(-1).tolist()
        if on_outputs is not None:
            on_outputs(outputs)
        truncated += batch_truncated
        if batch_labels is None:
            all_labelled = False
        else:
            labels += batch_labels
        if on_batch is not None:
            on_batch(len(feeds["input_ids"]))
    seconds = time.perf_counter() - t0
    for ev in evs.values():
        ev.labels = list(labels)
        ev.truncated = truncated
        ev.seconds = seconds
        if all_labelled and len(ev.labels) == len(ev.preds):
            ev.metric = dict(task_obj.compute_metric(ev.preds, ev.labels))
    return evs

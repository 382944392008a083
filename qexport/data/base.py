"""Core types: :class:`Example` (one row) and :class:`Task` (a named data set + its metric)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from qexport.data.metrics import accuracy, matthews_corrcoef
from qexport.errors import DataError

#: The split names every labelled task answers (tasks may add more, e.g. mnli's "dev_mismatched").
SPLITS: tuple[str, ...] = ("train", "dev", "test")

#: Metric names a task may have; ``none`` is for unlabelled data (txt:PATH).
METRICS: tuple[str, ...] = ("accuracy", "matthews", "mnli_accuracy", "none")


@dataclass(frozen=True)
class Example:
    """One input row: a text, an optional second text (pair tasks) and an optional int label."""

    text: str
    text_pair: str | None = None
    label: int | None = None


class Task:
    """A named data set: its label space, its splits and its metric.

    ``load(split)`` returns a fresh list of examples (never empty: DataError instead);
    ``compute_metric(preds, labels)`` returns a dict that always holds ``"metric"``, the task's
    primary number in percent, plus named entries (``"accuracy"``, ``"matthews"``, ...).
    ``eval_splits`` names the splits a full evaluation reports (mnli: matched and mismatched dev).
    """

    def __init__(
        self,
        name: str,
        label_names: Sequence[str],
        is_pair: bool,
        metric_name: str,
        loader: Callable[[str], list[Example]],
        *,
        splits: Sequence[str] = SPLITS,
        eval_splits: Sequence[str] = ("dev",),
        description: str = "",
    ) -> None:
        if metric_name not in METRICS:
            raise DataError(f"task {name}: unknown metric {metric_name!r} (choose from {', '.join(METRICS)})")
        self.name = name
        self.label_names = list(label_names)
        self.num_labels = len(self.label_names)
        self.is_pair = is_pair
        self.metric_name = metric_name
        self.splits = tuple(splits)
        self.eval_splits = tuple(eval_splits)
        self.description = description
        self._loader = loader

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, num_labels={self.num_labels}, is_pair={self.is_pair}, "
            f"metric_name={self.metric_name!r})"
        )

    def load(self, split: str) -> list[Example]:
        """Examples of ``split`` (one of ``self.splits``); DataError when unknown or empty."""
        if split not in self.splits:
            raise DataError(
                f"task {self.name}: unknown split {split!r} (choose from {', '.join(self.splits)})"
            )
        rows = list(self._loader(split))
        if not rows:
            raise DataError(f"task {self.name}: split {split!r} has no examples")
        return rows

    def compute_metric(self, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
        """Score predictions; ``"metric"`` is the primary number in percent."""
        if self.metric_name == "none":
            raise DataError(f"task {self.name} has no labels, so no metric")
        acc = accuracy(preds, labels)
        if self.metric_name == "matthews":
            mcc = 100.0 * matthews_corrcoef(preds, labels)
            return {"metric": mcc, "matthews": mcc, "accuracy": acc}
        return {"metric": acc, "accuracy": acc}

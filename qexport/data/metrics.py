"""Classification metrics, computed in plain Python (no sklearn).

Contract: ``preds`` and ``labels`` are equal-length, non-empty sequences of ints (anything
``int()`` accepts: Python ints, numpy scalars, 0-d tensors). Percentages are in [0, 100];
the Matthews correlation coefficient is returned in [-1, 1] by :func:`matthews_corrcoef`
and scaled to percent by the task layer, as GLUE reports it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from qexport.errors import DataError


def _as_ints(preds: Sequence[int], labels: Sequence[int]) -> tuple[list[int], list[int]]:
    p = [int(x) for x in preds]
    y = [int(x) for x in labels]
    if len(p) != len(y):
        raise DataError(f"metric: {len(p)} predictions but {len(y)} labels")
    if not y:
        raise DataError("metric: no predictions to score")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Share of exact matches, in percent."""
    p, y = _as_ints(preds, labels)
    return 100.0 * sum(a == b for a, b in zip(p, y, strict=True)) / len(y)


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient in [-1, 1] (multi-class R_K form of Gorodkin 2004).

    For two classes this is the usual (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    A zero denominator (all predictions or all labels in one class) gives 0.0, as sklearn does.
    """
    p, y = _as_ints(preds, labels)
    n = len(y)
    correct = sum(a == b for a, b in zip(p, y, strict=True))
    pred_counts = Counter(p)
    true_counts = Counter(y)
    classes = set(pred_counts) | set(true_counts)
    cov_ytyp = correct * n - sum(pred_counts[k] * true_counts[k] for k in classes)
    cov_ypyp = n * n - sum(c * c for c in pred_counts.values())
    cov_ytyt = n * n - sum(c * c for c in true_counts.values())
    if cov_ypyp == 0 or cov_ytyt == 0:
        return 0.0
    return cov_ytyp / math.sqrt(cov_ypyp * cov_ytyt)

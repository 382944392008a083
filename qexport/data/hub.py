"""Hub tasks (GLUE cola/sst2/rte/mnli and ag_news), loaded with ``datasets.load_dataset``.

Online by default (or from the local Hugging Face cache). ``data_files`` maps split names to
local files in the same column format (``.json``/``.jsonl``, ``.parquet``, ``.csv``, ``.tsv``),
read through the same ``datasets.load_dataset`` call and the same row conversion
(:func:`columns_to_examples`), which is how the tests exercise this code offline.

Split names: ``train``, ``dev`` (GLUE validation; mnli: validation_matched), ``test`` (GLUE's
test split has hidden labels: its examples carry ``label=None``). mnli adds ``dev_mismatched``
and ``test_mismatched``. ag_news ships train/test only: its ``dev`` is 5% of the official
train split chosen by hash (salt ``qexport-ag_news-v1``, see :mod:`qexport.data.split`) and
``train`` is the other 95%; a ``data_files["dev"]`` entry replaces that carving.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexport.data.base import Example, Task
from qexport.data.split import dedup_key, digest
from qexport.errors import DataError

AG_NEWS_SALT = "qexport-ag_news-v1"
AG_NEWS_DEV_PER_MILLE = 50


@dataclass(frozen=True)
class HubSpec:
    """Where a hub task lives and how its columns map onto :class:`Example`."""

    name: str
    path: str
    config: str | None
    text_col: str
    pair_col: str | None
    label_names: tuple[str, ...]
    metric: str
    split_map: Mapping[str, str] = field(default_factory=dict)  # our split -> hub split
    carve_dev: bool = False
    eval_splits: tuple[str, ...] = ("dev",)
    description: str = ""


_GLUE_SPLITS = {"train": "train", "dev": "validation", "test": "test"}

HUB_TASKS: dict[str, HubSpec] = {
    "cola": HubSpec(
        "cola",
        "nyu-mll/glue",
        "cola",
        "sentence",
        None,
        ("unacceptable", "acceptable"),
        "matthews",
        _GLUE_SPLITS,
        description="GLUE CoLA: grammatical acceptability (Matthews corr.)",
    ),
    "sst2": HubSpec(
        "sst2",
        "nyu-mll/glue",
        "sst2",
        "sentence",
        None,
        ("negative", "positive"),
        "accuracy",
        _GLUE_SPLITS,
        description="GLUE SST-2: movie review sentiment (accuracy)",
    ),
    "rte": HubSpec(
        "rte",
        "nyu-mll/glue",
        "rte",
        "sentence1",
        "sentence2",
        ("entailment", "not_entailment"),
        "accuracy",
        _GLUE_SPLITS,
        description="GLUE RTE: textual entailment, sentence pairs (accuracy)",
    ),
    "mnli": HubSpec(
        "mnli",
        "nyu-mll/glue",
        "mnli",
        "premise",
        "hypothesis",
        ("entailment", "neutral", "contradiction"),
        "mnli_accuracy",
        {
            "train": "train",
            "dev": "validation_matched",
            "dev_mismatched": "validation_mismatched",
            "test": "test_matched",
            "test_mismatched": "test_mismatched",
        },
        eval_splits=("dev", "dev_mismatched"),
        description="GLUE MNLI: 3-way entailment; dev = matched, dev_mismatched = mismatched (accuracy)",
    ),
    "ag_news": HubSpec(
        "ag_news",
        "fancyzhx/ag_news",
        None,
        "text",
        None,
        ("World", "Sports", "Business", "Sci/Tech"),
        "accuracy",
        {"train": "train", "dev": "train", "test": "test"},
        carve_dev=True,
        description="AG News: 4-class topic (accuracy); dev = 5% of train by hash",
    ),
}


def columns_to_examples(
    columns: Mapping[str, Sequence[Any]],
    *,
    text_col: str,
    pair_col: str | None,
    label_col: str | None,
    label_names: Sequence[str],
    source: str,
) -> list[Example]:
    """Rows given column-wise (as ``datasets`` returns them) -> examples.

    Labels are ints in ``range(len(label_names))``, or strings from ``label_names``; ``-1`` and
    missing values mean "hidden" (GLUE test) and become ``None``. Anything else is a DataError.
    """
    needed = [text_col] + ([pair_col] if pair_col else [])
    missing = [c for c in needed if c not in columns]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(missing)} (found: {', '.join(columns)})")
    texts = list(columns[text_col])
    pairs = list(columns[pair_col]) if pair_col else [None] * len(texts)
    labels = list(columns[label_col]) if label_col and label_col in columns else [None] * len(texts)
    out: list[Example] = []
    for i, (text, pair, raw) in enumerate(zip(texts, pairs, labels, strict=True)):
        if not isinstance(text, str) or (pair_col is not None and not isinstance(pair, str)):
            raise DataError(f"{source}: row {i}: text is missing or not a string")
        out.append(Example(text=text, text_pair=pair, label=_label(raw, label_names, source, i)))
    return out


def _label(raw: Any, label_names: Sequence[str], source: str, row: int) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, str) and not raw.lstrip("-").isdigit():
        if raw in label_names:
            return list(label_names).index(raw)
        raise DataError(
            f"{source}: row {row}: unknown label {raw!r} (expected one of {', '.join(label_names)})"
        )
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise DataError(f"{source}: row {row}: label {raw!r} is not an int") from None
    if value == -1:
        return None
    if not 0 <= value < len(label_names):
        raise DataError(f"{source}: row {row}: label {value} outside 0..{len(label_names) - 1}")
    return value


def _builder_for(path: str) -> tuple[str, dict[str, Any]]:
    suffixes = Path(path).suffixes
    ext = (
        suffixes[-2]
        if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst") and len(suffixes) > 1
        else (suffixes[-1] if suffixes else "")
    )
    if ext in (".json", ".jsonl"):
        return "json", {}
    if ext == ".parquet":
        return "parquet", {}
    if ext == ".csv":
        return "csv", {}
    if ext == ".tsv":
        return "csv", {"delimiter": "\t"}
    raise DataError(
        f"{path}: unsupported data file type {ext or '(none)'!r} (use .jsonl, .json, .parquet, .csv, .tsv)"
    )


@functools.lru_cache(maxsize=16)
def _load_columns(
    path: str, config: str | None, split: str, data_file: str | None, cache_dir: str | None
) -> tuple[tuple[str, tuple[Any, ...]], ...]:
    """Columns of one split, via datasets.load_dataset (cached in-process)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError(
            f"task {config or path} needs the 'datasets' package", hint="pip install 'qexport[data]'"
        ) from exc
    source = data_file or f"{path}{'/' + config if config else ''}[{split}]"
    try:
        if data_file is not None:
            if not Path(data_file).is_file():
                raise DataError(f"{data_file}: file not found")
            builder, kwargs = _builder_for(data_file)
            ds = datasets.load_dataset(
                builder, data_files={"data": data_file}, split="data", cache_dir=cache_dir, **kwargs
            )
        else:
            ds = datasets.load_dataset(path, config, split=split, cache_dir=cache_dir)
    except DataError:
        raise
    except Exception as exc:  # network, cache, format: all become one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(
            f"cannot load {source}: {type(exc).__name__}: {first}",
            hint=(
                "check the file's format and columns"
                if data_file is not None
                else "needs network access or a Hugging Face cache; or pass data_files={split: local file}"
            ),
        ) from exc
    table = ds[:]  # column name -> list, through arrow (fast even for mnli's 393k rows)
    return tuple((c, tuple(table[c])) for c in ds.column_names)


def hub_task(
    name: str, data_files: Mapping[str, str | Path] | None = None, cache_dir: str | Path | None = None
) -> Task:
    """The :class:`Task` for a hub data set; see the module docstring for the split names."""
    spec = HUB_TASKS[name]
    files = {str(k): str(Path(v).expanduser()) for k, v in (data_files or {}).items()}
    unknown = sorted(set(files) - set(spec.split_map))
    if unknown:
        raise DataError(
            f"task {name}: data_files has unknown split(s) {', '.join(unknown)} "
            f"(choose from {', '.join(spec.split_map)})"
        )
    cache = None if cache_dir is None else str(cache_dir)

    def convert(split: str) -> list[Example]:
        carve = spec.carve_dev and split in ("train", "dev") and "dev" not in files
        src_split = "train" if carve else split  # a carved dev comes out of the train rows
        hub_split = spec.split_map[src_split]
        data_file = files.get(src_split)
        if files and data_file is None:
            raise DataError(
                f"task {name}: data_files has no entry for split {src_split!r} (has: {', '.join(files)})"
            )
        source = data_file or f"{spec.path}{'/' + spec.config if spec.config else ''}[{hub_split}]"
        cols = dict(_load_columns(spec.path, spec.config, hub_split, data_file, cache))
        rows = columns_to_examples(
            cols,
            text_col=spec.text_col,
            pair_col=spec.pair_col,
            label_col="label",
            label_names=spec.label_names,
            source=source,
        )
        if carve:
            rows = [ex for ex in rows if _is_carved_dev(ex) == (split == "dev")]
        return rows

    return Task(
        name,
        spec.label_names,
        spec.pair_col is not None,
        spec.metric,
        convert,
        splits=tuple(spec.split_map),
        eval_splits=spec.eval_splits,
        description=spec.description,
    )


def _is_carved_dev(ex: Example) -> bool:
    return digest(AG_NEWS_SALT, dedup_key(ex.text)) % 1000 < AG_NEWS_DEV_PER_MILLE

"""User files: ``csv:PATH`` (labelled rows) and ``txt:PATH`` (one unlabelled text per line).

CSV (``.tsv``/``.tab``: tab-separated; UTF-8, BOM allowed) with a header row:

* ``text`` and ``label`` are required; ``text_pair`` makes it a pair task; an optional
  ``split`` column (values train/dev/test; ``validation`` means dev) assigns rows to splits,
  otherwise every split is the whole file.
* Labels: if every label is an integer, they are class indices (names ``"0".."K-1"`` with K =
  max + 1, unless ``label_names`` is given, then each must be < len(label_names)). Otherwise
  labels are names, mapped to indices in sorted order, or in ``label_names`` order when given
  (a name outside it is an error).
* Every problem (missing file/column, empty file, empty text or label, unknown label, one
  class only) raises one DataError that names the file and, where it applies, the line.

TXT: one text per line (UTF-8); blank lines are skipped; no labels (``num_labels == 0``,
metric ``none``); every split is the whole file.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from qexport.data.base import SPLITS, Example, Task
from qexport.errors import DataError

_INT = re.compile(r"^[+-]?\d+$")
_SPLIT_ALIASES = {
    "train": "train",
    "dev": "dev",
    "validation": "dev",
    "valid": "dev",
    "val": "dev",
    "test": "test",
}


def _existing_file(spec: str, path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{spec}: file not found")
    return path


def csv_task(path: str | Path, label_names: Sequence[str] | None = None, metric: str = "accuracy") -> Task:
    """Parse the whole file now (errors surface at once), then serve splits from memory."""
    path = Path(path).expanduser()
    spec = f"csv:{path}"
    _existing_file(spec, path)
    delimiter = "\t" if path.suffix.lower() in (".tsv", ".tab") else ","
    raw_rows: list[tuple[int, str, str | None, str, str | None]] = []  # line, text, pair, label, split
    try:
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, None)
            if header is None or not any(h.strip() for h in header):
                raise DataError(f"{spec}: file is empty (expected a header row: text,label)")
            cols = [h.strip() for h in header]
            missing = [c for c in ("text", "label") if c not in cols]
            if missing:
                raise DataError(
                    f"{spec}: missing column {', '.join(repr(c) for c in missing)} (found: {', '.join(cols)})"
                )
            idx = {c: cols.index(c) for c in ("text", "text_pair", "label", "split") if c in cols}
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) < len(cols):
                    raise DataError(f"{spec}:{line}: {len(row)} fields, header has {len(cols)}")
                text = row[idx["text"]].strip()
                label = row[idx["label"]].strip()
                if not text:
                    raise DataError(f"{spec}:{line}: empty text")
                if not label:
                    raise DataError(f"{spec}:{line}: empty label")
                pair = row[idx["text_pair"]].strip() if "text_pair" in idx else None
                split = None
                if "split" in idx:
                    raw_split = row[idx["split"]]
                    split = _SPLIT_ALIASES.get(raw_split.strip().lower())
                    if split is None:
                        raise DataError(
                            f"{spec}:{line}: unknown split {raw_split!r} (expected train, dev or test)"
                        )
                raw_rows.append((line, text, pair, label, split))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{spec}: cannot parse as CSV: {exc}") from exc
    if not raw_rows:
        raise DataError(f"{spec}: file has a header but no rows")

    names, to_index = _label_space(spec, [(line, label) for line, _, _, label, _ in raw_rows], label_names)
    by_split: dict[str | None, list[Example]] = {}
    for line, text, pair, label, split in raw_rows:
        ex = Example(text=text, text_pair=pair, label=to_index(line, label))
        by_split.setdefault(split, []).append(ex)
    has_split = "split" in idx

    def load(split: str) -> list[Example]:
        if has_split:
            return list(by_split.get(split, []))
        return [ex for rows in by_split.values() for ex in rows]

    return Task(spec, names, "text_pair" in idx, metric, load, description=f"labelled rows from {path}")


def _label_space(
    spec: str, labels: list[tuple[int, str]], given: Sequence[str] | None
) -> tuple[list[str], Callable[[int, str], int]]:
    """(label names, function (line, raw label) -> index) for the labels of a file."""
    all_int = all(_INT.match(v) for _, v in labels)
    if given is not None:
        names = [str(n) for n in given]
        if len(names) < 2 or len(set(names)) != len(names):
            raise DataError(f"{spec}: label_names must be at least two distinct names, got {names}")
        if all(v in names for _, v in labels):
            all_int = False  # the labels are the names themselves (even if they look like ints)
    elif all_int:
        values = [int(v) for _, v in labels]
        if min(values) < 0:
            line = next(ln for ln, v in labels if int(v) < 0)
            raise DataError(f"{spec}:{line}: negative label {min(values)}")
        names = [str(i) for i in range(max(values) + 1)]
    else:
        names = sorted({v for _, v in labels})
    if len(names) < 2:
        raise DataError(f"{spec}: only one class ({names[0]!r}); a classifier needs at least two")

    def to_index(line: int, raw: str) -> int:
        if all_int:
            value = int(raw)
            if not 0 <= value < len(names):
                raise DataError(f"{spec}:{line}: unknown label {raw!r} (expected 0..{len(names) - 1})")
            return value
        if raw not in names:
            raise DataError(f"{spec}:{line}: unknown label {raw!r} (expected one of {', '.join(names)})")
        return names.index(raw)

    return names, to_index


def txt_task(path: str | Path) -> Task:
    """Unlabelled texts, one per line; every split is the whole file."""
    path = Path(path).expanduser()
    spec = f"txt:{path}"
    _existing_file(spec, path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{spec}: not UTF-8 text: {exc}") from exc
    rows = [Example(text=line.strip()) for line in lines if line.strip()]
    if not rows:
        raise DataError(f"{spec}: file is empty (expected one text per line)")
    return Task(
        spec,
        [],
        False,
        "none",
        lambda split: list(rows),
        splits=SPLITS,
        eval_splits=(),
        description=f"unlabelled texts from {path}",
    )

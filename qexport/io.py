"""Atomic file and directory writes: every artifact qexport writes goes through here.

A file is written to a temporary name in its destination directory, flushed, fsynced and
``os.replace``d into place; a directory is built as a temporary sibling and renamed. A crash
at any moment leaves either the previous artifact or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path next to ``path``; renamed onto ``path`` when the block exits cleanly.

    For writers that want a file name (``onnx.save``, ``torch.save``, ``fig.savefig``): write
    to the yielded path; on an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> Path:
    """``obj`` as indented JSON (non-JSON values through ``str``), atomically."""
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=str) + "\n").encode())


def atomic_dir(out_dir: Path) -> tuple[Path, Any]:
    """A temp dir next to ``out_dir`` and a ``commit()`` that renames it into place.

    ``commit()`` replaces an existing ``out_dir`` (moved aside, then removed) and returns
    ``out_dir``; on failure the caller removes the temp dir (see :func:`atomic_directory`).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))

    def commit() -> Path:
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old.{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
        return out_dir

    return tmp, commit


@contextlib.contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Build a directory in a temporary sibling; it replaces ``out_dir`` when the block exits cleanly."""
    tmp, commit = atomic_dir(out_dir)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit()

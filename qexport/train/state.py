"""Resumable training state and atomic file writes.

``<out>/state/train_state.pt`` holds everything needed to continue a run
exactly: stage, step, data position (epoch, batch in epoch, sampler seed),
model/optimizer/scheduler state dicts, the RNG states of python, numpy and
torch (per rank under DDP), the best dev metric so far, the evaluation history
and the step timings. It is written atomically (:mod:`qexport.io`), so a crash
at any moment leaves the previous state intact.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import CheckpointError
from qexport.io import atomic_path

STATE_FILE = "train_state.pt"
STATE_FORMAT = "qexport-train-state"
STATE_VERSION = 1


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`qexport.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """The python, numpy and torch (CPU and every CUDA device) RNG states."""
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def state_path(out_dir: Path) -> Path:
    return Path(out_dir) / "state" / STATE_FILE


def save_state(out_dir: Path, state: dict[str, Any]) -> Path:
    path = state_path(out_dir)
    atomic_torch_save({"format": STATE_FORMAT, "version": STATE_VERSION, **state}, path)
    return path


def load_state(out_dir: Path) -> dict[str, Any] | None:
    """The saved state, or None when there is none; CheckpointError when it is unreadable."""
    path = state_path(out_dir)
    if not path.is_file():
        return None
    try:
        st = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a damaged file
        raise CheckpointError(f"training state {path} is unreadable: {exc}") from None
    if not isinstance(st, dict) or st.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a qexport training state")
    if st.get("version") != STATE_VERSION:
        raise CheckpointError(f"{path}: training state version {st.get('version')} is not {STATE_VERSION}")
    return st

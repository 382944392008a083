"""``qexport verify``: bit-exact parity of a backend against the integer reference.

The PyTorch :class:`~qexport.models.integer.IntegerModel` (built from the
checkpoint alone) and the backend run on the same tokenized batches; every
``logits_int`` element must be equal. Also reports argmax agreement and each
side's accuracy when the data has labels; writes ``parity.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexport.errors import DataError


def load_tokenizer(checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    from qexport.errors import CheckpointError

    tok_dir = Path(checkpoint) / "tokenizer"
    if not tok_dir.is_dir():
        raise CheckpointError(f"checkpoint {checkpoint} has no tokenizer/ directory")
    return AutoTokenizer.from_pretrained(str(tok_dir))


def batches(
    data: str, tokenizer: Any, split: str, limit: int | None, batch_size: int, max_length: int
) -> Iterator[tuple[dict[str, np.ndarray], list[int] | None, int]]:
    """``(feeds, labels, truncated)`` batches of a task split (texts beyond max_length are truncated)."""
    from qexport.data import encode, get_task

    examples = get_task(data).load(split)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"no examples in {data}:{split}")
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = encode(chunk, tokenizer, max_length=max_length)
        feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        labels = [e.label for e in chunk if e.label is not None]
        labels_or_none = labels if len(labels) == len(chunk) else None
        yield feeds, labels_or_none, int(enc.get("num_truncated", 0))


def _load_runner(backend: str, model_file: Path | None, checkpoint: Path, device: str) -> Any:
    from qexport.backends import get_backend
    from qexport.errors import BackendError

    if model_file is None:
        defaults = {"ort": checkpoint / "model.functions.onnx", "tvm": checkpoint / "tvm"}
        default = defaults.get(backend)
        if default is None or not Path(default).exists():
            raise BackendError(f"--model is required for backend {backend} (no default artifact found)")
        model_file = Path(default)
    return get_backend(backend).load(Path(model_file), device)


def run_backend_on_data(
    backend: str, model_file: Path, data: str, split: str = "test", limit: int | None = None,
    device: str = "cpu", batch_size: int = 32, max_length: int = 128, tokenizer_dir: Path | None = None,
) -> dict[str, Any]:
    """Run an ONNX/compiled model on a task split: predictions and accuracy."""
    from transformers import AutoTokenizer

    from qexport.backends import get_backend
    from qexport.data import get_task
    from qexport.data.offline import minilm_path

    runner = get_backend(backend).load(Path(model_file), device)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir or minilm_path()))
    preds: list[int] = []
    labels: list[int] = []
    truncated = 0
    for feeds, lab, tr in batches(data, tok, split, limit, batch_size, max_length):
        preds += np.asarray(runner.run(feeds)["logits"]).argmax(-1).tolist()
        labels += lab or []
        truncated += tr
    res: dict[str, Any] = {"examples": len(preds), "truncated": truncated, "predictions": preds[:50]}
    if len(labels) == len(preds):
        res.update(get_task(data).compute_metric(preds, labels))
    return res


def verify(
    checkpoint: Path,
    backend: str,
    model_file: Path | None,
    data: str,
    split: str = "test",
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = 128,
    device: str = "cpu",
    out_dir: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Compare ``logits_int`` of ``backend`` with the integer reference; returns the parity report.

    ``on_batch(n)`` is called after each batch with its row count (progress bars)."""
    from qexport.data import get_task
    from qexport.models.integer import IntegerModel

    checkpoint = Path(checkpoint)
    ref = IntegerModel.from_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    runner = _load_runner(backend, None if model_file is None else Path(model_file), checkpoint, device)
    max_length = min(max_length, int(ref.meta["max_position_embeddings"]) - 2)
    n = mism = agree = truncated = 0
    ref_preds: list[int] = []
    be_preds: list[int] = []
    labels: list[int] = []
    worst = 0
    t0 = time.perf_counter()
    for feeds, lab, tr in batches(data, tok, split, limit, batch_size, max_length):
        r = ref(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
        o = np.asarray(runner.run(feeds)["logits_int"]).astype(np.int64)
        if o.shape != r.shape:
            mism += r.size
        else:
            diff = np.abs(o - r)
            mism += int((diff != 0).sum())
            worst = max(worst, int(diff.max()))
        ref_preds += r.argmax(-1).tolist()
        be_preds += o.argmax(-1).tolist()
        labels += lab or []
        n += r.shape[0]
        truncated += tr
        if on_batch is not None:
            on_batch(int(r.shape[0]))
    agree = sum(a == b for a, b in zip(ref_preds, be_preds, strict=True))
    res: dict[str, Any] = {
        "backend": backend,
        "model": str(model_file) if model_file else None,
        "data": f"{data}:{split}",
        "examples": n,
        "truncated": truncated,
        "max_length": max_length,
        "mismatches": mism,
        "max_abs_diff": worst,
        "argmax_agreement": agree / max(n, 1),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if len(labels) == n:
        task = get_task(data)
        res["reference_metric"] = task.compute_metric(ref_preds, labels)["metric"]
        res["backend_metric"] = task.compute_metric(be_preds, labels)["metric"]
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / ".parity.json.tmp"
        tmp.write_text(json.dumps(res, indent=2))
        os.replace(tmp, out_dir / "parity.json")
    return res

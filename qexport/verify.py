"""``qexport verify`` and ``qexport ort``: a backend's artifact run over a task split.

:func:`verify` is bit-exact parity against the integer reference: the PyTorch
:class:`~qexport.models.integer.IntegerModel` (built from the checkpoint alone) and the backend
run on the same tokenized batches (one :func:`qexport.evaluation.evaluate_many` loop) and every
``logits_int`` element must be equal; it also reports argmax agreement and each side's metric
when the data has labels, and writes ``parity.json``. :func:`run_on_data` runs one artifact on a
split (predictions and metric) with the tokenizer the model was trained with
(:func:`model_tokenizer`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from qexport.errors import BackendError, ConfigError
from qexport.evaluation import evaluate, evaluate_many, load_tokenizer, reference_predictor, runner_predictor
from qexport.io import atomic_write_json


def model_tokenizer(model_file: Path, tokenizer_dir: Path | None = None) -> Any:
    """The tokenizer that goes with an exported model file, the first of:

    ``tokenizer_dir`` when given; the directory the ONNX file records in its ``metadata_props``
    (:data:`qexport.export.exporter.TOKENIZER_PROP`, relative to the file's directory);
    ``tokenizer/`` next to the file (an ONNX file inside its checkpoint).
    :class:`~qexport.errors.ConfigError` when there is none.
    """
    from transformers import AutoTokenizer

    from qexport.export.exporter import TOKENIZER_PROP

    model_file = Path(model_file)
    if tokenizer_dir is not None:
        if not Path(tokenizer_dir).is_dir():
            raise ConfigError(f"tokenizer directory not found: {tokenizer_dir}")
        return AutoTokenizer.from_pretrained(str(tokenizer_dir))
    recorded = _onnx_metadata(model_file).get(TOKENIZER_PROP)
    candidates = [model_file.parent / recorded] if recorded else []
    candidates.append(model_file.parent / "tokenizer")
    for cand in candidates:
        if cand.is_dir():
            return AutoTokenizer.from_pretrained(str(cand))
    seen = f" (it records {recorded}, which does not exist)" if recorded else ""
    raise ConfigError(
        f"no tokenizer found for {model_file}{seen}: pass --tokenizer DIR (the checkpoint's tokenizer/)"
    )


def _onnx_metadata(model_file: Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file; empty when it is not one (its backend says why)."""
    import onnx

    if not model_file.is_file():
        return {}
    try:
        proto = onnx.load(str(model_file), load_external_data=False)
    except Exception:  # protobuf's errors vary; the backend's load reports what is wrong
        return {}
    return {p.key: p.value for p in proto.metadata_props}


def _load_runner(backend: str, model_file: Path | None, checkpoint: Path, device: str) -> Any:
    from qexport.backends import get_backend

    if model_file is None:
        defaults = {"ort": checkpoint / "model.functions.onnx", "tvm": checkpoint / "tvm"}
        default = defaults.get(backend)
        if default is None or not Path(default).exists():
            raise BackendError(f"--model is required for backend {backend} (no default artifact found)")
        model_file = Path(default)
    return get_backend(backend).load(Path(model_file), device)


def run_on_data(
    backend: str, model_file: Path, data: str, split: str = "test", limit: int | None = None,
    device: str = "cpu", batch_size: int = 32, max_length: int = 128, tokenizer_dir: Path | None = None,
) -> dict[str, Any]:
    """Run an ONNX/compiled model on a task split: predictions (the first 50) and the metric."""
    from qexport.backends import get_backend

    tokenizer = model_tokenizer(Path(model_file), tokenizer_dir)
    runner = get_backend(backend).load(Path(model_file), device)
    ev = evaluate(runner_predictor(runner), data, tokenizer, split, limit=limit, batch_size=batch_size,
                  max_length=max_length)
    return ev.as_dict(keep_preds=50)


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
    from qexport.models.integer import IntegerModel

    checkpoint = Path(checkpoint)
    ref = IntegerModel.from_checkpoint(checkpoint)
    tok = load_tokenizer(checkpoint)
    runner = _load_runner(backend, None if model_file is None else Path(model_file), checkpoint, device)
    max_length = min(max_length, int(ref.meta["max_position_embeddings"]) - 2)
    diff = {"mismatches": 0, "max_abs_diff": 0}

    def compare(outputs: Mapping[str, np.ndarray]) -> None:
        r = outputs["reference"].astype(np.int64)
        o = outputs["backend"].astype(np.int64)
        if o.shape != r.shape:
            diff["mismatches"] += r.size
        else:
            d = np.abs(o - r)
            diff["mismatches"] += int((d != 0).sum())
            diff["max_abs_diff"] = max(diff["max_abs_diff"], int(d.max()))

    evs = evaluate_many(
        {"reference": reference_predictor(ref), "backend": runner_predictor(runner, "logits_int")},
        data, tok, split, limit=limit, batch_size=batch_size, max_length=max_length,
        on_batch=on_batch, on_outputs=compare,
    )
    ref_ev, be_ev = evs["reference"], evs["backend"]
    n = ref_ev.examples
    agree = sum(a == b for a, b in zip(ref_ev.preds, be_ev.preds, strict=True))
    res: dict[str, Any] = {
        "backend": backend,
        "model": str(model_file) if model_file else None,
        "data": f"{data}:{split}",
        "examples": n,
        "truncated": ref_ev.truncated,
        "max_length": max_length,
        **diff,
        "argmax_agreement": agree / max(n, 1),
        "seconds": round(ref_ev.seconds, 2),
    }
    if ref_ev.metric is not None and be_ev.metric is not None:
        res["reference_metric"] = ref_ev.metric["metric"]
        res["backend_metric"] = be_ev.metric["metric"]
    if out_dir is not None:
        atomic_write_json(Path(out_dir) / "parity.json", res)
    return res

"""Integer checkpoints: ``model.safetensors`` + ``manifest.json`` (+ ``config.json``, ``tokenizer/``).

Written to a temporary sibling directory and renamed into place
(:func:`qexport.io.atomic_directory`), so a crash never leaves a half-written checkpoint where
a good one was.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qexport.errors import CheckpointError
from qexport.io import atomic_directory
from qexport.quant.freeze import LINEARS, freeze

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"


def _versions() -> dict[str, str]:
    import transformers

    from qexport import __version__

    return {
        "qexport": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def part_of(key: str) -> str:
    """Which part of the model a checkpoint tensor belongs to (for ``qexport size``)."""
    if key.startswith("emb.") and key.endswith(".w"):
        return "embeddings"
    if key.startswith(("pool.", "cls.", "tanh.")):
        return "classifier"
    last = key.rsplit(".", 1)[-1]
    if last == "w" and key.split(".")[1] in LINEARS:
        return "encoder_linears"
    if last in ("b", "g"):
        return "norms_and_biases"
    return "scales"


def byte_counts(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    parts: dict[str, int] = {}
    for k, t in tensors.items():
        p = part_of(k)
        parts[p] = parts.get(p, 0) + t.numel() * t.element_size()
    return parts


def save_checkpoint(
    model: Any,
    out_dir: Path,
    extra_manifest: dict[str, Any] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Freeze ``model`` and write an integer checkpoint directory atomically."""
    tensors, meta = freeze(model)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "qexport_tokenizer", None)
    with atomic_directory(Path(out_dir)) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS))
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp / "tokenizer")
        digest = hashlib.sha256((tmp / WEIGHTS).read_bytes()).hexdigest()
        manifest = {
            **meta,
            "bytes": byte_counts(tensors),
            "total_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "file_bytes": (tmp / WEIGHTS).stat().st_size,
            "sha256": digest,
            "versions": _versions(),
            **(extra_manifest or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return Path(out_dir)


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path} is not a directory")
    mf = path / MANIFEST
    if not mf.is_file():
        raise CheckpointError(f"not a qexport checkpoint: {mf} is missing")
    try:
        manifest = json.loads(mf.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint manifest {mf}: {exc}") from None
    if manifest.get("format") != "qexport-int-checkpoint":
        raise CheckpointError(f"{mf} is not a qexport integer checkpoint manifest")
    return manifest


def check_weights_file(path: Path, manifest: dict[str, Any], verify_hash: bool = True) -> Path:
    """``model.safetensors`` of a checkpoint, checked against the byte count and sha256 its
    manifest records; :class:`~qexport.errors.CheckpointError` when it is missing, truncated or
    altered. Returns the file's path."""
    wf = Path(path) / WEIGHTS
    if not wf.is_file():
        raise CheckpointError(f"checkpoint {path} has no {WEIGHTS}")
    expected = manifest.get("file_bytes")
    actual = wf.stat().st_size
    if expected is not None and actual != int(expected):
        raise CheckpointError(
            f"corrupt checkpoint: {wf} has {actual} bytes, its manifest records {int(expected)} "
            "(truncated or altered)"
        )
    if verify_hash and manifest.get("sha256"):
        h = hashlib.sha256()
        with open(wf, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        if h.hexdigest() != manifest["sha256"]:
            raise CheckpointError(f"corrupt checkpoint: {wf} does not match its manifest's sha256")
    return wf


def load_checkpoint(path: Path, verify_hash: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and validate a checkpoint: ``(tensors, manifest)``; CheckpointError on any damage."""
    path = Path(path)
    manifest = read_manifest(path)
    wf = check_weights_file(path, manifest, verify_hash=verify_hash)
    try:
        tensors = load_file(str(wf))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint {wf}: {exc}") from None
    need = ["emb.word.w", "emb.ln.out_s", "cls.w", "cls.ws", "cls.b"]
    need += [f"l{i}.{n}.w" for i in range(int(manifest.get("num_layers", 0))) for n in LINEARS]
    missing = [k for k in need if k not in tensors]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing tensors: {', '.join(missing[:5])}")
    return tensors, manifest

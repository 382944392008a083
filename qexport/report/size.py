"""True model size: bytes actually stored, by part, against FP32 and FP16 of the same model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from qexport.quant.checkpoint import check_weights_file, part_of, read_manifest

PARTS = ("embeddings", "encoder_linears", "norms_and_biases", "scales", "classifier")


def param_counts(manifest: dict[str, Any]) -> dict[str, int]:
    """Float parameter count of the same model, by part (what FP32/FP16 would store)."""
    counts = dict.fromkeys(PARTS, 0)
    hidden = int(manifest["hidden_size"])
    for key, shape in manifest["weight_shapes"].items():
        n = math.prod(shape)
        counts[part_of(key + ".w")] += n
        if not key.startswith("emb."):  # a linear: its bias
            counts[part_of(key + ".b") if not key.startswith(("pool", "cls")) else "classifier"] += shape[0]
    n_ln = 1 + 2 * int(manifest["num_layers"])
    counts["norms_and_biases"] += n_ln * 2 * hidden
    return counts


def checkpoint_size(path: Path) -> dict[str, Any]:
    """Size report of an integer checkpoint directory (see ``qexport size``)."""
    manifest = read_manifest(Path(path))
    check_weights_file(Path(path), manifest)  # the sizes below are the manifest's: check its file
    stored: dict[str, int] = {p: int(manifest["bytes"].get(p, 0)) for p in PARTS}
    params = param_counts(manifest)
    total = sum(stored.values())
    n_params = sum(params.values())
    fp32 = 4 * n_params
    fp16 = 2 * n_params
    return {
        "path": str(path),
        "preset": manifest.get("preset"),
        "bits": manifest.get("bits"),
        "params": n_params,
        "bytes": total,
        "file_bytes": int(manifest.get("file_bytes", total)),
        "fp32_bytes": fp32,
        "fp16_bytes": fp16,
        "ratio_vs_fp32": fp32 / total,
        "ratio_vs_fp16": fp16 / total,
        "parts": {
            p: {"bytes": stored[p], "fp32_bytes": 4 * params[p], "fp16_bytes": 2 * params[p]} for p in PARTS
        },
    }


def format_size_table(rep: dict[str, Any]) -> str:
    def mb(b: int) -> str:
        return f"{b / 1e6:9.2f} MB"

    lines = [f"{'part':<18}{'stored':>13}{'FP32':>13}{'FP16':>13}"]
    for p, d in rep["parts"].items():
        lines.append(f"{p:<18}{mb(d['bytes'])}{mb(d['fp32_bytes'])}{mb(d['fp16_bytes'])}")
    lines.append(f"{'total':<18}{mb(rep['bytes'])}{mb(rep['fp32_bytes'])}{mb(rep['fp16_bytes'])}")
    lines.append(
        f"{rep['ratio_vs_fp32']:.2f}x smaller than FP32, {rep['ratio_vs_fp16']:.2f}x smaller than FP16 "
        f"(preset {rep['preset']}, bits {rep['bits']})"
    )
    return "\n".join(lines)

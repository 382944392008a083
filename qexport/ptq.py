"""Post-training quantization: swap in the quant modules, calibrate EMA ranges, save."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qexport.quant import calibrate, quantize_model, save_checkpoint
from qexport.quant.presets import check_weight_bits, get_preset


def random_batches(
    vocab_size: int, n: int, batch_size: int, seq: int, seed: int = 0, low: int = 1000
) -> Iterator[dict[str, torch.Tensor]]:
    """Random token ids (for ``random:`` models, which have no meaningful text)."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(min(low, vocab_size - 1), vocab_size, (batch_size, seq), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def data_batches(
    task_spec: str, tokenizer: Any, n: int, batch_size: int, max_length: int, split: str = "train"
) -> Iterator[dict[str, torch.Tensor]]:
    from qexport.data import encode, get_task

    examples = get_task(task_spec).load(split)
    for i in range(n):
        chunk = examples[i * batch_size : (i + 1) * batch_size]
        if not chunk:
            return
        enc = encode(chunk, tokenizer, max_length=max_length)
        yield {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def post_training_quantize(
    model_spec: str,
    preset: str = "full",
    weight_bits: int = 8,
    emb_bits: int = 8,
    data: str | None = None,
    calib_batches: int = 8,
    batch_size: int = 16,
    max_length: int = 128,
    num_labels: int | None = None,
    out_dir: Path = Path("artifacts/checkpoint"),
    seed: int = 0,
    groups: str | None = None,
) -> Path:
    """Load ``model_spec``, quantize with ``preset``, calibrate and write an integer checkpoint.

    Calibration uses ``data`` (a task spec, its train split) when given, else
    random token ids (the right thing for ``random:`` models used for size and
    latency work; recorded in the manifest as ``calibration: random-ids``).
    ``groups`` (seed 004: ``ALL``, ``MHA``, ``FFN``, any :mod:`qexport.quant.groups` union): only
    those layers get ``weight_bits``, every other linear stays 8-bit.
    """
    from qexport.models import load_model

    p = get_preset(preset)
    if groups is not None:
        from qexport.quant.groups import parse_groups

        groups = "+".join(parse_groups(groups))  # a bad name fails before the model loads
    check_weight_bits(weight_bits)
    check_weight_bits(emb_bits, "emb_bits")
    if p.name == "fp":
        from qexport.errors import ConfigError

        raise ConfigError("preset fp has no integer checkpoint: pick a quantized preset")
    if num_labels is None:
        if data is not None:
            from qexport.data import get_task

            num_labels = get_task(data).num_labels or 2
        else:
            num_labels = 2
    model, tok = load_model(model_spec, num_labels=num_labels, seed=seed)
    if groups is None:
        quantize_model(model, p, weight_bits=weight_bits, emb_bits=emb_bits)
    else:
        from qexport.quant.groups import apply_weight_quantization

        quantize_model(model, p, weight_bits=8, emb_bits=emb_bits)
        apply_weight_quantization(model, groups, "minmax", weight_bits, preset=p.name)
    if data is not None:
        batches = data_batches(data, tok, calib_batches, batch_size, max_length)
        how = f"data:{data}"
    else:
        seq = min(max_length, 128)
        batches = random_batches(model.config.vocab_size, calib_batches, batch_size, seq, seed)
        how = "random-ids"
    n = calibrate(model, batches)
    model.eval()
    return save_checkpoint(
        model,
        Path(out_dir),
        extra_manifest={"source_model": model_spec, "calibration": how, "calibration_batches": n,
                        "weight_groups": groups},
        tokenizer=tok,
    )

"""A tiny BERT and a tiny labelled CSV task, for fast end-to-end tests of the trainer.

The model is a randomly initialised 2-layer, 64-wide ``BertForSequenceClassification``
with the offline MiniLM tokenizer; the task is a learnable synthetic sentiment set
(sentences built from positive or negative words) with train/dev/test splits.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "moving", "funny", "brilliant", "charming"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull", "weak", "tedious", "clumsy", "painful"]
FILLER = ["the", "film", "movie", "plot", "acting", "was", "really", "quite", "and", "story", "a", "very"]


def make_tiny_model(
    out_dir: Path, layers: int = 2, hidden: int = 64, seed: int = 0, dropout: float = 0.1
) -> Path:
    """Write a random tiny BERT classifier (+ the MiniLM tokenizer) to ``out_dir``; return it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from qexport.data.offline import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    cfg.num_labels = 2
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg)
    out = Path(out_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_tiny_task(path: Path, n_train: int = 320, n_dev: int = 64, n_test: int = 64, seed: int = 0) -> Path:
    """Write a CSV (``text,label,split``) of synthetic positive/negative sentences; return its path."""
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "split"])
        for split, n in (("train", n_train), ("dev", n_dev), ("test", n_test)):
            for _ in range(n):
                label = rng.randrange(2)
                words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))]
                for _ in range(rng.randint(1, 2)):
                    words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
                w.writerow([" ".join(words), label, split])
    return path


def tiny_recipe_dict(model_dir: Path, task_csv: Path, **over: object) -> dict[str, object]:
    """A recipe dict (before validation) that trains the tiny model for a few dozen steps."""
    rec: dict[str, object] = {
        "version": 1,
        "model": str(model_dir),
        "task": f"csv:{task_csv}",
        "max_length": 32,
        "quant": {"preset": "full", "weight_bits": 8},
        "fp": {"steps": 20, "lr": 1e-3, "batch_size": 16, "warmup_ratio": 0.1},
        "qat": {"steps": 20, "lr": 2e-4, "batch_size": 16, "calib_batches": 2},
        "train": {"eval_every": 10, "save_every": 5, "seed": 0, "device": "cpu"},
    }
    rec.update(over)
    return rec


def save_checked_graph(graph: Any, path: Path, opset: int = 18) -> Path:
    """A hand-built ONNX graph as a checked model file (IR 8, the given ai.onnx opset)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path

"""The CPU user's INT8 baseline: ORT ``quantize_dynamic`` of a fine-tuned FP model, evaluated on rt."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from qexport.errors import CheckpointError


@pytest.fixture(scope="module")
def fp_model_dir(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM with a 2-class head scaled up (clear margins), saved as the trainer saves ``fp/``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir), num_labels=2)
    with torch.no_grad():
        model.classifier.weight.mul_(50.0)
    out = tmp_path_factory.mktemp("fp") / "fp"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(minilm_dir)).save_pretrained(out)
    return out


def test_dynamic_int8_accuracy_matches_the_fp_model_it_quantizes(fp_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from qexport.evaluation import evaluate
    from qexport.report.baselines import dynamic_int8_accuracy

    res = dynamic_int8_accuracy(fp_model_dir, "rt", "test", limit=48, batch_size=16, work_dir=tmp_path,
                                keep_preds=48)
    assert res["model"] == "ORT quantize_dynamic INT8" and res["examples"] == 48 and res["data"] == "rt:test"
    import onnx

    ops = {n.op_type for n in onnx.load(str(tmp_path / "int8.dynamic.onnx")).graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops or "DynamicQuantizeMatMul" in ops
    # the FP model itself, in torch: where its margin is clear, INT8 dynamic quantization agrees
    model = AutoModelForSequenceClassification.from_pretrained(str(fp_model_dir)).eval()
    logits: list[np.ndarray] = []

    def predict(feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
        logits.append(out)
        return out

    tok = AutoTokenizer.from_pretrained(str(fp_model_dir))
    fp = evaluate(predict, "rt", tok, "test", limit=48, batch_size=16)
    margin = np.abs(np.diff(np.concatenate(logits), axis=-1)).reshape(-1)
    clear = margin > 1.0
    assert clear.sum() >= 10
    assert (np.asarray(res["predictions"])[clear] == np.asarray(fp.preds)[clear]).all()
    labels = np.asarray(fp.labels)
    assert res["accuracy"] == pytest.approx(100 * float((np.asarray(res["predictions"]) == labels).mean()))


def test_dynamic_int8_accuracy_needs_an_fp_model(tmp_path: Path) -> None:
    from qexport.report.baselines import dynamic_int8_accuracy

    with pytest.raises(CheckpointError, match="no fine-tuned FP model"):
        dynamic_int8_accuracy(tmp_path, "rt")

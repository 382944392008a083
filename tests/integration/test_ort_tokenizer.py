"""``qexport ort MODEL --data T`` tokenizes with the model's own tokenizer.

The checkpoint here has a WordPiece vocabulary of its own (35 tokens, not MiniLM's 30,522), so
MiniLM's ids would be wrong for it: the exporter records the checkpoint's ``tokenizer/`` in the
ONNX file's ``metadata_props``, ``qexport ort`` reads it back (or takes ``--tokenizer DIR``), and
with no way to find one it stops with one ``error:`` line, exit 2.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import pytest

from qexport.cli import main
from qexport.evaluation import evaluate, load_tokenizer, reference_predictor
from qexport.export.exporter import TOKENIZER_PROP
from tests.tiny import FILLER, NEGATIVE, POSITIVE, make_tiny_task

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def own_vocab_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An integer checkpoint of a tiny BERT whose tokenizer has its own vocabulary; the task CSV."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from qexport.ptq import post_training_quantize

    root = tmp_path_factory.mktemp("tok")
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(SPECIALS + sorted(set(POSITIVE + NEGATIVE + FILLER))) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertForSequenceClassification(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = make_tiny_task(root / "task.csv", n_train=32, n_dev=8, n_test=12)
    ckpt = post_training_quantize(str(model_dir), preset="full", data=f"csv:{task}", calib_batches=1,
                                  batch_size=8, max_length=32, out_dir=root / "ckpt")
    return ckpt, task


def _ort(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(["ort", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _reference_preds(ckpt: Path, task: Path) -> list[int]:
    from qexport.models.integer import IntegerModel

    ev = evaluate(reference_predictor(IntegerModel.from_checkpoint(ckpt)), f"csv:{task}",
                  load_tokenizer(ckpt), "test", batch_size=4, max_length=64)
    return ev.preds


def test_the_vocabulary_differs_from_minilms(own_vocab_ckpt: tuple[Path, Path], minilm_tokenizer) -> None:  # type: ignore[no-untyped-def]
    ckpt, _ = own_vocab_ckpt
    text = "the film was brilliant"
    assert load_tokenizer(ckpt)(text)["input_ids"] != minilm_tokenizer(text)["input_ids"]


@pytest.mark.parametrize("where", ["outside", "inside"])
def test_ort_uses_the_checkpoints_tokenizer(
    own_vocab_ckpt: tuple[Path, Path], where: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, task = own_vocab_ckpt
    if where == "inside":  # qexport onnx's default: the file inside its checkpoint
        ck = tmp_path / "ck"
        shutil.copytree(ckpt, ck)
        ckpt, model = ck, ck / "model.functions.onnx"
    else:
        model = tmp_path / "exports" / "m.onnx"
    assert main(["onnx", str(ckpt), "-o", str(model), "--linear", "integer"]) == 0
    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    assert (model.parent / props[TOKENIZER_PROP]).resolve() == (ckpt / "tokenizer").resolve()
    capsys.readouterr()
    code, out, err = _ort([str(model), "--data", f"csv:{task}", "--batch-size", "4"], capsys)
    assert code == 0, err
    res = json.loads(out)
    assert res["examples"] == 12
    assert res["predictions"] == _reference_preds(ckpt, task)  # the integer model, same tokenizer


def test_ort_without_a_tokenizer_is_one_error_line(
    own_vocab_ckpt: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, task = own_vocab_ckpt
    model = tmp_path / "a" / "m.onnx"
    assert main(["onnx", str(ckpt), "-o", str(model), "--linear", "integer"]) == 0
    moved = tmp_path / "elsewhere" / "deeper" / "m.onnx"  # the recorded relative path breaks
    moved.parent.mkdir(parents=True)
    shutil.move(model, moved)
    capsys.readouterr()
    code, out, err = _ort([str(moved), "--data", f"csv:{task}"], capsys)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no tokenizer found for {moved}")
    assert "--tokenizer DIR" in lines[0]

    code, out, err = _ort([str(moved), "--data", f"csv:{task}", "--tokenizer", str(ckpt / "tokenizer"),
                           "--batch-size", "4"], capsys)
    assert code == 0, err
    assert json.loads(out)["predictions"] == _reference_preds(ckpt, task)

    code, _, err = _ort([str(moved), "--data", f"csv:{task}", "--tokenizer", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.strip() == f"error: tokenizer directory not found: {tmp_path / 'nope'}"

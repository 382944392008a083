"""Quantized MiniLM on real text: the in-memory (eval-mode) integer path equals the checkpoint's,
layer by layer; the swap is reversible; checkpoints are atomic and validated."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qexport.data import encode, get_task
from qexport.errors import CheckpointError, ModelError
from qexport.models import load_model
from qexport.models.integer import IntegerModel
from qexport.quant import calibrate, dequantize_model, quantize_model, save_checkpoint


@pytest.fixture(scope="module")
def rt_batch(minilm_tokenizer):  # type: ignore[no-untyped-def]
    ex = get_task("rt").load("test")[:24]
    return encode(ex, minilm_tokenizer, max_length=64)


@pytest.fixture(scope="module")
def qat_model(rt_batch):  # type: ignore[no-untyped-def]
    model, tok = load_model("minilm", 2)
    quantize_model(model, "full")
    calibrate(model, [{"input_ids": rt_batch["input_ids"], "attention_mask": rt_batch["attention_mask"]}])
    model.eval()
    return model


def test_eval_model_and_checkpoint_identical_layer_by_layer(qat_model, rt_batch, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    live, saved = {}, {}
    ids, mask = rt_batch["input_ids"], rt_batch["attention_mask"]
    a = IntegerModel.from_model(qat_model)(ids, mask, capture=live)
    ck = save_checkpoint(qat_model, tmp_path / "ck")
    b = IntegerModel.from_checkpoint(ck)(ids, mask, capture=saved)
    assert live.keys() == saved.keys() and len(live) > 6 * 8
    for k in live:
        assert torch.equal(live[k], saved[k]), k
        assert live[k].dtype == torch.int64 and int(live[k].abs().max()) < 2**31, k
    assert torch.equal(a, b)
    # int8 activations really are int8
    for k in ("emb.ln", "l0.ctx", "l0.ln1", "l0.gelu", "l5.ln2", "pooled"):
        assert int(live[k].abs().max()) <= 127, k
    assert int(live["l0.probs"].min()) >= 0


def test_integer_path_tracks_fake_quant_model(qat_model, rt_batch) -> None:  # type: ignore[no-untyped-def]
    """The float QAT emulation and the integer kernels agree closely (same scales)."""
    ids, mask = rt_batch["input_ids"], rt_batch["attention_mask"]
    im = IntegerModel.from_model(qat_model)
    cap: dict[str, torch.Tensor] = {}
    im(ids, mask, capture=cap)
    with torch.no_grad():
        out = qat_model.bert(input_ids=ids, attention_mask=mask)
    h_float = out.last_hidden_state  # fake-quantized on the same int8 grid
    h_int = cap["l5.ln2"].float() * im.s("l5.ln2.out_s")
    valid = mask.bool()
    cos = torch.nn.functional.cosine_similarity(h_float[valid], h_int[valid], dim=-1)
    assert float(cos.mean()) > 0.9  # LSB-level rounding differences compound over 6 layers


def test_swap_is_reversible(rt_batch) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model("minilm", 2)
    model.eval()
    feeds = {"input_ids": rt_batch["input_ids"], "attention_mask": rt_batch["attention_mask"]}
    with torch.no_grad():
        ref = model(**feeds).logits
    quantize_model(model, "full", weight_bits=4)
    with torch.no_grad():
        q = model(**feeds).logits
    assert not torch.allclose(q, ref)
    dequantize_model(model)
    names = {type(m).__name__ for m in model.modules()}
    assert not any(n.startswith("Quant") for n in names)
    with torch.no_grad():
        back = model(**feeds).logits
    assert torch.allclose(back, ref, atol=1e-5)


def test_roberta_random_model_quantizes_and_runs() -> None:
    model, _ = load_model("random:roberta-base", 3)
    model.roberta.encoder.layer = model.roberta.encoder.layer[:1]  # keep it fast
    model.config.num_hidden_layers = 1
    quantize_model(model, "full")
    ids = torch.randint(5, 1000, (2, 9))
    ids[1, 6:] = model.config.pad_token_id
    mask = (ids != model.config.pad_token_id).long()
    calibrate(model, [{"input_ids": ids, "attention_mask": mask}])
    out = IntegerModel.from_model(model)(ids, mask)
    assert out.shape == (2, 3)


def test_unquantized_or_uncalibrated_model_is_refused() -> None:
    model, _ = load_model("minilm", 2)
    with pytest.raises(ModelError, match="not quantized"):
        IntegerModel.from_model(model)
    quantize_model(model, "full")
    with pytest.raises(ModelError, match="never observed"):
        IntegerModel.from_model(model)


def test_checkpoint_damage_is_detected(int_checkpoint: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(int_checkpoint, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or altered"):
        IntegerModel.from_checkpoint(bad)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # same size, one byte altered
    (bad / "model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="sha256"):
        IntegerModel.from_checkpoint(bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        IntegerModel.from_checkpoint(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        IntegerModel.from_checkpoint(bad)
    with pytest.raises(CheckpointError, match="not found"):
        IntegerModel.from_checkpoint(tmp_path / "nope")


def test_checkpoint_manifest_and_atomic_replace(int_checkpoint: Path, tmp_path: Path) -> None:
    m = json.loads((int_checkpoint / "manifest.json").read_text())
    assert m["preset"] == "full" and m["bits"]["weight"] == 8 and m["arch"] == "bert"
    assert m["bytes"]["encoder_linears"] == sum(
        a * b for k, (a, b) in m["weight_shapes"].items() if k.startswith("l")
    )
    assert (int_checkpoint / "tokenizer").is_dir()
    # no temp dirs left next to it
    assert not [p for p in int_checkpoint.parent.iterdir() if p.name.startswith(".")]

"""The seeds' experiments through the trainer: quantizers on layer groups, KD, CPT, latent, PTQ.

Tiny model and data (tests/tiny.py): each run takes about a second. What is asserted is
what the recipe promises: the selected groups hold integers of the chosen width in the checkpoint
(everything else 8-bit), schedules change the quantizers during training and evaluation runs at the
deployed precision, PACT's clip trains with its own learning rate, a calibration-only (PTQ) recipe
writes a checkpoint, and the exported ONNX of each runs bit-exact in ONNX Runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qexport.config import validate_recipe
from qexport.export.exporter import export_onnx
from qexport.quant.checkpoint import load_checkpoint
from qexport.quant.packing import unpack
from qexport.train.trainer import build_model, quant_controller, train
from qexport.verify import verify
from tests.tiny import make_tiny_model, make_tiny_task, tiny_recipe_dict


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tiny")
    return make_tiny_model(d / "model"), make_tiny_task(d / "task.csv", n_train=96, n_dev=32, n_test=32)


def _recipe(tiny: tuple[Path, Path], qat: dict[str, Any] | None = None, **over: Any) -> Any:
    model, task = tiny
    rec = tiny_recipe_dict(
        model, task,
        fp={"steps": 6, "lr": 1e-3, "batch_size": 16},
        qat=qat or {"steps": 8, "lr": 2e-4, "batch_size": 16, "calib_batches": 1},
        train={"eval_every": 4, "save_every": 100, "device": "cpu"},
        **over,
    )
    r = validate_recipe(rec)
    r.name = "t"
    return r


def _weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    tensors, meta = load_checkpoint(ckpt)
    bits = {k: int(v) for k, v in meta["weight_bits"].items()}
    shapes = meta["weight_shapes"]
    ints = {k: unpack(tensors[k + ".w"], b, shapes[k][-1]) for k, b in bits.items()}
    return ints, bits


CASES = {
    "minmax2-ffn": ({"groups": "FFN", "bits": 2}, {"f1", "f2"}, (-2, 1)),
    "ternary-ffn+emb": (
        {"groups": "FFN+EMB", "quantizer": "ternary", "bits": 2}, {"f1", "f2", "emb.word"}, (-1, 1)
    ),
    "irnet-all_qk": ({"groups": "ALL_QK", "quantizer": "ir-net", "bits": 1, "mode": "basic"},
                     {"q", "k", "o", "f1", "f2", "pool"}, (-1, 1)),
    "lsq4-mha": ({"groups": "MHA", "quantizer": "lsq", "bits": 4}, {"q", "k", "v", "o"}, (-8, 7)),
}


@pytest.fixture(scope="module")
def ref_size(tiny: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> int:
    """True size of the plain 8-bit checkpoint of the same tiny model."""
    ref = train(_recipe(tiny), tmp_path_factory.mktemp("ref") / "run")
    return int(json.loads((Path(ref["checkpoint"]) / "manifest.json").read_text())["total_bytes"])


def _kind(key: str) -> str:
    return key if key.startswith(("emb.", "pool", "cls")) else key.split(".")[-1]


@pytest.mark.parametrize("case", list(CASES))
def test_groups_get_their_bits_and_export_exact(
    tiny: tuple[Path, Path], ref_size: int, tmp_path: Path, case: str
) -> None:
    weights, selected, (lo, hi) = CASES[case]
    rec = _recipe(tiny, quant={"preset": "full", "weights": weights})
    s = train(rec, tmp_path / "run")
    assert s["weight_quant"]["groups"] == weights["groups"]
    ckpt = Path(s["checkpoint"])
    ints, bits = _weights(ckpt)
    for key, q in ints.items():
        if _kind(key) in selected:
            assert bits[key] == max(2, weights["bits"]), key  # binary weights take a 2-bit field
            assert lo <= int(q.min()) and int(q.max()) <= hi, key
            if weights.get("quantizer") in ("ternary", "ir-net"):
                assert set(q.unique().tolist()) <= {-1, 0, 1}, key
        else:
            assert bits[key] == 8, key
    assert bits["cls"] == 8  # the classifier's last linear stays out of every group (keep_last)
    # the checkpoint's true size shrinks with the selected groups' bits
    assert json.loads((ckpt / "manifest.json").read_text())["total_bytes"] < ref_size
    # integer-only deployment of what it produced: ONNX Runtime equals the integer reference exactly
    onnx_path = export_onnx(ckpt, tmp_path / "m.onnx", form="flat", linear="qdq")
    res = verify(ckpt, "ort", onnx_path, f"csv:{tiny[1]}", limit=32, max_length=32)
    assert res["examples"] == 32 and res["mismatches"] == 0
    assert s["int_metric"] == res["reference_metric"]


def test_cyclic_precision_schedule_and_deployed_bits(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    rec = _recipe(tiny, quant={"preset": "full", "act_bits": 16,
                               "weights": {"groups": "FFN", "bits": 4},
                               "schedule": {"cyclic": "4-8", "cycles": 2}})
    model, _ = build_model(str(tiny[0]), rec, 2, quantized=True)
    ctrl = quant_controller(model, rec, total=16)
    ffn = model.bert.encoder.layer[0].intermediate.dense.weight_quantizer
    qkv = model.bert.encoder.layer[0].attention.self.query.weight_quantizer
    seen = set()
    for step in range(16):
        ctrl.on_step(step)
        seen.add(ffn.bits)
        assert qkv.bits == 8  # only the selected groups cycle
    assert seen == {4, 5, 6, 7, 8}
    assert ctrl.on_eval()["weight_bits"] == 4 and ffn.bits == 4
    s = train(rec, tmp_path / "run")
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["weight_bits"] for h in hist if h["stage"] == "qat"] == [4, 4]  # evaluated as deployed
    _, bits = _weights(Path(s["checkpoint"]))
    assert {bits[f"l{i}.{n}"] for i in range(2) for n in ("f1", "f2")} == {4}


def test_latent_quantization_switches_on(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    rec = _recipe(tiny, quant={"preset": "full", "weights": {"groups": "ALL", "quantizer": "lsq", "bits": 4},
                               "schedule": {"latent_steps": 3}})
    model, _ = build_model(str(tiny[0]), rec, 2, quantized=True)
    ctrl = quant_controller(model, rec, total=8)
    wq = model.bert.encoder.layer[1].output.dense.weight_quantizer
    act = model.bert.encoder.layer[1].attention.self.query.out_act
    w = model.bert.encoder.layer[1].output.dense.weight
    for step, on in ((0, False), (2, False), (3, True), (7, True)):
        assert ctrl.on_step(step)["quantized"] is on
        assert wq.enabled is on and act.enabled is on
        assert torch.equal(wq(w), w) is not on
    s = train(rec, tmp_path / "run")
    assert s["int_metric"] is not None


def test_pact_clip_trains_with_its_own_lr(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    rec = _recipe(tiny, quant={"preset": "full", "weights": {
        "groups": "FFN", "quantizer": "pact", "bits": 4, "options": {"init": 1.0, "lr_scale": 1000.0}}})
    train(rec, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "qat" / "best.pt", weights_only=True)
    alphas = {k: float(v.reshape(-1)[0]) for k, v in state.items() if k.endswith("weight_quantizer.alpha")}
    assert len(alphas) == 4
    # lr 2e-4 x 1000: the clip moves by far more than the plain lr could in 8 steps
    assert max(abs(a - 1.0) for a in alphas.values()) > 0.05


def test_ptq_recipe_calibrates_only(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    rec = _recipe(tiny, qat={"steps": 0, "batch_size": 16, "calib_batches": 2},
                  quant={"preset": "full", "weights": {"groups": "MHA", "bits": 4}})
    s = train(rec, tmp_path / "run")
    assert s["qat_steps"] == 0 and s["int_metric"] is not None
    fp = torch.load(tmp_path / "run" / "qat" / "best.pt", weights_only=True)
    model, _ = build_model(str(tmp_path / "run" / "fp"), rec, 2, quantized=False)
    # no training happened: the weights are the FP model's
    for k, v in model.state_dict().items():
        if k.endswith("query.weight"):
            assert torch.equal(fp[k], v)


def test_distillation_run(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base = {"preset": "full", "weights": {"groups": "FFN", "bits": 2}}
    kd = train(_recipe(tiny, quant=base, distillation={"enabled": True, "hidden": 1.0, "attention": 1.0}),
               tmp_path / "kd")
    plain = train(_recipe(tiny, quant=base), tmp_path / "plain")
    assert kd["distillation"] is True and plain["distillation"] is False
    # same data, same init, same FP stage: the QAT losses differ only through the KD terms
    hk = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    hp = json.loads((tmp_path / "plain" / "metrics.json").read_text())
    assert [h["loss"] for h in hk if h["stage"] == "fp"] == [h["loss"] for h in hp if h["stage"] == "fp"]
    assert [h["loss"] for h in hk if h["stage"] == "qat"] != [h["loss"] for h in hp if h["stage"] == "qat"]

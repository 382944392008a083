"""A tiny sweep end to end: two presets and a seed experiment (2-bit FFN + KD) -> table, plots."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from qexport.train.sweep import run_sweep
from tests.tiny import make_tiny_model, make_tiny_task, tiny_recipe_dict


def test_tiny_sweep(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model")
    task = make_tiny_task(tmp_path / "task.csv", n_train=96, n_dev=32, n_test=32)
    paths = []
    for preset in ("full", "linear"):
        rec = tiny_recipe_dict(
            model,
            task,
            quant={"preset": preset, "weight_bits": 8},
            fp={"steps": 4, "lr": 1e-3, "batch_size": 16},
            qat={"steps": 4, "lr": 2e-4, "batch_size": 16, "calib_batches": 1},
            train={"eval_every": 2, "save_every": 100, "device": "cpu"},
        )
        p = tmp_path / f"tiny-{preset}.yaml"
        p.write_text(yaml.safe_dump(rec))
        paths.append(p)
    exp = tiny_recipe_dict(
        model,
        task,
        quant={"preset": "full", "weights": {"groups": "FFN", "bits": 2}},
        distillation={"enabled": True},
        fp={"steps": 4, "lr": 1e-3, "batch_size": 16},
        qat={"steps": 4, "lr": 2e-4, "batch_size": 16, "calib_batches": 1},
        train={"eval_every": 2, "save_every": 100, "device": "cpu"},
    )
    p = tmp_path / "tiny-w2-ffn-kd.yaml"
    p.write_text(yaml.safe_dump(exp))
    paths.append(p)
    md = run_sweep(paths, tmp_path / "sweep")
    out = tmp_path / "sweep"
    rows = json.loads((out / "sweep.json").read_text())
    assert [r["preset"] for r in rows] == ["full", "linear", "full"]
    assert [(r["groups"], r["weight_bits"], r["kd"]) for r in rows] == [
        ("ALL+EMB", 8, False), ("ALL+EMB", 8, False), ("FFN", 2, True)
    ]
    # the FP stage is trained once (first recipe) and reused by the others: same FP model and metric
    for r in rows[1:]:
        hist = json.loads((out / r["recipe"] / "metrics.json").read_text())
        assert all(h["reused_from"] == str(out / "tiny-full") for h in hist if h["stage"] == "fp")
        assert r["fp_metric"] == rows[0]["fp_metric"]
    assert rows[2]["size_bytes"] < rows[0]["size_bytes"]  # 2-bit FFN weights are packed
    for r in rows:
        assert 0.0 <= r["int_metric"] <= 100.0 and r["fp_metric"] is not None
        assert r["train_time_s"] > 0 and r["qat_step_time_ratio"] > 0
        manifest = json.loads((out / r["recipe"] / "checkpoint" / "manifest.json").read_text())
        assert r["size_bytes"] == manifest["total_bytes"] == sum(manifest["bytes"].values())
        assert manifest["recipe"]["quant"]["preset"] == r["preset"]
        assert manifest["metrics"]["test"]["metric"] == r["int_metric"]
    text = md.read_text()
    assert "| tiny-full | " in text and "| tiny-linear | " in text
    assert "| tiny-w2-ffn-kd | csv:" in text and "| FFN | minmax | 2 | yes |" in text
    for png in ("accuracy.png", "time_vs_accuracy.png", "size_vs_accuracy.png", "training_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for r in rows:
        assert (out / r["recipe"] / "training_curve.png").is_file()
        assert len(json.loads((out / r["recipe"] / "metrics.json").read_text())) == 4
    # a second call reuses the finished runs (no retraining): same rows
    before = (out / "tiny-full" / "summary.json").stat().st_mtime_ns
    run_sweep(paths, out)
    assert (out / "tiny-full" / "summary.json").stat().st_mtime_ns == before
    # a later sweep in the same directory reuses the FP stage an earlier one finished
    late = dict(exp, quant={"preset": "full", "weights": {"groups": "QKV", "bits": 4}}, distillation={})
    p = tmp_path / "tiny-w4-qkv.yaml"
    p.write_text(yaml.safe_dump(late))
    run_sweep([p], out)
    hist = json.loads((out / "tiny-w4-qkv" / "metrics.json").read_text())
    assert {h.get("reused_from") for h in hist if h["stage"] == "fp"} == {str(out / "tiny-full")}

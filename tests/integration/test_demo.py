"""``qexport demo`` plumbing on a tiny run: the trainer's own integer test pass is skipped, the
integer accuracy comes from ORT after its parity check and equals the reference's on the same
rows, the token cache is reused, and the last screen names the files; progress lines off a TTY."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from qexport import demo

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "rt-minilm-full.yaml"
TINY = ["fp.steps=2", "qat.steps=2", "train.eval_every=2", "train.eval_limit=32", "train.test_limit=48",
        "qat.calib_batches=2"]


def test_demo_tiny(tmp_path: Path) -> None:
    from qexport.evaluation import evaluate, load_tokenizer, reference_predictor
    from qexport.models.integer import IntegerModel

    out = tmp_path / "demo"
    s = demo.run_demo(out, RECIPE, TINY, parity_limit=24, tvm=False, report=False)
    assert json.loads((out / "summary.json").read_text()) == json.loads(json.dumps(s))
    train_summary = json.loads((out / "train" / "summary.json").read_text())
    assert "int_metric" not in train_summary and "int_test" not in train_summary  # skipped in training
    assert s["parity"]["ort"]["examples"] == 24 and s["parity"]["ort"]["mismatches"] == 0
    acc = s["accuracy"]
    assert acc["integer_scored_by"] == "ort" and acc["examples"] == 48
    ckpt = out / "train" / "checkpoint"
    ref = evaluate(reference_predictor(IntegerModel.from_checkpoint(ckpt)), "rt", load_tokenizer(ckpt),
                   "test", limit=48, batch_size=64, max_length=64)
    assert ref.metric is not None and acc["integer"] == round(ref.metric["metric"], 2)
    assert acc["qat"] == round(train_summary["qat_metric"], 2)
    assert set(s["timings_s"]) == {"train", "size", "onnx", "ort", "dynamic", "total"}
    assert isinstance(acc["dynamic_int8"], float)  # the FP model through ORT quantize_dynamic
    cache = sorted(p.name for p in (out / "cache").iterdir())
    assert [c.split("-")[1] for c in cache] == ["dev", "test", "train"]

    text = io.StringIO()
    Console(file=text, width=200).print(demo.summary_table(s))
    screen = text.getvalue()
    assert str(out / "summary.json") in screen and "bit-exact" in screen
    assert "ORT quantize_dynamic" in screen and f"{acc['dynamic_int8']:.2f} (the FP model" in screen
    assert f"integer {acc['integer']:.2f}" in screen and "{" not in screen  # no JSON dump

    # a second run reuses the finished training and the token cache
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}
    s2 = demo.run_demo(out, RECIPE, TINY, parity_limit=24, tvm=False, report=False)
    assert s2["accuracy"] == acc
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == mtimes


def test_report_times_the_tvm_library_the_demo_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The TVM stage's library (parity-checked) is the one the report times, on the report's
    thread count; no second TVM build."""
    monkeypatch.delenv("TVM_NUM_THREADS", raising=False)
    out = tmp_path / "demo"
    s = demo.run_demo(out, RECIPE, TINY, parity_limit=8, tvm_parity_limit=8, report_backends=("tvm",),
                      report_seqs=(16,), report_batches=(1,), report_iters=2)
    assert s["parity"]["tvm"]["examples"] == 8 and s["parity"]["tvm"]["mismatches"] == 0
    rows = {r["key"]: r for r in json.loads((out / "report" / "report.json").read_text())["rows"]}
    assert rows["tvm-int8"]["status"] == "ok"
    assert Path(rows["tvm-int8"]["artifact"]) == out / "tvm-llvm"
    assert not (out / "report" / "artifacts" / "tvm-int8-cpu").exists()
    import os

    assert os.environ["TVM_NUM_THREADS"] == str(demo.REPORT_THREADS)


def test_plain_progress_lines_off_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    text = io.StringIO()
    con = Console(file=text, force_terminal=False, width=120)
    monkeypatch.setattr(demo, "PLAIN_EVERY_S", 0.0)
    with demo.progress("ort parity", 10, con) as advance:
        for _ in range(5):
            advance(2)
    lines = text.getvalue().splitlines()
    assert lines[0].startswith("ort parity: 2/10 (20%), ETA ")
    assert lines[-1].startswith("ort parity: 10/10 done in ") and len(lines) == 5
    assert "\x1b" not in text.getvalue()  # no control codes when not a terminal

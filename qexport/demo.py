"""``qexport demo``: the whole pipeline on the offline default (MiniLM on Rotten Tomatoes).

train (FP then QAT, recipe ``rt-minilm-full``) -> integer checkpoint -> size ->
ONNX (functions + flat) -> ONNX Runtime parity -> TVM (llvm) build + parity ->
CPU latency report -> ``summary.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console(stderr=True)


def _stage(name: str) -> float:
    console.rule(f"[bold]{name}")
    return time.perf_counter()


def evaluate_integer(
    ckpt: Path, task_spec: str, split: str = "test", batch_size: int = 64, max_length: int = 128
) -> dict[str, float]:
    """Metric of the pure-integer reference model (from the checkpoint alone) on a task split."""
    from transformers import AutoTokenizer

    from qexport.data import encode, get_task
    from qexport.models.integer import IntegerModel

    im = IntegerModel.from_checkpoint(ckpt)
    tok = AutoTokenizer.from_pretrained(str(Path(ckpt) / "tokenizer"))
    task = get_task(task_spec)
    examples = task.load(split)
    preds: list[int] = []
    for i in range(0, len(examples), batch_size):
        enc = encode(examples[i : i + batch_size], tok, max_length=max_length)
        preds += im.predict(enc["input_ids"], enc["attention_mask"]).tolist()
    labels = [int(e.label) for e in examples if e.label is not None]
    return task.compute_metric(preds, labels)


def run_demo(out: Path, recipe: Path, overrides: list[str], parity_limit: int | None = 256) -> dict[str, Any]:
    from qexport.backends import get_backend
    from qexport.config import load_recipe
    from qexport.export.exporter import export_onnx
    from qexport.io import atomic_write_json
    from qexport.report.latency import run_report
    from qexport.report.size import checkpoint_size
    from qexport.train import train
    from qexport.verify import verify

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"recipe": str(recipe)}
    timings: dict[str, float] = {}

    t = _stage("train (FP -> QAT)")
    rec = load_recipe(recipe, overrides)
    tr = train(rec, out / "train", resume=(out / "train").exists())
    timings["train_s"] = time.perf_counter() - t
    ckpt = out / "train" / "checkpoint"
    int_acc = tr.get("int_metric")
    if int_acc is None:
        int_acc = evaluate_integer(ckpt, rec.task, "test")["metric"]
    summary.update({
        "fp_accuracy": tr.get("fp_metric"),
        "qat_accuracy": tr.get("qat_metric"),
        "int_accuracy": int_acc,
        "qat_step_time_ratio": tr.get("qat_step_time_ratio"),
        "checkpoint": str(ckpt),
    })

    t = _stage("size")
    size = checkpoint_size(ckpt)
    summary["size_bytes"] = size["bytes"]
    summary["size_ratio"] = size["ratio_vs_fp32"]
    timings["size_s"] = time.perf_counter() - t

    t = _stage("onnx")
    onnx_fn = export_onnx(ckpt, out / "model.functions.onnx", form="functions", linear="qdq")
    onnx_flat = export_onnx(ckpt, out / "model.flat.onnx", form="flat", linear="qdq")
    summary["onnx_bytes"] = onnx_fn.stat().st_size
    timings["onnx_s"] = time.perf_counter() - t

    t = _stage("verify: ONNX Runtime")
    ort_res = verify(ckpt, "ort", onnx_fn, "rt", limit=parity_limit, out_dir=out / "parity-ort")
    summary["parity_mismatches_ort"] = ort_res["mismatches"]
    summary["parity_examples"] = ort_res.get("examples")
    timings["verify_ort_s"] = time.perf_counter() - t

    t = _stage("TVM (llvm) build + verify")
    tvm_dir = get_backend("tvm").compile(onnx_flat, out / "tvm-llvm", target="llvm")
    # TVM's llvm build is untuned (see README): parity on a smaller slice keeps the demo short
    tvm_limit = None if parity_limit is None else min(parity_limit, 64)
    tvm_res = verify(ckpt, "tvm", tvm_dir, "rt", limit=tvm_limit, out_dir=out / "parity-tvm")
    summary["parity_mismatches_tvm"] = tvm_res["mismatches"]
    timings["tvm_s"] = time.perf_counter() - t

    t = _stage("report (CPU)")
    rep = run_report(ckpt, None, ["torch", "ort", "tvm", "trt"], "cpu", [1, 8], [128], 5, out / "report")
    summary["cpu_speedup_int8_vs_fp32"] = rep.get("cpu_speedup_int8_vs_fp32")
    timings["report_s"] = time.perf_counter() - t

    summary["timings"] = timings
    atomic_write_json(out / "summary.json", summary)
    console.print(f"wrote {out / 'summary.json'}")
    return summary

"""``qexport report`` end to end on a tiny random BERT (2 layers x 64 hidden) on CPU.

The report must write report.json / report.md / three PNGs with one row per
(runtime, precision) the backends and the device allow; rows that cannot run here are
``skipped`` with their reason, rows that raise are ``failed`` (or ``oom``), and nothing
measured before is lost. ORT INT8 runs the real qexport exporter's integer ONNX.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from qexport.backends.trt import TRTBackend
from qexport.errors import BackendError, ConfigError
from qexport.quant import calibrate, quantize_model, save_checkpoint
from qexport.report.latency import parse_int_list, run_report
from qexport.report.size import checkpoint_size

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# (find_spec is not enough: the tensorrt-stubs wheel installs a ``tensorrt`` package directory)
HAS_TRT = TRTBackend.available()[0]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(cfg)
    quantize_model(model, "full")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (8, 16), generator=g)
    calibrate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    model.eval()
    return save_checkpoint(model, tmp_path_factory.mktemp("report") / "tiny")


def _rows(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["key"]: r for r in doc["rows"]}


def test_tiny_cpu_report(tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    res = run_report(tiny_checkpoint, None, ["torch", "ort", "trt"], "cpu", [1], [16], 2, out, progress=False)

    for name in ("report.json", "report.md", "latency.png", "speedup.png", "size.png"):
        assert (out / name).is_file(), name
    for name in ("latency.png", "speedup.png", "size.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    doc = json.loads((out / "report.json").read_text())
    rows = _rows(doc)
    assert list(rows) == [
        "torch-eager-fp32",
        "torch-eager-fp16",
        "ort-fp32",
        "ort-fp16",
        "ort-dynamic-int8",
        "ort-int8",
        "trt-fp32",
        "trt-fp16",
        "trt-int8",
    ]

    for key in ("torch-eager-fp32", "ort-fp32", "ort-dynamic-int8", "ort-int8"):
        r = rows[key]
        assert r["status"] == "ok", (key, r["reason"])
        (p,) = r["points"]
        assert (p["batch"], p["seq"], p["iters"], p["status"]) == (1, 16, 2, "ok")
        assert 0 < p["p10_ms"] <= p["median_ms"] <= p["p90_ms"]
        assert p["peak_mem_bytes"] is None or p["peak_mem_bytes"] >= 0
    for key in ("torch-eager-fp16", "ort-fp16"):
        assert rows[key]["status"] == "skipped" and "CUDA only" in rows[key]["reason"]
    for key in ("trt-fp32", "trt-fp16", "trt-int8"):
        assert rows[key]["status"] == "skipped"
        want = "runs on CUDA only" if HAS_TRT else "TensorRT is not installed"
        assert want in rows[key]["reason"], rows[key]["reason"]

    # ORT INT8 ran the saved ORT-CPU form it stores (made by the ORT backend), and its size is the file's
    int8 = rows["ort-int8"]
    art = Path(int8["artifact"])
    assert art.is_file() and art.suffix == ".onnx" and int8["artifact_bytes"] == art.stat().st_size
    import onnx

    proto = onnx.load(str(art))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["qexport_form"] == "ort-cpu" and meta["qexport_ort_u8s8"] in ("portable", "vnni")
    ops = {n.op_type for n in proto.graph.node}
    assert "MatMulInteger" in ops and "MatMul" not in ops and not proto.functions
    # the CPU user's INT8 route: quantize_dynamic of the fused float graph
    dyn = onnx.load(rows["ort-dynamic-int8"]["artifact"])
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= {n.op_type for n in dyn.graph.node}

    size = checkpoint_size(tiny_checkpoint)
    assert doc["size"]["checkpoint"]["bytes"] == size["bytes"]
    assert res["size_ratio"] == pytest.approx(size["ratio_vs_fp32"])
    assert any(a["path"] == str(art) and a["bytes"] == art.stat().st_size for a in doc["size"]["artifacts"])

    # the CPU headline: the fastest qexport INT8 row vs the fastest FP32 row, at the largest batch and
    # the seq closest to 128 (this report has one qexport INT8 row, ORT's; FP32: ORT and PyTorch)
    i8 = int8["points"][0]
    f32 = min((rows[k]["points"][0] for k in ("ort-fp32", "torch-eager-fp32")), key=lambda p: p["median_ms"])
    assert res["cpu_speedup_int8_vs_fp32"] == pytest.approx(f32["median_ms"] / i8["median_ms"])
    assert doc["headline"]["int8_row"] == rows["ort-int8"]["label"]
    assert doc["headline"]["batch"] == 1 and doc["headline"]["seq"] == 16
    pairs = {(e["int8"], e["baseline"]): e for e in doc["speedups"]}
    assert set(pairs) == {("ort-int8", "ort-fp32"), ("ort-int8", "torch-eager-fp32"),
                          ("ort-int8", "ort-dynamic-int8"), ("ort-dynamic-int8", "ort-fp32"),
                          ("ort-dynamic-int8", "torch-eager-fp32")}
    d = rows["ort-dynamic-int8"]["points"][0]
    assert doc["headline"]["cpu_speedup_int8_vs_dynamic"] == pytest.approx(d["median_ms"] / i8["median_ms"])
    best_f32 = "ort-fp32" if rows["ort-fp32"]["points"][0] is f32 else "torch-eager-fp32"
    assert pairs[("ort-int8", best_f32)]["avg"] == pytest.approx(res["cpu_speedup_int8_vs_fp32"])

    md = (out / "report.md").read_text()
    assert md == res["markdown"]
    assert "I-BERT Table 3" in md and "| ORT INT8 vs ORT FP32 |" in md and "BS=1 SL=16" in md
    assert ("runs on CUDA only" if HAS_TRT else "TensorRT is not installed") in md


def test_unknown_backend_is_a_backend_error(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="unknown backend 'onnx'.*torch, ort, tvm, trt"):
        run_report(tiny_checkpoint, None, ["torch", "onnx"], "cpu", [1], [16], 2, tmp_path, progress=False)
    assert not (tmp_path / "report.json").exists()


def test_failing_backend_becomes_failed_row(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qexport.report import baselines

    def broken_export(model: Any, out: Path, **kw: Any) -> Path:
        raise RuntimeError("simulated float export failure")

    calls = {"n": 0}
    real_run = baselines.TorchRunner.run

    def oom_at_batch_2(self: Any, feeds: Any) -> Any:
        calls["n"] += 1
        if feeds["input_ids"].shape[0] == 2:
            raise MemoryError("simulated host OOM")
        return real_run(self, feeds)

    monkeypatch.setattr(baselines, "export_float_onnx", broken_export)
    monkeypatch.setattr(baselines.TorchRunner, "run", oom_at_batch_2)
    out = tmp_path / "rep"
    res = run_report(
        tiny_checkpoint, None, ["torch", "ort"], "cpu", [1, 2], [8], 1, out, warmup=0, progress=False
    )
    rows = _rows(json.loads((out / "report.json").read_text()))
    assert rows["ort-fp32"]["status"] == "failed"
    assert rows["ort-fp32"]["reason"] == "RuntimeError: simulated float export failure"
    torch_pts = {p["batch"]: p for p in rows["torch-eager-fp32"]["points"]}
    assert rows["torch-eager-fp32"]["status"] == "ok" and torch_pts[1]["status"] == "ok"
    assert torch_pts[2]["status"] == "oom" and "simulated host OOM" in torch_pts[2]["reason"]
    assert rows["ort-int8"]["status"] == "ok"  # a failed row does not stop the next ones
    assert res["cpu_speedup_int8_vs_fp32"] is None  # no FP32 row ran at the headline batch (2)
    assert "simulated float export failure" in res["markdown"]


def test_nothing_runs_raises_after_writing_the_report(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from qexport.report import baselines

    def broken(self: Any, feeds: Any) -> Any:
        raise ValueError("simulated kernel failure")

    monkeypatch.setattr(baselines.TorchRunner, "run", broken)
    with pytest.raises(BackendError, match="nothing could run.*simulated kernel failure"):
        run_report(tiny_checkpoint, None, ["torch"], "cpu", [1], [8], 1, tmp_path, warmup=0, progress=False)
    rows = _rows(json.loads((tmp_path / "report.json").read_text()))
    assert rows["torch-eager-fp32"]["status"] == "failed"
    assert rows["torch-eager-fp32"]["reason"] == "ValueError: simulated kernel failure"
    assert rows["torch-eager-fp16"]["status"] == "skipped"


def test_bad_grid_and_inputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="exceeds the model's 64 positions"):
        run_report(tiny_checkpoint, None, ["torch"], "cpu", [1], [128], 1, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="CHECKPOINT or --model"):
        run_report(None, None, ["torch"], "cpu", [1], [8], 1, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown device"):
        run_report(tiny_checkpoint, None, ["torch"], "tpu", [1], [8], 1, tmp_path, progress=False)


def test_parse_int_list() -> None:
    assert parse_int_list("1,8,32") == [1, 8, 32]
    assert parse_int_list(" 8, 1 ,8") == [1, 8]
    for bad in ("", "1,,8", "a", "1,x", "0", "-4", "1.5"):
        with pytest.raises(ConfigError):
            parse_int_list(bad, "--batch")


def test_point_budget_stops_slow_points_early() -> None:
    import time

    from qexport.report.timing import MIN_TIMED, time_runs

    class Slow:
        calls = 0

        def run(self, feeds: Any) -> None:
            Slow.calls += 1
            time.sleep(0.05)

        def synchronize(self) -> None:
            pass

    samples = time_runs(Slow(), {}, iters=50, warmup=10, budget_s=0.1)
    assert len(samples) == MIN_TIMED and all(s >= 0.05 for s in samples)
    assert Slow.calls == 1 + MIN_TIMED  # warm-up stopped after its first run (> budget / 4)
    assert len(time_runs(Slow(), {}, iters=4, warmup=0)) == 4  # no budget: exactly iters


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_skips_every_row(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="nothing could run.*CUDA is not available"):
        run_report(
            tiny_checkpoint,
            None,
            ["torch", "ort", "tvm", "trt"],
            "cuda",
            [1],
            [8],
            1,
            tmp_path,
            progress=False,
        )
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert len(rows) == 11 and all(r["status"] == "skipped" and r["reason"] for r in rows)

"""ORT on this CPU: qexport's integer model vs the same model in FP32 (issue 5), with a profile.

    python bench/cpu_latency.py CHECKPOINT [--batch 1 8] [--seq 128] [--iters 10]

Exports CHECKPOINT (an integer checkpoint; the FP32 baseline is the same architecture built
from its config.json with random weights, which costs the same) to integer ONNX (QDQ and
MatMulInteger forms) and the FP32 model with
torch.onnx.export, times each with ONNX Runtime (median of N runs) and prints a table with the
INT8/FP32 ratio, then an ORT per-op-type profile of the integer model: where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch


def fp32_onnx(checkpoint: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(str(checkpoint))
    cfg._attn_implementation = "eager"
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    ids = torch.randint(1000, 2000, (2, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (ids, torch.ones_like(ids)), str(out),
                          input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, dynamo=False,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")})
    return out


def session(path: Path, profile: bool = False) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.disable_quant_qdq", "1")  # as qexport's ORT backend (exact)
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = str(path.with_suffix(""))
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def median_ms(sess: ort.InferenceSession, feeds: dict[str, np.ndarray], iters: int) -> float:
    for _ in range(2):
        sess.run(None, feeds)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts) * 1000)


def main() -> None:
    from qexport.export.exporter import export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qexport-bench-"))
    models = {
        "ORT FP32": fp32_onnx(args.checkpoint, work / "fp32.onnx"),
        "ORT INT8 (qdq)": export_onnx(args.checkpoint, work / "qdq.onnx", form="flat", linear="qdq"),
        "ORT INT8 (MatMulInteger)": export_onnx(args.checkpoint, work / "int.onnx", form="flat",
                                                linear="integer"),
    }
    sessions = {k: session(p) for k, p in models.items()}
    print(f"{'batch':>5} {'seq':>4} " + " ".join(f"{k:>26}" for k in models) + "   best INT8 / FP32")
    rng = np.random.default_rng(0)
    for b in args.batch:
        for s in args.seq:
            feeds = {"input_ids": rng.integers(1000, 20000, (b, s)).astype(np.int64),
                     "attention_mask": np.ones((b, s), np.int64)}
            ms = {k: median_ms(sess, feeds, args.iters) for k, sess in sessions.items()}
            best = min(v for k, v in ms.items() if "INT8" in k)
            print(f"{b:>5} {s:>4} " + " ".join(f"{v:>23.1f} ms" for v in ms.values())
                  + f"   speedup {ms['ORT FP32'] / best:.2f}x")
    # where the integer model's time goes
    feeds = {"input_ids": rng.integers(1000, 20000, (max(args.batch), max(args.seq))).astype(np.int64),
             "attention_mask": np.ones((max(args.batch), max(args.seq)), np.int64)}
    prof = session(models["ORT INT8 (qdq)"], profile=True)
    for _ in range(3):
        prof.run(None, feeds)
    events = json.loads(Path(prof.end_profiling()).read_text())
    by: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]
    total = sum(by.values())
    print("\nORT profile of the integer model (qdq form), share of kernel time:")
    for op, us in by.most_common(12):
        print(f"  {op:<20}{100 * us / total:6.1f}%  {us / 3 / 1000:8.1f} ms/run")


if __name__ == "__main__":
    main()

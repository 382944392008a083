"""ORT on this CPU: qexport's integer model vs the same model in FP32 (issue 5), with a profile.

    python bench/cpu_latency.py CHECKPOINT [--batch 1 8] [--seq 128] [--threads 1 2] [--iters 10]
                                [--linear integer] [--no-spec] [--profile]

Exports CHECKPOINT (an integer checkpoint; the FP32 baseline is the same architecture built from
its config.json with random weights, which costs the same) to integer ONNX (functions form,
``--linear`` integer or qdq) and the FP32 model with torch.onnx.export, then times with ONNX
Runtime, for each thread count:

* ``FP32``: the float model (ORT's fused attention / LayerNorm / GELU kernels);
* ``INT8 spec``: the integer file run as exported (``qexport ort`` before the load-time rewrites);
* ``INT8``: the same file through qexport's ORT backend, i.e. with the rewrites of
  :mod:`qexport.backends.ort_rewrite` (what ``qexport ort`` / ``verify`` / ``report`` run).

The variants run interleaved (one run of each, in turn, ``iters`` times) so that a process sharing
the cores slows them alike; the table shows medians and the ratios FP32 / INT8 (the speedup of the
integer model) and spec / INT8 (the speedup of the rewrites). ``--profile``: ORT's per-op-type
profile of the rewritten INT8 model (largest batch).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
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


def fp32_session(path: Path, threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def int8_session(path: Path, threads: int, rewrite: bool) -> ort.InferenceSession:
    """The integer model as qexport's ORT backend loads it (``rewrite=False``: the spec file)."""
    from qexport.backends.ort import ORTBackend

    return ORTBackend()._session(path, "cpu", threads=threads, rewrite=rewrite)


def interleaved_ms(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray],
                   iters: int) -> dict[str, float]:
    """Median ms of each session, the sessions taking turns run by run."""
    for s in sessions.values():
        for _ in range(2):
            s.run(None, feeds)
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(iters):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds)
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v) * 1000) for k, v in times.items()}


def feeds_for(b: int, s: int, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"input_ids": rng.integers(min(1000, vocab - 1), vocab, (b, s)).astype(np.int64),
            "attention_mask": np.ones((b, s), np.int64)}


def main() -> None:
    from qexport.export.exporter import export_onnx

    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--linear", choices=("integer", "qdq"), default="integer")
    ap.add_argument("--no-spec", action="store_true", help="skip the spec (unrewritten) INT8 row: it is slow")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qexport-bench-"))
    fp32 = fp32_onnx(args.checkpoint, work / "fp32.onnx")
    int8 = export_onnx(args.checkpoint, work / "int8.onnx", form="functions", linear=args.linear)
    vocab = int(json.loads((args.checkpoint / "config.json").read_text())["vocab_size"])
    rng = np.random.default_rng(0)
    cols = ["FP32", *([] if args.no_spec else ["INT8 spec"]), "INT8"]
    print(f"model {args.checkpoint} ({args.linear} linears, functions form); CPU: {os.cpu_count()} cores, "
          f"onnxruntime {ort.__version__}; medians of {args.iters} interleaved runs")
    print(f"{'threads':>7} {'batch':>5} {'seq':>4} " + " ".join(f"{c + ' ms':>13}" for c in cols)
          + f" {'FP32/INT8':>10}" + ("" if args.no_spec else f" {'spec/INT8':>10}"))
    for threads in args.threads:
        sessions = {"FP32": fp32_session(fp32, threads), "INT8": int8_session(int8, threads, True)}
        if not args.no_spec:
            sessions["INT8 spec"] = int8_session(int8, threads, False)
        sessions = {k: sessions[k] for k in cols}
        for b in args.batch:
            for s in args.seq:
                ms = interleaved_ms(sessions, feeds_for(b, s, vocab, rng), args.iters)
                line = f"{threads:>7} {b:>5} {s:>4} " + " ".join(f"{ms[c]:>13.1f}" for c in cols)
                line += f" {ms['FP32'] / ms['INT8']:>9.2f}x"
                if not args.no_spec:
                    line += f" {ms['INT8 spec'] / ms['INT8']:>9.2f}x"
                print(line, flush=True)
        del sessions
    if args.profile:
        profile(int8, feeds_for(max(args.batch), max(args.seq), vocab, rng), min(args.threads))


def profile(model: Path, feeds: dict[str, np.ndarray], threads: int) -> None:
    """Where the rewritten integer model's time goes: ORT's per-op-type kernel time."""
    import onnx

    from qexport.backends.ort_rewrite import rewrite_for_ort

    new, _ = rewrite_for_ort(onnx.load(str(model)))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.enable_profiling = True
    so.profile_file_prefix = str(model.with_suffix(""))
    prof = ort.InferenceSession(new.SerializeToString(), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        prof.run(None, feeds)
    events = json.loads(Path(prof.end_profiling()).read_text())
    by: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by[e["args"]["op_name"]] += e["dur"]
    total = sum(by.values())
    b, s = feeds["input_ids"].shape
    print(f"\nORT profile of the rewritten integer model (batch {b}, seq {s}), share of kernel time:")
    for op, us in by.most_common(12):
        print(f"  {op:<20}{100 * us / total:6.1f}%  {us / 3 / 1000:8.1f} ms/run")


if __name__ == "__main__":
    main()

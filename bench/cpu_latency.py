"""What a CPU user compares: qexport's integer model against ONNX Runtime FP32 and ``quantize_dynamic``.

    python bench/cpu_latency.py [--models minilm random:roberta-base | CHECKPOINT ...]
                                [--batch 1 8] [--seq 128] [--threads 1 2] [--iters 20]
                                [--rows ort-fp32 ort-dynamic ort-int8 tvm-int8 tvm-fp32]
                                [--u8s8 auto|portable|vnni] [--work DIR] [--json FILE] [--profile]

Per model (a model spec is PTQ-quantized first, preset ``full``; a directory is an integer
checkpoint; the float rows use the same architecture with random weights, which costs the same),
the rows:

* ``ORT FP32``: the float ONNX after ONNX Runtime's transformer optimizer (Attention,
  SkipLayerNorm, BiasGelu fusions), ORT_ENABLE_ALL;
* ``ORT dynamic INT8``: ``onnxruntime.quantization.quantize_dynamic`` of that fused graph
  (per-channel QInt8 weights: what Optimum's CPU quantization does);
* ``qexport ORT INT8``: the saved ORT-CPU form (``qexport onnx --form ort-cpu``), loaded as saved;
  ``--u8s8 auto`` picks ``vnni`` where this CPU's u8 x s8 kernel is exact, else ``portable``;
* ``qexport TVM INT8``: the flat integer ONNX through ``get_backend("tvm").compile(target="llvm")``,
  one library per (batch, seq);
* ``TVM FP32``: the float model (simple-mask graph) through the same TVM backend.

Artifacts are built once in ``--work`` (reused on the next run). Each thread count runs in its own
subprocess (TVM reads ``TVM_NUM_THREADS`` when it is first imported; ORT takes
``intra_op_num_threads``), where the rows take turns (each turn: a 250 ms pause, in which the
previous runtime's spinning thread pool goes to sleep, one untimed run, then three timed runs;
``--iters`` timed runs per row after a warm-up), so that a process sharing the cores slows them
alike and the ratios come from one run, and each row is timed as if it ran alone. The table
shows medians (ms) and the ratios best FP32 / qexport and ORT dynamic / qexport (> 1: qexport is
faster); ``--json`` writes every median. ``--profile``: ORT's per-op-type profile of the saved
ORT-CPU form (largest batch and seq, fewest threads).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROWS = {
    "ort-fp32": "ORT FP32",
    "ort-dynamic": "ORT dynamic INT8",
    "ort-int8": "qexport ORT INT8",
    "tvm-int8": "qexport TVM INT8",
    "tvm-fp32": "TVM FP32",
}
FP32_ROWS = ("ort-fp32", "tvm-fp32")


# ----------------------------------------------------------------------------- artifacts (parent)


def checkpoint_for(model: str, work: Path) -> Path:
    """An integer checkpoint: the directory given, or ``model`` PTQ-quantized (cached in ``work``)."""
    if Path(model).is_dir():
        return Path(model)
    from qexport.ptq import post_training_quantize

    out = work / model.replace(":", "_").replace("/", "_") / "checkpoint"
    if not (out / "manifest.json").is_file():
        post_training_quantize(model, preset="full", out_dir=out, calib_batches=2, batch_size=8,
                               max_length=128)
    return out


def build(ckpt: Path, rows: list[str], shapes: list[tuple[int, int]], u8s8: str, work: Path,
          ) -> dict[str, Any]:
    """Every row's artifact under ``work`` (built only when missing): {row: path | {"b,s": path}}."""
    from transformers import AutoConfig

    from qexport.backends import get_backend
    from qexport.backends.ort import export_ort_cpu
    from qexport.export.exporter import export_onnx
    from qexport.report.baselines import dynamic_int8_onnx, export_float_onnx, float_model, ort_optimize

    work.mkdir(parents=True, exist_ok=True)
    cfg = AutoConfig.from_pretrained(str(ckpt))
    arts: dict[str, Any] = {}

    def once(path: Path, make: Any) -> Path:
        if not path.exists():
            t = time.perf_counter()
            make()
            print(f"  built {path.name} in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        return path

    fp32 = work / "float32.onnx"
    if {"ort-fp32", "ort-dynamic"} & set(rows):
        once(fp32, lambda: export_float_onnx(float_model(ckpt, attn="eager"), fp32))
        heads, hidden = int(cfg.num_attention_heads), int(cfg.hidden_size)
        fused = once(work / "float32.ort.onnx",
                     lambda: ort_optimize(fp32, work / "float32.ort.onnx", heads, hidden, False, False))
        arts["ort-fp32"] = fused
        arts["ort-dynamic"] = once(work / "int8.dynamic.onnx",
                                   lambda: dynamic_int8_onnx(fused, work / "int8.dynamic.onnx"))
    if "ort-int8" in rows:
        p = work / f"int8.ort-cpu.{u8s8}.onnx"
        arts["ort-int8"] = once(p, lambda: export_ort_cpu(ckpt, p, u8s8=u8s8))
    tvm = get_backend("tvm") if {"tvm-int8", "tvm-fp32"} & set(rows) else None
    for row in ("tvm-int8", "tvm-fp32"):
        if row not in rows or tvm is None:
            continue
        if row == "tvm-int8":
            src = once(work / "int8.flat.onnx",
                       lambda: export_onnx(ckpt, work / "int8.flat.onnx", form="flat", linear="integer"))
        else:
            src = once(work / "float32.simple-mask.onnx", lambda: export_float_onnx(
                float_model(ckpt, attn="eager"), work / "float32.simple-mask.onnx", simple_mask=True))
        libs = {}
        for b, s in shapes:
            out = work / f"{row}-b{b}-s{s}"
            libs[f"{b},{s}"] = once(out, lambda o=out, b=b, s=s, src=src: tvm.compile(
                src, o, target="llvm", shapes={"batch": b, "seq": s}))
        arts[row] = libs
    return arts


# ----------------------------------------------------------------------------- timing (worker)


def interleaved_ms(runners: dict[str, Any], feeds: dict[str, np.ndarray], iters: int, warmup: int,
                   ) -> dict[str, float]:
    """Median ms per runner after ``warmup`` runs each, the runners taking turns in blocks
    (:func:`qexport.report.timing.interleaved_ms`)."""
    from qexport.report.timing import interleaved_ms as turns

    for r in runners.values():
        for _ in range(warmup):
            r.run(feeds)
    return turns({k: (lambda r=r: r.run(feeds)) for k, r in runners.items()}, iters)


def feeds_for(b: int, s: int, vocab: int) -> dict[str, np.ndarray]:
    from qexport.report.timing import random_feeds

    return random_feeds(b, s, vocab)


def worker(spec_path: Path) -> None:
    """One thread count: load every row, time every shape interleaved, print JSON on stdout."""
    spec = json.loads(spec_path.read_text())
    threads, iters, warmup = int(spec["threads"]), int(spec["iters"]), int(spec["warmup"])
    # no torch here: its OpenMP pool (torch.set_num_threads) made the 2-thread TVM rows of small
    # inputs vary from 6.6 to 10.5 ms; no row runs torch
    from qexport.backends import get_backend
    from qexport.report.baselines import OrtRunner

    arts = spec["artifacts"]
    fixed: dict[str, Any] = {}
    for row in ("ort-fp32", "ort-dynamic"):
        if row in arts:
            fixed[row] = OrtRunner(Path(arts[row]), "cpu", threads)
    if "ort-int8" in arts:
        fixed["ort-int8"] = get_backend("ort").load(Path(arts["ort-int8"]), "cpu", threads=threads)
    results = []
    for b, s in spec["shapes"]:
        runners = dict(fixed)
        for row in ("tvm-int8", "tvm-fp32"):
            if row in arts:
                runners[row] = get_backend("tvm").load(Path(arts[row][f"{b},{s}"]), "cpu")
        order = [r for r in ROWS if r in runners]
        ms = interleaved_ms({r: runners[r] for r in order}, feeds_for(b, s, spec["vocab"]), iters, warmup)
        results.append({"batch": b, "seq": s, "threads": threads, "ms": ms})
        print(f"  threads {threads} batch {b} seq {s}: "
              + ", ".join(f"{ROWS[k]} {v:.1f}" for k, v in ms.items()), file=sys.stderr, flush=True)
    print(json.dumps(results))


# ----------------------------------------------------------------------------- table


def ratios(ms: dict[str, float]) -> dict[str, float]:
    """best FP32 / qexport and ORT dynamic / qexport, for each qexport row that ran."""
    fp = [ms[k] for k in FP32_ROWS if k in ms]
    out = {}
    for q in ("ort-int8", "tvm-int8"):
        if q not in ms:
            continue
        if fp:
            out[f"best FP32 / {ROWS[q]}"] = min(fp) / ms[q]
        if "ort-dynamic" in ms:
            out[f"ORT dynamic / {ROWS[q]}"] = ms["ort-dynamic"] / ms[q]
    return out


def markdown(results: list[dict[str, Any]], rows: list[str]) -> str:
    rcols = sorted({k for r in results for k in r["ratios"]},
                   key=lambda c: (c.split(" / ")[1], not c.startswith("best")))
    head = ["model", "threads", "batch", "seq", *(f"{ROWS[r]} ms" for r in rows), *rcols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        cells = [r["model"], str(r["threads"]), str(r["batch"]), str(r["seq"])]
        cells += [f"{r['ms'][k]:.1f}" if k in r["ms"] else "-" for k in rows]
        cells += [f"{r['ratios'][c]:.2f}x" if c in r["ratios"] else "-" for c in rcols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def profile(model: Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 5, top: int = 12,
            ) -> dict[str, list[tuple[str, float, float]]]:
    """ORT's profiler on the saved ORT-CPU form: ``(name, share of kernel time %, ms per run)`` by op
    type (``ops``) and by the rewrite that emitted the node (``groups``: the node-name prefix,
    e.g. ``Requant``, ``ISoftmax``, ``lut``; ``graph`` for nodes kept from the spec form)."""
    from qexport.backends.ort import make_session

    with tempfile.TemporaryDirectory() as tmp:
        sess = make_session(model, threads, profile_prefix=str(Path(tmp) / "ort"))
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    ops: collections.Counter[str] = collections.Counter()
    groups: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            ops[e["args"]["op_name"]] += e["dur"]
            groups[node.split("/")[0] if "/" in node else "graph"] += e["dur"]
    total = sum(ops.values()) or 1
    return {name: [(k, 100 * us / total, us / runs / 1000) for k, us in c.most_common(top)]
            for name, c in (("ops", ops), ("groups", groups))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "random:roberta-base"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, nargs="+", default=[128])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    ap.add_argument("--u8s8", choices=("auto", "portable", "vnni"), default="auto")
    ap.add_argument("--work", type=Path, default=Path("artifacts/bench-cpu"))
    ap.add_argument("--json", type=Path, default=None, help="default: WORK/cpu_latency.json")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker)
        return

    from qexport.backends.ort_rewrite import exact_int8_gemms
    from qexport.io import atomic_write_json
    from qexport.report.system import hardware

    u8s8 = args.u8s8 if args.u8s8 != "auto" else "vnni" if "u8s8" in exact_int8_gemms() else "portable"
    rows = [r for r in ROWS if r in args.rows]
    shapes = [(b, s) for b in args.batch for s in args.seq]
    results: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    for model in args.models:
        work = args.work / model.replace(":", "_").replace("/", "_")
        print(f"{model}: building artifacts in {work}", file=sys.stderr, flush=True)
        ckpt = checkpoint_for(model, args.work)
        arts = build(ckpt, rows, shapes, u8s8, work)
        vocab = int(json.loads((ckpt / "config.json").read_text())["vocab_size"])
        for threads in args.threads:
            spec = {"threads": threads, "iters": args.iters, "warmup": args.warmup, "shapes": shapes,
                    "vocab": vocab, "artifacts": json.loads(json.dumps(arts, default=str))}
            spec_path = work / f"worker-{threads}.json"
            spec_path.write_text(json.dumps(spec))
            env = {**os.environ, "TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
            proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env,
                                  stdout=subprocess.PIPE, text=True, check=True)
            for r in json.loads(proc.stdout.strip().splitlines()[-1]):
                results.append({"model": model, **r, "ratios": ratios(r["ms"])})
        if args.profile and "ort-int8" in arts:
            b, s = max(args.batch), max(args.seq)
            t = min(args.threads)
            profiles[model] = {"batch": b, "seq": s, "threads": t,
                               **profile(Path(arts["ort-int8"]), feeds_for(b, s, vocab), t)}

    import onnxruntime

    print(f"\nCPU: {os.cpu_count()} cores; onnxruntime {onnxruntime.__version__}; qexport ORT INT8: "
          f"--u8s8 {u8s8}; medians of {args.iters} interleaved runs (ms); ratios > 1: qexport faster\n")
    print(markdown(results, rows))
    for model, p in profiles.items():
        print(f"\nORT profile of {model}'s saved ORT-CPU form (batch {p['batch']}, seq {p['seq']}, "
              f"{p['threads']} thread(s)), share of kernel time by op type and by rewrite:")
        for (op, share, ms), grp in zip(p["ops"], p["groups"] + [None] * len(p["ops"]), strict=False):
            line = f"  {op:<20}{share:6.1f}% {ms:8.2f} ms/run"
            if grp is not None:
                line += f"    {grp[0]:<14}{grp[1]:6.1f}% {grp[2]:8.2f} ms/run"
            print(line)
    out = args.json or args.work / "cpu_latency.json"
    atomic_write_json(out, {"settings": {**vars(args), "u8s8": u8s8, "work": str(args.work),
                                         "json": str(out), "worker": None},
                            "hardware": hardware(), "results": results, "profiles": profiles})
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

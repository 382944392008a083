"""TVM llvm builds on this CPU: scheduled (qexport's rules) vs unscheduled (TVM's stock pipeline) vs ORT.

    python bench/tvm_cpu.py [--checkpoint DIR] [--roberta] [--batch 1 8] [--seq 128]
                            [--threads 1 2] [--iters 10] [--linear integer] [--profile]

Builds an integer checkpoint (default: PTQ of the offline MiniLM, calibrated on rt; ``--roberta``
adds ``random:roberta-base``), exports it to integer ONNX and compiles it twice with
``qexport tvm`` (dynamic shapes): the default scheduled build (``tvm_cpu`` rules) and the old
unscheduled one (``schedule=False``), timing each build. Then, for each thread count, a
subprocess (``TVM_NUM_THREADS`` must be set before TVM starts its pool) times the two TVM
libraries and qexport's ORT backend on random token ids, interleaved (one run of each in turn,
``iters`` times), and prints medians and the ratios unscheduled / scheduled and ORT / scheduled.
``--profile``: the scheduled library's ten slowest functions (a Relax VM instrument times each
call), largest batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _feeds(batch: int, seq: int, vocab: int = 1000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 1000 + seq)
    ids = rng.integers(1000, 1000 + vocab, (batch, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def worker(args: argparse.Namespace) -> None:
    """One thread count: median ms per (variant, batch); JSON on stdout."""
    from qexport.backends import get_backend

    runners: dict[str, Any] = {
        "scheduled": get_backend("tvm").load(Path(args.scheduled), "cpu"),
        "unscheduled": get_backend("tvm").load(Path(args.unscheduled), "cpu"),
        "ort": get_backend("ort").load(Path(args.onnx), "cpu", threads=args.threads),
    }
    res: dict[str, dict[str, float]] = {}
    for batch in args.batch:
        feeds = _feeds(batch, args.seq)
        for r in runners.values():
            r.run(feeds)
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(args.iters):
            for k, r in runners.items():
                t = time.perf_counter()
                r.run(feeds)
                times[k].append(time.perf_counter() - t)
        res[str(batch)] = {k: float(np.median(v) * 1000) for k, v in times.items()}
    print("RESULT " + json.dumps(res))


def profile(lib_dir: Path, batch: int, seq: int, top: int = 10) -> str:
    """The ``top`` slowest functions of one run (timed by a Relax VM instrument), as markdown."""
    import tvm
    from tvm import relax

    meta = json.loads((lib_dir / "tvm.json").read_text())
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(lib_dir / "lib.so")), tvm.cpu(0))
    feeds = _feeds(batch, seq)
    args = [tvm.runtime.tensor(feeds[i["name"]].astype(i["dtype"])) for i in meta["inputs"]]
    vm["main"](*args)
    per: dict[str, list[float]] = {}
    started: list[float] = []

    def instrument(_func: Any, name: str, before: bool, _ret: Any, *_args: Any) -> int:
        if before:
            started.append(time.perf_counter())
        else:
            per.setdefault(str(name), []).append(time.perf_counter() - started.pop())
        return 0  # VMInstrumentReturnKind.NO_OP

    vm.set_instrument(instrument)
    vm["main"](*args)
    total = sum(sum(v) for v in per.values())
    ranked = sorted(per.items(), key=lambda kv: -sum(kv[1]))[:top]
    out = ["| function | calls | ms | share |", "|---|---:|---:|---:|"]
    for name, secs in ranked:
        out.append(f"| {name[:70]} | {len(secs)} | {sum(secs) * 1000:.2f} | {sum(secs) / total:.0%} |")
    return "\n".join(out)


def build(checkpoint: Path, work: Path, linear: str) -> dict[str, Any]:
    from qexport.backends import get_backend
    from qexport.export.exporter import export_onnx

    onnx_path = export_onnx(checkpoint, work / "model.onnx", linear=linear)
    tvm = get_backend("tvm")
    out: dict[str, Any] = {"onnx": str(onnx_path)}
    for name, opts in (("scheduled", {}), ("unscheduled", {"schedule": False})):
        t = time.perf_counter()
        tvm.compile(onnx_path, work / name, target="llvm", **opts)
        out[name] = str(work / name)
        out[f"{name}_build_s"] = time.perf_counter() - t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, help="integer checkpoint (default: PTQ MiniLM on rt)")
    ap.add_argument("--roberta", action="store_true", help="also random:roberta-base")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--linear", default="integer", choices=["integer", "qdq"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--scheduled", help=argparse.SUPPRESS)
    ap.add_argument("--unscheduled", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return

    from qexport.ptq import post_training_quantize

    with tempfile.TemporaryDirectory(prefix="bench-tvm-") as tmp:
        work = Path(tmp)
        models: list[tuple[str, Path]] = []
        if args.checkpoint:
            models.append((args.checkpoint.name, args.checkpoint))
        else:
            ck = post_training_quantize("minilm", data="rt", calib_batches=2, max_length=64,
                                        out_dir=work / "minilm")
            models.append(("MiniLM", ck))
        if args.roberta:
            ck = post_training_quantize("random:roberta-base", calib_batches=1, max_length=64,
                                        out_dir=work / "roberta")
            models.append(("random:roberta-base", ck))
        for label, ck in models:
            (work / label).mkdir(exist_ok=True)
            built = build(ck, work / label.replace(":", "_"), args.linear)
            print(f"\n## {label} ({args.linear} linears), seq {args.seq}\n")
            print(f"build: scheduled {built['scheduled_build_s']:.1f} s, "
                  f"unscheduled {built['unscheduled_build_s']:.1f} s\n")
            print("| threads | batch | scheduled ms | unscheduled ms | ORT ms | unsched/sched | ORT/sched |")
            print("|---:|---:|---:|---:|---:|---:|---:|")
            for threads in args.threads:
                env = dict(os.environ, TVM_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
                cmd = [sys.executable, __file__, "--worker", "--threads", str(threads),
                       "--seq", str(args.seq),
                       "--iters", str(args.iters), "--scheduled", built["scheduled"],
                       "--unscheduled", built["unscheduled"], "--onnx", built["onnx"],
                       "--batch", *map(str, args.batch)]
                res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
                line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
                if res.returncode != 0 or not line:
                    print(f"| {threads} | worker failed: {res.stderr.strip().splitlines()[-1:]} |")
                    continue
                for batch, ms in json.loads(line[0][7:]).items():
                    s, u, o = ms["scheduled"], ms["unscheduled"], ms["ort"]
                    print(f"| {threads} | {batch} | {s:.1f} | {u:.1f} | {o:.1f} "
                          f"| {u / s:.1f}x | {o / s:.2f}x |")
            if args.profile:
                print(f"\nscheduled build, batch {max(args.batch)}, top 10 PrimFuncs:\n")
                print(profile(Path(built["scheduled"]), max(args.batch), args.seq))


if __name__ == "__main__":
    main()

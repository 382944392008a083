"""TVM CUDA build matrix: every exported model form, built for sm_75 and sm_90 with nvcc (no GPU).

    python bench/tvm_cuda_matrix.py [--rows quick|minilm|all] [-o artifacts/cuda-matrix] [--only SUBSTR]

Each row is one ``qexport tvm MODEL.onnx --target t4|h100 [--shapes batch=8,seq=128]`` run as
the CLI runs it (a subprocess, ``nice -n 10``, one at a time); checkpoints and ONNX files are made
once and reused. Rows already in ``results.jsonl`` are skipped (resumable); ``matrix.md`` is
rewritten after every row: status (built / the ``error:`` line), seconds, the rules that
scheduled the PrimFuncs, int8 GEMMs on tensor cores, qdq GEMMs rewritten to int8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRESETS = ("linear", "linear+gelu+softmax", "linear+gelu+layernorm", "linear+softmax+layernorm", "full")


def _rows(which: str) -> list[dict]:
    """(model, preset, bits, linear, form, arch, shapes) rows, pruned to what a run can afford."""
    rows: list[dict] = []

    def add(
        model: str,
        preset: str = "full",
        bits: int = 8,
        linear: str = "integer",
        form: str = "flat",
        target: str = "h100",
        shapes: str | None = None,
    ) -> None:
        rows.append(
            dict(
                model=model, preset=preset, bits=bits, linear=linear, form=form, target=target, shapes=shapes
            )
        )

    # MiniLM: every preset x linear form x arch (dynamic), full in every variant
    for target in ("t4", "h100"):
        for linear in ("integer", "qdq"):
            add("minilm", linear=linear, target=target)
    add("minilm", shapes="batch=8,seq=128")
    add("minilm", form="functions")
    add("minilm", bits=4)
    add("minilm", bits=2)
    if which == "quick":
        return rows
    for preset in PRESETS[:-1]:
        add("minilm", preset=preset)
        add("minilm", preset=preset, linear="qdq", target="t4")
    add("minilm", bits=4, linear="qdq", target="t4", shapes="batch=8,seq=128")
    add("minilm", bits=2, form="functions", target="t4")
    if which == "minilm":
        return rows
    for model in ("random:roberta-base", "random:bert-base"):
        add(model)
        add(model, linear="qdq", target="t4")
        add(model, shapes="batch=8,seq=128", target="t4")
        add(model, bits=4)
        add(model, bits=2, linear="qdq")
    for preset in PRESETS[:-1]:
        add("random:roberta-base", preset=preset)
    return rows


def _key(row: dict) -> str:
    return "|".join(str(row[k]) for k in ("model", "preset", "bits", "linear", "form", "target", "shapes"))


def _run(cmd: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        ["nice", "-n", "10", *cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def _qexport() -> list[str]:
    return [sys.executable, "-m", "qexport.cli"]


def _checkpoint(out: Path, model: str, preset: str, bits: int) -> Path:
    name = model.replace("random:", "") + f"-{preset}-w{bits}"
    ckpt = out / "ckpt" / name
    if not (ckpt / "manifest.json").is_file():
        cmd = [
            *_qexport(),
            "quantize",
            "--model",
            model,
            "--preset",
            preset,
            "--weight-bits",
            str(bits),
            "--calib-batches",
            "2",
            "--batch-size",
            "8",
            "--max-length",
            "64",
            "-o",
            str(ckpt),
        ]
        if model == "minilm":
            cmd += ["--data", "rt"]
        res = _run(cmd, 1200)
        if res.returncode != 0:
            raise RuntimeError(f"quantize failed: {res.stderr.strip().splitlines()[-1:]}")
    return ckpt


def _onnx(ckpt: Path, linear: str, form: str) -> Path:
    path = ckpt.parent.parent / "onnx" / f"{ckpt.name}.{form}.{linear}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        res = _run(
            [*_qexport(), "onnx", str(ckpt), "--form", form, "--linear", linear, "-o", str(path)], 1200
        )
        if res.returncode != 0:
            raise RuntimeError(f"onnx export failed: {res.stderr.strip().splitlines()[-1:]}")
    return path


def _markdown(results: list[dict]) -> str:
    head = (
        "| model | preset | w bits | linear | form | target | shapes | status | seconds | rules "
        "| int8 GEMMs on TC | qdq->int8 |\n" + "| --- " * 12 + "|"
    )
    lines = [head]
    for r in results:
        rules = ", ".join(f"{k} {v}" for k, v in (r.get("by_rule") or {}).items())
        tc = f"{r['on_tc']}/{r['gemms']}" if r.get("gemms") is not None else "-"
        lines.append(
            f"| {r['model']} | {r['preset']} | {r['bits']} | {r['linear']} | {r['form']} | {r['target']} "
            f"| {r['shapes'] or 'dynamic'} | {r['status']} | {r['seconds']:.0f} | {rules or '-'} | {tc} "
            f"| {r.get('qdq', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="quick", choices=["quick", "minilm", "all"])
    ap.add_argument("-o", "--out", type=Path, default=ROOT / "artifacts" / "cuda-matrix")
    ap.add_argument("--only", default=None, help="run only rows whose key contains this")
    ap.add_argument("--timeout", type=int, default=1800)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from qexport.io import atomic_write_text

    args.out.mkdir(parents=True, exist_ok=True)
    log = args.out / "results.jsonl"
    done = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            rec = json.loads(line)
            done[rec["key"]] = rec
    for row in _rows(args.rows):
        key = _key(row)
        if key in done or (args.only and args.only not in key):
            continue
        rec = dict(row, key=key)
        t0 = time.time()
        try:
            ckpt = _checkpoint(args.out, row["model"], row["preset"], row["bits"])
            onnx_path = _onnx(ckpt, row["linear"], row["form"])
            art = (
                args.out
                / "tvm"
                / f"{onnx_path.stem}.{row['target']}.{row['shapes'] or 'dyn'}".replace("=", "")
            )
            cmd = [*_qexport(), "tvm", str(onnx_path), "--target", row["target"], "-o", str(art)]
            if row["shapes"]:
                cmd += ["--shapes", row["shapes"]]
            t0 = time.time()
            res = _run(cmd, args.timeout)
            rec["seconds"] = time.time() - t0
            if res.returncode == 0:
                meta = json.loads((art / "tvm.json").read_text())
                rec.update(
                    status="built",
                    by_rule=meta["schedule"]["by_rule"],
                    needed_fallback=meta["schedule"]["needed_fallback"],
                    gemms=meta["tensor_cores"]["int8_gemm_functions"],
                    on_tc=meta["tensor_cores"]["on_tensor_cores"],
                    qdq=meta["qdq_matmuls_to_int8"],
                    library_bytes=meta["library_bytes"],
                    cuda_build_seconds=meta.get("cuda_build_seconds"),
                )
                (art / "lib.so").unlink()  # keep the sidecar; libraries hold the weights
            else:
                err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
                rec["status"] = f"exit {res.returncode}: " + (err[0] if err else res.stderr.strip()[-300:])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            rec["seconds"] = time.time() - t0
            rec["status"] = f"failed: {exc}"
        done[key] = rec
        with log.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        atomic_write_text(args.out / "matrix.md", _markdown(list(done.values())))
        print(f"{rec['status'][:80]:80s} {rec['seconds']:7.1f}s  {key}", flush=True)
    print(_markdown(list(done.values())))


if __name__ == "__main__":
    main()

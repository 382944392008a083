"""GPU check: TVM CUDA parity with the integer reference and a latency grid, on a machine without TVM.

    python bench/gpu_check.py prepare --device cuda|cpu [--models minilm,roberta-base] [-o artifacts/gpu]
    python bench/gpu_check.py pack [-o artifacts/gpu]          # split for the 64 MiB-per-call carry
    python bench/gpu_check.py run --device cuda|cpu [--art artifacts/gpu] [--out DIR] [--iters 20]

``prepare`` (here, where TVM and nvcc are): per model an integer checkpoint (MiniLM: the demo
checkpoint when ``artifacts/demo/train/checkpoint`` exists, else a PTQ of the offline MiniLM on
rt; RoBERTa-base: PTQ of ``random:roberta-base``), and two TVM libraries for the device
(``--device cuda``: sm_90 via nvcc; ``cpu``: llvm, for the rehearsal) with dynamic batch/seq:
the integer flat ONNX (``--linear integer``) and the FP32 HF model's ONNX. Every initializer of
64 KiB or more (the weights) is lifted to a graph input before the build, so the libraries
hold kernels and small constants only; ``params.json`` records each lifted weight (name,
shape, dtype, sha256). A runtime-only TVM (the apache-tvm wheel minus its 250 MB compiler
library, plus the cp312 apache-tvm-ffi wheel) goes to ``tvm-runtime/`` when ``--wheels`` is given.

``run`` (the device): imports TVM runtime-only (``TVM_USE_RUNTIME_LIB=1``; ``tvm.relax`` needs
the compiler, so the Relax VM is ``tvm.runtime.vm.VirtualMachine``), re-exports the integer
ONNX from the carried checkpoint (same code, same bytes: the sha256 of every lifted weight
must match) and feeds its weights to the library:

1. parity: TVM ``logits_int`` vs :class:`qexport.models.integer.IntegerModel` (torch CPU) on
   random ids with ragged masks -- 0 mismatched elements required;
2. latency grid at batch x seq: PyTorch FP32/FP16 eager and ``torch.compile``, ORT FP32 and
   INT8 (CUDA EP only where ``onnxruntime-gpu`` is importable; on ``--device cpu`` the CPU EP),
   TVM FP32 (random weights: timing only) and TVM INT8;

each step under a share of ``--budget-s``; a row that cannot run is a "skipped" entry with its
reason. Results: ``gpu_check.json`` and ``gpu_check.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODELS = {"minilm": "minilm", "roberta-base": "random:roberta-base"}
LIFT_BYTES = 1 << 16
FEEDS = ("input_ids", "attention_mask")
PART_BYTES = 58 * 1000 * 1000
TVM_WHEEL_DROP = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/", "tvm/include/", "tvm/src/", "tvm/web/")


# --------------------------------------------------------------------------------------------
# weights as inputs
# --------------------------------------------------------------------------------------------
def lift_params(model: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Move every initializer of ``LIFT_BYTES`` or more to a graph input; returns them by name."""
    from onnx import helper, numpy_helper

    lifted: dict[str, np.ndarray] = {}
    keep = []
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.nbytes >= LIFT_BYTES:
            lifted[init.name] = arr
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    for name, arr in lifted.items():
        elem = helper.np_dtype_to_tensor_dtype(arr.dtype)
        model.graph.input.append(helper.make_tensor_value_info(name, elem, list(arr.shape)))
    return model, lifted


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _integer_onnx(ckpt: Path, work: Path) -> Any:
    """The flat ``--linear integer`` ONNX of ``ckpt``, inlined and folded as the TVM backend does."""
    import onnx

    from qexport.backends.tvm import _flatten_onnx
    from qexport.export.exporter import export_onnx

    path = export_onnx(ckpt, work / "int8.onnx", form="flat", linear="integer")
    return _flatten_onnx(onnx.load(str(path)))


def _fp32_onnx(ckpt: Path, work: Path) -> Path:
    from qexport.report.baselines import export_float_onnx, float_model

    return export_float_onnx(float_model(ckpt), work / "fp32.onnx", simple_mask=True)


# --------------------------------------------------------------------------------------------
# prepare (here)
# --------------------------------------------------------------------------------------------
def _checkpoint(name: str, dest: Path) -> Path:
    from qexport.ptq import post_training_quantize

    demo = ROOT / "artifacts" / "demo" / "train" / "checkpoint"
    if dest.is_dir():
        return dest
    if name == "minilm" and (demo / "manifest.json").is_file():
        shutil.copytree(demo, dest)
        return dest
    data = "rt" if name == "minilm" else None
    return post_training_quantize(
        MODELS[name], preset="full", data=data, calib_batches=4, batch_size=16, max_length=64, out_dir=dest
    )


def _build(onnx_model: Any, lifted: dict[str, np.ndarray], out: Path, target: str, work: Path) -> dict:
    import onnx

    from qexport.backends.tvm import TVMBackend
    from qexport.io import atomic_write_json

    path = work / f"{out.name}.lifted.onnx"
    onnx.save(onnx_model, str(path))
    t0 = time.time()
    TVMBackend().compile(path, out, target=target, shapes=None)
    params = [
        {"name": k, "shape": list(v.shape), "dtype": str(v.dtype), "sha256": _sha(v)}
        for k, v in lifted.items()
    ]
    atomic_write_json(out / "params.json", {"params": params, "build_seconds": round(time.time() - t0, 1)})
    return {"dir": str(out.relative_to(out.parent.parent)), "build_seconds": round(time.time() - t0, 1)}


def _runtime_bundle(wheels: Path, dest: Path) -> dict:
    """``dest``: the apache-tvm wheel without its compiler library + the apache-tvm-ffi wheel, unpacked."""
    tvm_whl = sorted(wheels.glob("apache_tvm-*.whl"))
    ffi_whl = sorted(wheels.glob("apache_tvm_ffi-*.whl"))
    if not tvm_whl or not ffi_whl:
        raise SystemExit(f"error: {wheels} needs the apache_tvm and apache_tvm_ffi wheels")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    with zipfile.ZipFile(tvm_whl[-1]) as z:
        z.extractall(dest, [n for n in z.namelist() if not n.startswith(TVM_WHEEL_DROP)])
    with zipfile.ZipFile(ffi_whl[-1]) as z:
        z.extractall(dest)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    return {"wheels": [tvm_whl[-1].name, ffi_whl[-1].name], "bytes": size}


def prepare(args: argparse.Namespace) -> None:
    from qexport.io import atomic_write_json

    target = "h100" if args.device == "cuda" else "llvm"
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"device": args.device, "target": target, "models": {}}
    for name in args.models.split(","):
        mdir = out / name
        mdir.mkdir(exist_ok=True)
        ckpt = _checkpoint(name, mdir / "checkpoint")
        rec: dict[str, Any] = {"checkpoint": f"{name}/checkpoint"}
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            if not (mdir / "tvm-int8" / "params.json").is_file():
                model, lifted = lift_params(_integer_onnx(ckpt, work))
                rec["tvm-int8"] = _build(model, lifted, mdir / "tvm-int8", target, work)
            if not (mdir / "tvm-fp32" / "params.json").is_file():
                import onnx

                model, lifted = lift_params(onnx.load(str(_fp32_onnx(ckpt, work))))
                rec["tvm-fp32"] = _build(model, lifted, mdir / "tvm-fp32", target, work)
        doc["models"][name] = rec
        print(f"prepared {name}: {rec}", flush=True)
    if args.wheels is not None:
        doc["tvm_runtime"] = _runtime_bundle(args.wheels, out / "tvm-runtime")
    atomic_write_json(out / "prepare.json", doc)
    print(json.dumps(doc, indent=1))


def pack(args: argparse.Namespace) -> None:
    """Cut ``artifacts/gpu`` (a tar stream) into ``artifacts/gpu-carry/part-K`` of at most 58 MB."""
    import tarfile

    src: Path = args.out.resolve()
    dest = src.parent / (src.name + "-carry")
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    blob = dest / "bundle.tar"
    with tarfile.open(blob, "w") as tar:
        tar.add(src, arcname="gpu")
    data = blob.read_bytes()
    blob.unlink()
    n = math.ceil(len(data) / PART_BYTES)
    names = []
    for k in range(n):
        part = dest / f"part-{k + 1}"
        part.mkdir()
        name = f"bundle.tar.{k:03d}"
        (part / name).write_bytes(data[k * PART_BYTES : (k + 1) * PART_BYTES])
        names.append(name)
    for k in range(n):
        (dest / f"part-{k + 1}" / "manifest").write_text("\n".join(names) + "\n")
    print(f"{n} call(s), back to back (the machine keeps /tmp while warm):")
    for k in range(n):
        print(f'  carry ["{dest.relative_to(ROOT)}/part-{k + 1}"]  command: bash bench/gpu_check.sh')


# --------------------------------------------------------------------------------------------
# run (the device)
# --------------------------------------------------------------------------------------------
class VMRunner:
    """A lib.so built by ``qexport tvm`` on the Relax VM of TVM's runtime (no compiler needed)."""

    def __init__(self, art: Path, device: str, params: Mapping[str, np.ndarray]) -> None:
        import tvm
        from tvm.runtime.vm import VirtualMachine

        meta = json.loads((art / "tvm.json").read_text())
        self.dev = tvm.cuda(0) if device == "cuda" else tvm.cpu(0)
        if meta["device"] != ("cuda" if device == "cuda" else "cpu"):
            raise RuntimeError(f"{art} was built for {meta['device']}, not {device}")
        self.vm = VirtualMachine(tvm.runtime.load_module(str(art / "lib.so")), self.dev)
        self.inputs = meta["inputs"]  # the VM's argument order: data inputs and lifted weights
        self.outputs = meta["outputs"]
        self._tensor = tvm.runtime.tensor
        missing = [i["name"] for i in self.inputs if i["name"] not in FEEDS and i["name"] not in params]
        if missing:
            raise RuntimeError(f"{len(missing)} weights missing, e.g. {missing[:3]}")
        self.params = {
            i["name"]: self._tensor(np.ascontiguousarray(params[i["name"]]), self.dev)
            for i in self.inputs
            if i["name"] not in FEEDS
        }

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [
            self.params[i["name"]]
            if i["name"] not in FEEDS
            else self._tensor(np.ascontiguousarray(feeds[i["name"]], dtype=i["dtype"]), self.dev)
            for i in self.inputs
        ]
        out = self.vm["main"](*args)
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {n: o.numpy() for n, o in zip(self.outputs, outs, strict=True)}

    def synchronize(self) -> None:
        self.dev.sync()


def _ragged(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(min(1000, vocab // 2), vocab, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    for b in range(1, batch):
        mask[b, int(rng.integers(1, seq + 1)) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _int8_params(ckpt: Path, want: list[dict]) -> dict[str, np.ndarray]:
    with tempfile.TemporaryDirectory() as tmp:
        _, lifted = lift_params(_integer_onnx(ckpt, Path(tmp)))
    bad = [p["name"] for p in want if p["name"] not in lifted or _sha(lifted[p["name"]]) != p["sha256"]]
    if bad:
        raise RuntimeError(f"{len(bad)} re-exported weights differ from the prepared ones, e.g. {bad[:3]}")
    return lifted


def _random_params(want: list[dict]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {p["name"]: (rng.standard_normal(p["shape"]) * 0.02).astype(p["dtype"]) for p in want}


class Budget:
    def __init__(self, seconds: float) -> None:
        self.end = time.time() + seconds

    def left(self) -> float:
        return self.end - time.time()


def _parity(name: str, ckpt: Path, art: Path, device: str, seqs: list[int]) -> dict:
    import torch

    from qexport.models.integer import IntegerModel

    ref = IntegerModel.from_checkpoint(ckpt)
    want = json.loads((art / "tvm-int8" / "params.json").read_text())["params"]
    runner = VMRunner(art / "tvm-int8", device, _int8_params(ckpt, want))
    vocab = int(ref.meta.get("vocab_size", 30000))
    total = mism = 0
    shapes = []
    for i, seq in enumerate(seqs):
        feeds = _ragged(8, seq, vocab, seed=i)
        got = np.asarray(runner.run(feeds)["logits_int"]).astype(np.int64)
        with torch.no_grad():
            exp = ref(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])).numpy()
        total += exp.size
        mism += int((got != exp).sum())
        shapes.append([8, seq])
    return {"model": name, "shapes": shapes, "elements": total, "mismatches": mism, "ok": mism == 0}


def _latency_rows(device: str) -> list[str]:
    """Rows in the order they run: torch.compile last (its compiles can spend the budget)."""
    rows = ["tvm-int8", "tvm-fp32", "torch-fp32", "ort-fp32", "ort-int8", "torch-fp32-compile"]
    if device == "cuda":
        rows.insert(3, "torch-fp16")
        rows.append("torch-fp16-compile")
    return rows


def _make_runner(row: str, ckpt: Path, art: Path, device: str, work: Path) -> Any:
    from qexport.report.baselines import OrtRunner, TorchRunner, export_float_onnx, float_model

    if row.startswith("torch"):
        return TorchRunner(float_model(ckpt), device, half="fp16" in row, compile_model="compile" in row)
    if row.startswith("ort"):
        import onnxruntime as ort

        if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise _Skip("onnxruntime has no CUDA execution provider here (onnxruntime-gpu not installed)")
        if row == "ort-fp32":
            return OrtRunner(export_float_onnx(float_model(ckpt), work / "ort-fp32.onnx"), device)
        from qexport.backends import get_backend
        from qexport.export.exporter import export_onnx

        path = export_onnx(ckpt, work / "ort-int8.onnx", form="functions", linear="integer")
        return get_backend("ort").load(path, device)
    sub = art / row
    want = json.loads((sub / "params.json").read_text())["params"]
    params = _int8_params(ckpt, want) if row == "tvm-int8" else _random_params(want)
    return VMRunner(sub, device, params)


class _Skip(Exception):
    pass


def _latency(name: str, ckpt: Path, art: Path, device: str, args: argparse.Namespace, budget: Budget) -> list:
    from qexport.report.timing import random_feeds, summarize, time_runs

    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = int(cfg.get("vocab_size", 30000))
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in _latency_rows(device):
            rec: dict[str, Any] = {"model": name, "row": row, "points": {}}
            out.append(rec)
            if budget.left() < 20:
                rec["skipped"] = "time budget spent"
                continue
            try:
                runner = _make_runner(row, ckpt, art, device, Path(tmp))
            except _Skip as exc:
                rec["skipped"] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one row failing must not stop the grid
                rec["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}"
                continue
            for b in args.batch:
                for s in args.seq:
                    key = f"{b}x{s}"
                    if budget.left() < 10:
                        rec["points"][key] = {"skipped": "time budget spent"}
                        continue
                    try:
                        feeds = random_feeds(b, s, vocab)
                        samples = time_runs(
                            runner, feeds, args.iters, max(1, args.iters // 5), args.point_budget_s
                        )
                        rec["points"][key] = summarize(samples, b) | {"n": len(samples)}
                    except Exception as exc:  # noqa: BLE001 - OOM, compile failure: record, go on
                        rec["points"][key] = {"error": f"{type(exc).__name__}: {str(exc).strip()[-200:]}"}
            del runner
            print(f"  {name} {row}: {json.dumps({k: v.get('median_ms') for k, v in rec['points'].items()})}")
    return out


def _markdown(doc: dict) -> str:
    lines = [
        f"# GPU check ({doc['device']})",
        "",
        f"environment: `{json.dumps(doc['env'])}`",
        "",
        "## Parity",
        "",
    ]
    lines += ["| model | shapes | elements | mismatches | status |", "| --- | --- | --- | --- | --- |"]
    for p in doc["parity"]:
        if "error" in p:
            lines.append(f"| {p['model']} | - | - | - | error: {p['error']} |")
        else:
            status = "ok" if p["ok"] else "MISMATCH"
            lines.append(f"| {p['model']} | {p['shapes']} | {p['elements']} | {p['mismatches']} | {status} |")
    keys = [f"{b}x{s}" for b in doc["batch"] for s in doc["seq"]]
    lines += ["", "## Latency (median ms; batch x seq)", "", "| model | row | " + " | ".join(keys) + " |"]
    lines.append("| --- | --- |" + " --- |" * len(keys))
    for r in doc["latency"]:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"| {r['model']} | {r['row']} | " + " | ".join(["-"] * len(keys)) + f" |  ({why})")
            continue
        cells = []
        for k in keys:
            p = r["points"].get(k, {})
            cells.append(
                f"{p['median_ms']:.2f}"
                if "median_ms" in p
                else (p.get("skipped") or p.get("error", "-"))[:40]
            )
        lines.append(f"| {r['model']} | {r['row']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from qexport.io import atomic_write_json, atomic_write_text

    budget = Budget(args.budget_s)
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    import tvm

    from qexport.report.system import hardware, versions

    art: Path = args.art
    prep = json.loads((art / "prepare.json").read_text())
    if prep["device"] != args.device:
        raise SystemExit(f"error: {art} was prepared for {prep['device']}, not {args.device}")
    env = {
        "tvm": str(tvm.__version__),
        "tvm_runtime_only": bool(getattr(tvm.base, "_RUNTIME_ONLY", False)),
        "versions": versions(),
        "hardware": hardware(),
    }
    doc: dict[str, Any] = {"device": args.device, "env": env, "batch": args.batch, "seq": args.seq}
    doc["parity"], doc["latency"] = [], []
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.models.split(",") if n in prep["models"]]
    for name in names:
        ckpt = art / name / "checkpoint"
        try:
            doc["parity"].append(_parity(name, ckpt, art / name, args.device, args.parity_seq))
        except Exception as exc:  # noqa: BLE001 - report and go on to the latency grid
            doc["parity"].append({"model": name, "error": f"{type(exc).__name__}: {exc}", "ok": False})
            traceback.print_exc()
        print(f"parity {name}: {doc['parity'][-1]}", flush=True)
        atomic_write_json(out / "gpu_check.json", doc)
    for i, name in enumerate(names):
        share = Budget(budget.left() / (len(names) - i))
        doc["latency"] += _latency(name, art / name / "checkpoint", art / name, args.device, args, share)
        atomic_write_json(out / "gpu_check.json", doc)
    atomic_write_text(out / "gpu_check.md", _markdown(doc))
    print(_markdown(doc))
    return 0 if doc["parity"] and all(p.get("ok") for p in doc["parity"]) else 1


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--models", default="minilm,roberta-base")
    p.add_argument("-o", "--out", type=Path, default=ROOT / "artifacts" / "gpu")
    p.add_argument(
        "--wheels", type=Path, default=None, help="dir with the apache-tvm + cp312 apache-tvm-ffi wheels"
    )
    k = sub.add_parser("pack")
    k.add_argument("-o", "--out", type=Path, default=ROOT / "artifacts" / "gpu")
    r = sub.add_parser("run")
    r.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    r.add_argument("--art", type=Path, default=ROOT / "artifacts" / "gpu")
    r.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "artifacts" / "gpu-out")))
    r.add_argument("--models", default="minilm,roberta-base")
    r.add_argument("--batch", type=_ints, default=[1, 8, 32])
    r.add_argument("--seq", type=_ints, default=[128, 256])
    r.add_argument("--parity-seq", type=_ints, default=[128, 256])
    r.add_argument("--iters", type=int, default=20)
    r.add_argument("--point-budget-s", type=float, default=8.0)
    r.add_argument("--budget-s", type=float, default=480.0, help="whole run (the device allows 600 s a call)")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(args)
        return 0
    if args.cmd == "pack":
        pack(args)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

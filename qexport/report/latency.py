"""``qexport report``: latency of the integer model against float baselines, on every runtime.

:func:`run_report` measures a grid (batch x sequence length) for each row that the
chosen backends and device allow:

=====================  ======================================================  ========
row                    what runs                                                device
=====================  ======================================================  ========
PyTorch FP32 eager     HF model, SDPA attention                                 cpu/cuda
PyTorch FP16 eager     the same in half precision                               cuda
torch.compile FP16     ``torch.compile(dynamic=False)`` (``torch_compile=True``) cuda
ORT FP32 / FP16        float ONNX + ORT transformer fusions (FP16: cuda only)   cpu/cuda
ORT INT8 dynamic       ORT ``quantize_dynamic`` of the fused FP32 graph         cpu
ORT INT8               qexport's saved ORT-CPU form (CPU), integer ONNX (CUDA)  cpu/cuda
TVM FP32 / INT8        float ONNX / flat integer ONNX (MatMulInteger)           cpu/cuda
TensorRT FP32/FP16     float ONNX (FP16: builder flag)                          cuda
TensorRT INT8          flat integer ONNX with QDQ linears                       cuda
=====================  ======================================================  ========

Each row: build its artifact, load it, then per grid point ``warmup`` untimed and
``iters`` timed runs (median / p10 / p90, see :mod:`qexport.report.timing`) and the peak
memory (:class:`qexport.report.system.MemoryProbe`). A runtime that is not installed or
does not fit the device is a ``skipped`` row with its reason; one that raises is a
``failed`` row (or a failed/``oom`` grid point) with its reason: nothing is lost, and
``report.json`` is rewritten after every row. Only when no row could run at all does
:func:`run_report` raise :class:`~qexport.errors.BackendError` (after writing the report).

Outputs in ``out_dir``: ``report.json``, ``report.md`` (I-BERT Table 3 form speedups),
``latency.png``, ``speedup.png``, ``size.png``, and ``artifacts/`` (the ONNX files,
TVM libraries and TensorRT plans that were measured, with their true sizes).

Every qexport artifact is built by the public functions the CLI uses -- the exporter
(:func:`~qexport.export.exporter.export_onnx`), the saved ORT-CPU form
(:func:`~qexport.backends.ort.export_ort_cpu`) and the backends' ``compile`` -- and the file a row
stores is the file it timed; the float and ``quantize_dynamic`` baselines come from
:mod:`qexport.report.baselines`.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexport.backends.base import Runner
from qexport.errors import BackendError, ConfigError, QexportError
from qexport.io import atomic_write_json, atomic_write_text
from qexport.report.timing import (
    default_warmup,
    is_oom,
    random_feeds,
    short_reason,
    summarize,
    time_runs,
)

#: Backend names ``--backends`` accepts.
BACKENDS = ("torch", "ort", "tvm", "trt")
DEVICES = ("cpu", "cuda")
#: Seconds one grid point may take before it stops early (with at least 3 timed runs).
DEFAULT_POINT_BUDGET_S = 60.0
#: Sequence length of the CPU headline number.
HEADLINE_SEQ = 128


def parse_int_list(text: str, what: str = "integer list") -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (sorted, no duplicates); ConfigError unless all are positive ints."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"empty {what}: give comma-separated positive integers, e.g. 1,8,32")
    out: set[int] = set()
    for p in parts:
        if not p:
            raise ConfigError(f"bad {what} {text!r}: empty entry (use e.g. 1,8,32)")
        try:
            v = int(p)
        except ValueError:
            raise ConfigError(
                f"bad {what} entry {p!r} in {text!r}: use comma-separated positive integers, e.g. 1,8,32"
            ) from None
        if v <= 0:
            raise ConfigError(f"bad {what} entry {p!r} in {text!r}: values must be >= 1")
        out.add(v)
    return sorted(out)


@dataclass(frozen=True)
class RowSpec:
    runtime: str  # torch | ort | tvm | trt
    precision: str  # fp32 | fp16 | int8
    label: str
    gpu_only: bool = False
    variant: str = ""  # torch: "eager" | "compile"

    @property
    def key(self) -> str:
        return "-".join(p for p in (self.runtime, self.variant, self.precision) if p)


ROW_SPECS: tuple[RowSpec, ...] = (
    RowSpec("torch", "fp32", "PyTorch FP32 eager", variant="eager"),
    RowSpec("torch", "fp16", "PyTorch FP16 eager", gpu_only=True, variant="eager"),
    RowSpec("torch", "fp16", "torch.compile FP16", gpu_only=True, variant="compile"),
    RowSpec("ort", "fp32", "ORT FP32"),
    RowSpec("ort", "fp16", "ORT FP16", gpu_only=True),
    RowSpec("ort", "int8", "ORT INT8 dynamic", variant="dynamic"),
    RowSpec("ort", "int8", "ORT INT8"),
    RowSpec("tvm", "fp32", "TVM FP32"),
    RowSpec("tvm", "int8", "TVM INT8"),
    RowSpec("trt", "fp32", "TensorRT FP32", gpu_only=True),
    RowSpec("trt", "fp16", "TensorRT FP16", gpu_only=True),
    RowSpec("trt", "int8", "TensorRT INT8", gpu_only=True),
)


class _Skip(Exception):
    """A row that cannot run here (runtime missing, wrong device): status ``skipped``."""


class _RowRuntime:
    """What a row measures: one runner for every shape, or one per shape (static compilers)."""

    def __init__(
        self, runner: Runner | None = None, per_shape: Callable[[int, int], Runner] | None = None
    ) -> None:
        self._runner = runner
        self._per_shape = per_shape
        self._cache: dict[tuple[int, int], Runner] = {}

    def runner_for(self, batch: int, seq: int) -> Runner:
        if self._runner is not None:
            return self._runner
        assert self._per_shape is not None
        key = (batch, seq)
        if key not in self._cache:
            self._cache.clear()  # keep one compiled shape in memory at a time
            self._cache[key] = self._per_shape(batch, seq)
        return self._cache[key]


@dataclass
class _Prepared:
    """A row's artifact (built before the memory baseline) and how to load it."""

    load: Callable[[], _RowRuntime]
    artifact: Path | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class _Context:
    checkpoint: Path
    out_dir: Path
    device: str
    batches: list[int]
    seqs: list[int]
    config: Any  # HF config of the checkpoint
    threads: int | None = None
    artifacts: dict[str, Path] = field(default_factory=dict)
    notes: dict[str, list[str]] = field(default_factory=dict)
    failed: dict[str, Exception] = field(default_factory=dict)

    @property
    def art_dir(self) -> Path:
        d = self.out_dir / "artifacts"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def cached(self, key: str, make: Callable[[], Path]) -> Path:
        """Build an artifact once per report (rows share the float ONNX export, ...).

        A build that failed fails again at once for the next row that needs it.
        """
        if key in self.failed:
            raise self.failed[key]
        if key not in self.artifacts:
            try:
                self.artifacts[key] = make()
            except Exception as exc:
                self.failed[key] = exc
                raise
        return self.artifacts[key]

    # --------------------------------------------------------------- shared artifacts
    def float_onnx(self, simple_mask: bool = False) -> Path:
        """Float ONNX export: the HF graph (for ORT), or the simple-mask graph (TVM, TensorRT)."""
        from qexport.report.baselines import export_float_onnx, float_model

        name = "float32.simple-mask.onnx" if simple_mask else "float32.onnx"

        def make() -> Path:
            model = float_model(self.checkpoint, attn="eager")
            try:
                return export_float_onnx(model, self.art_dir / name, simple_mask=simple_mask)
            finally:
                del model
                gc.collect()

        return self.cached(name, make)

    def ort_float_onnx(self, fp16: bool) -> Path:
        from qexport.report.baselines import fp16_onnx, ort_optimize

        name = "float16.ort.onnx" if fp16 else "float32.ort.onnx"

        def make() -> Path:
            src = self.float_onnx()
            try:
                path, stats = ort_optimize(
                    src,
                    self.art_dir / name,
                    int(self.config.num_attention_heads),
                    int(self.config.hidden_size),
                    fp16=fp16,
                    use_gpu=self.device == "cuda",
                )
                fused = ", ".join(f"{k} x{v}" for k, v in sorted(stats.items()))
                self.notes[name] = [f"ORT transformer fusions: {fused or 'none matched'}"]
                return path
            except Exception as exc:  # fusions are an optimization: fall back to the plain graph
                self.notes[name] = [f"ORT transformer optimizer failed ({short_reason(exc)}); plain graph"]
                return fp16_onnx(src, self.art_dir / name) if fp16 else src

        return self.cached(name, make)

    def int_onnx(self, form: str, linear: str) -> Path:
        def make() -> Path:
            from qexport.export.exporter import export_onnx

            return Path(
                export_onnx(
                    self.checkpoint, self.art_dir / f"int8.{form}.{linear}.onnx", form=form, linear=linear
                )
            )

        return self.cached(f"int8.{form}.{linear}.onnx", make)

    def ort_cpu_onnx(self) -> tuple[Path, str]:
        """The saved ORT-CPU form, with the u8s8 policy that is exact and fastest on this CPU."""
        from qexport.backends.ort import export_ort_cpu
        from qexport.backends.ort_rewrite import exact_int8_gemms

        policy = "vnni" if "u8s8" in exact_int8_gemms() else "portable"
        name = f"int8.ort-cpu.{policy}.onnx"
        path = self.cached(name, lambda: export_ort_cpu(self.checkpoint, self.art_dir / name, u8s8=policy))
        return path, policy

    def dynamic_int8_onnx(self) -> Path:
        from qexport.report.baselines import dynamic_int8_onnx

        name = "int8.dynamic.onnx"
        return self.cached(name, lambda: dynamic_int8_onnx(self.ort_float_onnx(False), self.art_dir / name))

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def shapes_spec(self) -> str:
        """TensorRT optimization profile covering the grid; tuned for its largest shape."""
        b, s = self.batches, self.seqs
        return f"batch={min(b)}:{max(b)}:{max(b)},seq={min(s)}:{max(s)}:{max(s)}"


# ----------------------------------------------------------------------------- row preparation


def _cuda_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _backend(name: str) -> Any:
    """The registered qexport backend, or _Skip with its reason when missing."""
    from qexport.backends import get_backend

    try:
        be = get_backend(name)
    except BackendError as exc:
        raise _Skip(f"qexport has no {name} backend ({exc.message})") from None
    ok, info = be.available()
    if not ok:
        raise _Skip(info)
    return be


def _tvm_target(device: str) -> str:
    """``llvm`` on CPU; on CUDA the GPU's own architecture (TVM's ``cuda`` alias means sm_75)."""
    if device != "cuda":
        return "llvm"
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    return json.dumps({"kind": "cuda", "arch": f"sm_{major}{minor}"})


def _prepare(spec: RowSpec, ctx: _Context, n_shapes: int) -> _Prepared:
    dev = ctx.device
    if spec.runtime == "trt":
        _backend("trt")  # "TensorRT is not installed ..." comes before any device reason
    if spec.gpu_only and dev != "cuda":
        raise _Skip(f"{spec.label} runs on CUDA only (use --device cuda)")
    if dev == "cuda" and spec.runtime in ("torch", "tvm", "trt") and not _cuda_available():
        raise _Skip("CUDA is not available (torch.cuda.is_available() is False)")

    opts: dict[str, Any] = {"threads": ctx.threads} if ctx.threads else {}
    if spec.runtime == "torch":
        import torch

        from qexport.report.baselines import TorchRunner, float_model

        def load_torch() -> _RowRuntime:
            model = float_model(ctx.checkpoint, attn="sdpa")
            if ctx.threads:
                torch.set_num_threads(ctx.threads)
            return _RowRuntime(
                TorchRunner(
                    model,
                    dev,
                    half=spec.precision == "fp16",
                    compile_model=spec.variant == "compile",
                    max_shapes=n_shapes,
                )
            )

        notes = ["HF model, SDPA attention"] + (
            ["torch.compile(dynamic=False): first run per shape compiles (inside warm-up)"]
            if spec.variant == "compile"
            else []
        )
        return _Prepared(load_torch, None, notes)

    if spec.runtime == "ort":
        import onnxruntime as ort

        if dev == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
            raise _Skip("onnxruntime has no CUDA provider: install onnxruntime-gpu")
        if spec.precision == "int8" and spec.variant == "dynamic":
            if dev != "cpu":
                raise _Skip("ORT quantize_dynamic INT8 is a CPU baseline (use --device cpu)")
            from qexport.report.baselines import OrtRunner

            path = ctx.dynamic_int8_onnx()
            notes = ["quantize_dynamic (per-channel QInt8 weights) of the fused FP32 graph",
                     *ctx.notes.get("float32.ort.onnx", [])]
            return _Prepared(lambda: _RowRuntime(OrtRunner(path, dev, ctx.threads)), path, notes)
        if spec.precision == "int8":
            be = _backend("ort")
            if dev == "cpu":
                path, policy = ctx.ort_cpu_onnx()
                note = f"qexport saved ORT-CPU form (--u8s8 {policy}), loaded as saved"
            else:
                path, note = ctx.int_onnx("functions", "integer"), "qexport integer ONNX, functions form"
            return _Prepared(lambda: _RowRuntime(be.load(path, dev, **opts)), path, [note])
        from qexport.report.baselines import OrtRunner

        path = ctx.ort_float_onnx(fp16=spec.precision == "fp16")
        name = "float16.ort.onnx" if spec.precision == "fp16" else "float32.ort.onnx"
        notes = list(ctx.notes.get(name, []))
        return _Prepared(lambda: _RowRuntime(OrtRunner(path, dev, ctx.threads)), path, notes)

    if spec.runtime == "tvm":
        be = _backend("tvm")
        if ctx.threads:  # read when TVM's thread pool starts (the first TVM run in this process)
            os.environ["TVM_NUM_THREADS"] = str(ctx.threads)
        fp32 = spec.precision == "fp32"
        src = ctx.float_onnx(simple_mask=True) if fp32 else ctx.int_onnx("flat", "integer")
        target = _tvm_target(dev)
        out = ctx.art_dir / f"tvm-{spec.precision}-{dev}"
        try:
            lib = ctx.cached(out.name, lambda: Path(be.compile(src, out, target=target)))
        except QexportError as exc:  # no dynamic shapes: compile one library per grid point
            note = f"dynamic-shape compile failed ({exc.message}); one library per (batch, seq)"

            def per_shape(b: int, s: int) -> Runner:
                o = ctx.art_dir / f"tvm-{spec.precision}-{dev}-b{b}-s{s}"
                lib_bs = ctx.cached(
                    o.name, lambda: Path(be.compile(src, o, target=target, shapes={"batch": b, "seq": s}))
                )
                return be.load(lib_bs, dev)

            return _Prepared(lambda: _RowRuntime(per_shape=per_shape), None, [note])
        return _Prepared(lambda: _RowRuntime(be.load(lib, dev)), lib, [f"target {target}, dynamic batch/seq"])

    if spec.runtime == "trt":
        be = _backend("trt")
        src = ctx.int_onnx("flat", "qdq") if spec.precision == "int8" else ctx.float_onnx(simple_mask=True)
        plan = ctx.art_dir / f"trt-{spec.precision}.plan"
        built = ctx.cached(
            plan.name, lambda: Path(be.compile(src, plan, precision=spec.precision, shapes=ctx.shapes_spec))
        )
        return _Prepared(
            lambda: _RowRuntime(be.load(built, dev)), built, [f"one optimization profile {ctx.shapes_spec}"]
        )
    raise BackendError(f"unknown backend {spec.runtime!r}: choose one of {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- measurement


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()


def artifact_bytes(path: Path | None) -> int | None:
    """True on-disk size: a file's size, a directory's files summed (TVM library + sidecars)."""
    if path is None or not Path(path).exists():
        return None
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def _measure_row(
    spec: RowSpec,
    ctx: _Context,
    iters: int,
    warmup: int,
    advance: Callable[[str], None],
    budget_s: float | None = None,
) -> dict[str, Any]:
    from qexport.report.system import MemoryProbe

    grid = [(b, s) for b in ctx.batches for s in ctx.seqs]
    row: dict[str, Any] = {
        "key": spec.key,
        "label": spec.label,
        "runtime": spec.runtime,
        "precision": spec.precision,
        "device": ctx.device,
        "status": "ok",
        "reason": None,
        "artifact": None,
        "artifact_bytes": None,
        "notes": [],
        "points": [],
    }
    done = 0
    try:
        t0 = time.perf_counter()
        prep = _prepare(spec, ctx, len(grid))
        row["build_s"] = round(time.perf_counter() - t0, 3)
        row["artifact"] = None if prep.artifact is None else str(prep.artifact)
        row["artifact_bytes"] = artifact_bytes(prep.artifact)
        row["notes"] = list(prep.notes)
        probe = MemoryProbe(ctx.device, torch_allocator=spec.runtime == "torch")
        probe.baseline()
        t0 = time.perf_counter()
        runtime = prep.load()
        row["load_s"] = round(time.perf_counter() - t0, 3)
        for b, s in grid:
            point: dict[str, Any] = {"batch": b, "seq": s, "status": "ok", "reason": None}
            try:
                runner = runtime.runner_for(b, s)
                feeds = random_feeds(b, s, ctx.vocab_size)
                probe.start()
                samples = time_runs(runner, feeds, iters, warmup, budget_s)
                point.update(summarize(samples, b))
                point["iters"] = len(samples)
                point["budget_hit"] = len(samples) < iters
                point["warmup"] = warmup
                point["peak_mem_bytes"], point["mem_source"] = probe.peak()
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # one shape failing (OOM at the largest) keeps the others
                point["status"] = "oom" if is_oom(exc) else "failed"
                point["reason"] = short_reason(exc)
                _free_device_memory(ctx.device)
            row["points"].append(point)
            done += 1
            advance(f"{spec.label} b={b} s={s}")
        del runtime
    except (KeyboardInterrupt, SystemExit):
        raise
    except _Skip as exc:
        row["status"], row["reason"] = "skipped", str(exc)
    except Exception as exc:
        row["status"], row["reason"] = ("oom" if is_oom(exc) else "failed"), short_reason(exc)
    finally:
        for _ in range(len(grid) - done):
            advance(f"{spec.label}: {row['status']}")
        _free_device_memory(ctx.device)
    if row["status"] == "ok" and not any(p["status"] == "ok" for p in row["points"]):
        first = row["points"][0] if row["points"] else {"status": "failed", "reason": "no grid points"}
        row["status"], row["reason"] = first["status"], first["reason"]
    return row


# ----------------------------------------------------------------------------- headline numbers


def _point(row: dict[str, Any] | None, batch: int, seq: int) -> dict[str, Any] | None:
    if row is None or row.get("status") != "ok":
        return None
    for p in row["points"]:
        if p["batch"] == batch and p["seq"] == seq and p["status"] == "ok":
            return p
    return None


#: qexport's own exact INT8 rows (the headline's candidates) and the FP32 rows a user compares with
QEXPORT_INT8_KEYS: tuple[str, ...] = ("ort-int8", "tvm-int8")
FP32_KEYS: tuple[str, ...] = ("ort-fp32", "torch-eager-fp32", "tvm-fp32")


def _fastest(
    by_key: dict[str, dict[str, Any]], keys: Sequence[str], b: int, s: int
) -> tuple[str, Any] | None:
    points = [(k, p) for k in keys if (p := _point(by_key.get(k), b, s)) is not None]
    return min(points, key=lambda kp: kp[1]["median_ms"]) if points else None


def headline(
    rows: Sequence[dict[str, Any]], device: str, batches: Sequence[int], seqs: Sequence[int]
) -> dict[str, Any]:
    """The fastest exact qexport INT8 row (ORT or TVM) vs the fastest FP32 row, and vs ORT
    ``quantize_dynamic``, at the largest batch and seq 128 (else the seq closest to it), on CPU."""
    by_key = {r["key"]: r for r in rows}
    labels = {r["key"]: r["label"] for r in rows}
    b = max(batches)
    s = min(seqs, key=lambda x: (abs(x - HEADLINE_SEQ), x))
    out: dict[str, Any] = {"cpu_speedup_int8_vs_fp32": None, "batch": b, "seq": s}
    if device != "cpu":
        out["reason"] = "the CPU headline needs --device cpu"
        return out
    i8, f32 = _fastest(by_key, QEXPORT_INT8_KEYS, b, s), _fastest(by_key, FP32_KEYS, b, s)
    if i8 is None or f32 is None:
        out["reason"] = "no qexport INT8 row and FP32 row both ran at this point"
        return out
    (i8_key, i8_point), (f32_key, f32_point) = i8, f32
    out["cpu_speedup_int8_vs_fp32"] = f32_point["median_ms"] / i8_point["median_ms"]
    out["int8_ms"], out["fp32_ms"] = i8_point["median_ms"], f32_point["median_ms"]
    out["int8_row"], out["fp32_row"] = labels[i8_key], labels[f32_key]
    dyn = _point(by_key.get("ort-dynamic-int8"), b, s)
    if dyn is not None:
        out["cpu_speedup_int8_vs_dynamic"] = dyn["median_ms"] / i8_point["median_ms"]
        out["dynamic_ms"] = dyn["median_ms"]
    return out


# ----------------------------------------------------------------------------- entry point


@contextlib.contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Callable[[str], None]]:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]report[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=Console(stderr=True),
        disable=not enabled,
    ) as prog:
        task = prog.add_task("", total=total)

        def advance(desc: str) -> None:
            prog.update(task, advance=1, description=desc)

        yield advance


def _check_inputs(
    checkpoint: Path | None,
    model_spec: str | None,
    backends: Sequence[str],
    device: str,
    batches: Sequence[int],
    seqs: Sequence[int],
    iters: int,
) -> list[str]:
    if checkpoint is None and not model_spec:
        raise ConfigError("give a CHECKPOINT or --model SPEC")
    if checkpoint is not None and model_spec:
        raise ConfigError("give a CHECKPOINT or --model SPEC, not both")
    names = [b.strip().lower() for b in backends if b.strip()]
    if not names:
        raise BackendError(f"no backend given: choose from {', '.join(BACKENDS)}")
    unknown = [b for b in names if b not in BACKENDS]
    if unknown:
        raise BackendError(f"unknown backend {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}: use cpu or cuda")
    for what, vals in (("batch", batches), ("seq", seqs)):
        if not vals or any(int(v) < 1 for v in vals):
            raise ConfigError(f"--{what} needs positive integers, got {list(vals)}")
    if iters < 1:
        raise ConfigError(f"--iters must be >= 1, got {iters}")
    return list(dict.fromkeys(names))


def _torch_threads(n: int | None = None) -> int | None:
    """Read (and, given ``n``, restore) torch's intra-op thread count."""
    try:
        import torch
    except ImportError:
        return None
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return int(torch.get_num_threads())


def _max_seq(config: Any) -> int:
    n = int(getattr(config, "max_position_embeddings", 512))
    if getattr(config, "model_type", "") == "roberta":  # positions start after the padding index
        n -= int(getattr(config, "pad_token_id", 1) or 0) + 1
    return n


def run_report(
    checkpoint: Path | None,
    model_spec: str | None,
    backends: list[str],
    device: str,
    batches: list[int],
    seqs: list[int],
    iters: int,
    out_dir: Path,
    torch_compile: bool = False,
    *,
    warmup: int | None = None,
    progress: bool = True,
    threads: int | None = None,
    point_budget_s: float | None = DEFAULT_POINT_BUDGET_S,
    prebuilt: Mapping[str, Path] | None = None,
) -> dict[str, Any]:
    """Size and latency report of an integer checkpoint (or of ``model_spec``, PTQ-quantized first).

    Returns the report document (also written to ``out_dir/report.json``) plus
    ``report_json``, ``report_md``, ``plots``, ``markdown`` (the report.md text) and the
    headline numbers ``size_ratio`` (checkpoint bytes vs FP32) and
    ``cpu_speedup_int8_vs_fp32`` (fastest qexport INT8 row vs fastest FP32 row, largest batch,
    seq 128; None when that was not measured on CPU). Raises BackendError for an unknown backend name,
    or (after writing the report) when no row could run; ConfigError for bad grids.

    Keyword options: ``warmup`` untimed runs per point (default 20 % of ``iters``, 2..10);
    ``progress`` (the rich bar on stderr); ``threads``: intra-op threads for PyTorch, ORT
    and TVM (default: each runtime's own default; 1 gives stable CPU numbers on a busy
    machine); ``point_budget_s``: a point that takes longer stops early with at least 3
    timed runs (its ``iters`` and ``budget_hit`` say so; None = always ``iters``);
    ``prebuilt``: artifacts the caller built already, by the name the report gives them
    (``tvm-int8-cpu``: the TVM library of the flat integer ONNX for this device, dynamic shapes),
    used instead of building them again.
    """
    from transformers import AutoConfig

    from qexport.report import render
    from qexport.report.size import checkpoint_size
    from qexport.report.system import hardware, versions
    from qexport.report.system import threads as default_threads

    names = _check_inputs(checkpoint, model_spec, backends, device, batches, seqs, iters)
    batches = sorted({int(b) for b in batches})
    seqs = sorted({int(s) for s in seqs})
    warm = default_warmup(iters) if warmup is None else max(0, int(warmup))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    source: dict[str, Any] = {}
    if checkpoint is None:
        from qexport.ptq import post_training_quantize

        assert model_spec is not None
        t0 = time.perf_counter()
        checkpoint = post_training_quantize(model_spec, preset="full", out_dir=out_dir / "checkpoint")
        source = {
            "model": model_spec,
            "ptq": "preset full, calibrated on random token ids",
            "ptq_s": round(time.perf_counter() - t0, 2),
        }
    checkpoint = Path(checkpoint)
    size = checkpoint_size(checkpoint)  # CheckpointError for a bad directory
    config = AutoConfig.from_pretrained(str(checkpoint))
    if max(seqs) > _max_seq(config):
        raise ConfigError(f"--seq {max(seqs)} exceeds the model's {_max_seq(config)} positions")

    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    ctx = _Context(checkpoint, out_dir, device, batches, seqs, config, threads=threads)
    ctx.artifacts.update({str(k): Path(v) for k, v in (prebuilt or {}).items()})
    specs = [s for s in ROW_SPECS if s.runtime in names and (s.variant != "compile" or torch_compile)]
    doc: dict[str, Any] = {
        "format": "qexport-report",
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": str(checkpoint),
        "source": source or {"checkpoint": str(checkpoint)},
        "model": {
            "arch": str(config.model_type),
            "layers": int(config.num_hidden_layers),
            "hidden": int(config.hidden_size),
            "heads": int(config.num_attention_heads),
            "params": size["params"],
        },
        "settings": {
            "backends": names,
            "device": device,
            "batches": batches,
            "seqs": seqs,
            "iters": iters,
            "warmup": warm,
            "torch_compile": torch_compile,
            "threads": threads,
            "point_budget_s": point_budget_s,
            "timing": "numpy in -> numpy out per call; synchronize + perf_counter",
        },
        "hardware": hardware(),
        "versions": versions(),
        "threads": default_threads(),
        "rows": [],
        "size": {"checkpoint": size, "artifacts": []},
    }
    json_path = out_dir / "report.json"
    grid = len(batches) * len(seqs)
    torch_threads = _torch_threads()
    try:
        with _progress(len(specs) * grid, progress) as advance:
            for spec in specs:
                doc["rows"].append(_measure_row(spec, ctx, iters, warm, advance, point_budget_s))
                atomic_write_json(json_path, doc)
    except BaseException:
        doc["interrupted"] = True
        atomic_write_json(json_path, doc)
        raise
    finally:
        _torch_threads(torch_threads)

    with contextlib.suppress(OSError, AttributeError):
        doc["hardware"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["size"]["artifacts"] = render.artifact_sizes(doc["rows"], size)
    head = headline(doc["rows"], device, batches, seqs)
    doc["headline"] = {
        "size_ratio": size["ratio_vs_fp32"],
        "size_ratio_vs_fp16": size["ratio_vs_fp16"],
        **head,
    }
    doc["size_ratio"] = size["ratio_vs_fp32"]
    doc["cpu_speedup_int8_vs_fp32"] = head["cpu_speedup_int8_vs_fp32"]
    doc["speedups"] = render.speedups(doc["rows"], batches, seqs)
    md = render.markdown(doc)
    md_path = out_dir / "report.md"
    atomic_write_text(md_path, md)
    try:
        doc["plots"] = [str(p) for p in render.plots(doc, out_dir)]
    except Exception as exc:  # plots are secondary: keep the measured report
        doc["plots"], doc["plot_error"] = [], short_reason(exc)
    atomic_write_json(json_path, doc)

    if not any(r["status"] == "ok" for r in doc["rows"]):
        by_reason: dict[str, list[str]] = {}
        for r in doc["rows"]:
            by_reason.setdefault(str(r["reason"]), []).append(r["label"])
        why = "; ".join(f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items())
        raise BackendError(f"nothing could run ({why or 'no rows selected'}); see {json_path}")
    return {**doc, "report_json": str(json_path), "report_md": str(md_path), "markdown": md}

"""``qexport demo``: the whole pipeline on the offline default (MiniLM on Rotten Tomatoes).

Stages (each one timed into ``summary.json``'s ``timings_s``)::

    train    FP fine-tuning then QAT (recipe ``rt-minilm-full``) -> integer checkpoint; the
             trainer's own integer test evaluation is skipped (``final_int_eval=False``)
    size     true checkpoint size vs FP32
    onnx     integer ONNX, functions form (ORT) and flat form with integer linears (TVM)
    ort      parity of ONNX Runtime against the integer reference on the parity sample (the
             first ``parity_limit`` test rows, every ``logits_int`` element compared), then the
             integer model's test-split accuracy through ORT, now proven bit-exact (the torch
             int64 reference over the whole split takes minutes on 2 cores; ORT takes seconds)
    dynamic  the CPU user's INT8 route for comparison: the FP model through ORT's transformer
             fusions and ``quantize_dynamic``, its accuracy on the same split
    tvm      TVM (llvm) build + parity on a smaller sample; the report times this library
    report   CPU latency: PyTorch FP32, ORT FP32, ORT quantize_dynamic INT8, qexport ORT INT8,
             TVM FP32 and qexport TVM INT8 at one shape, few runs; the headline is the fastest
             exact qexport INT8 row against the fastest FP32 row

Tokenised splits are cached in ``OUT/cache`` (keyed by tokenizer, task, split, max length and
the rows' content), and a finished training run in ``OUT/train`` is reused, so a second
``make demo`` starts at the export. The last screen is a short table (:func:`summary_table`);
``summary.json`` holds the same numbers, rounded.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from qexport.errors import BackendError

console = Console(stderr=True)

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_EVERY_S = 15.0
#: Recipe overrides the demo applies before the user's ``--set``: the resumable training state
#: (model + AdamW moments, ~270 MB for MiniLM) is written every 50 steps instead of every 25
#: (this changes no result: no RNG is drawn, the best model is saved at every evaluation anyway);
#: training rows are batched by length and AdamW runs fused, which halves the training time on a
#: 2-core CPU (rt's rows average 27 tokens, a random batch of 16 is padded to ~51) and gives
#: results of its own (the README has both the demo's and the recipe's numbers).
DEMO_OVERRIDES = ("train.save_every=50", "train.group_by_length=true", "train.fused_adamw=true")
#: Threads of the demo's latency rows: one, because on a 2-core machine the interleaved runtimes'
#: spinning thread pools distort 2-thread timings (the README's table has both).
REPORT_THREADS = 1


@contextlib.contextmanager
def progress(description: str, total: int, out: Console | None = None) -> Iterator[Callable[[int], None]]:
    """``advance(n)`` for a stage of ``total`` units: a rich bar with an ETA on a terminal, else a
    plain line at most every :data:`PLAIN_EVERY_S` seconds and one at the end."""
    con = out or console
    if con.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("ETA"), TimeRemainingColumn(), console=con,
        ) as bar:
            task = bar.add_task(description, total=total)
            yield lambda n: bar.advance(task, n)
        return
    t0 = time.perf_counter()
    state = {"done": 0, "last": t0}

    def advance(n: int) -> None:
        state["done"] += n
        now = time.perf_counter()
        done = int(state["done"])
        if done < total and now - state["last"] < PLAIN_EVERY_S:
            return
        state["last"] = now
        elapsed = now - t0
        if done >= total:
            con.print(f"{description}: {done}/{total} done in {elapsed:.0f} s", highlight=False)
        else:
            eta = (total - done) * elapsed / max(done, 1)
            con.print(f"{description}: {done}/{total} ({100 * done // max(total, 1)}%), ETA {eta:.0f} s",
                      highlight=False)

    yield advance


class _Clock:
    """Per-stage wall and CPU times (this process, all threads): ``with clock("train", title): ...``."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str, title: str) -> Iterator[None]:
        console.rule(f"[bold]{title}")
        t, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.stages[name] = round(time.perf_counter() - t, 1)
            self.cpu[name] = round(time.process_time() - c, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def _split_rows(task: str, split: str, limit: int | None) -> int:
    from qexport.data import get_task

    n = len(get_task(task).load(split))
    return n if limit is None else min(n, limit)


def _parity(ckpt: Path, backend: str, artifact: Path, task: str, split: str, limit: int | None,
            max_length: int, out_dir: Path) -> dict[str, Any]:
    from qexport.verify import verify

    n = _split_rows(task, split, limit)
    with progress(f"{backend} parity", n) as advance:
        res = verify(ckpt, backend, artifact, task, split=split, limit=limit, max_length=max_length,
                     out_dir=out_dir, on_batch=advance)
    return {"examples": res["examples"], "mismatches": res["mismatches"], "max_abs_diff": res["max_abs_diff"],
            "seconds": res["seconds"], "file": str(out_dir / "parity.json")}


def _round(x: Any, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


def _headline_point(head: dict[str, Any], precision: str) -> dict[str, Any] | None:
    """The report headline's row of one precision: the fastest exact qexport INT8 row, or the
    fastest FP32 row (see :func:`qexport.report.latency.headline`)."""
    if head.get(f"{precision}_ms") is None:
        return None
    return {"row": head[f"{precision}_row"], "ms": round(float(head[f"{precision}_ms"]), 2),
            "batch": head["batch"], "seq": head["seq"]}


def run_demo(
    out: Path,
    recipe: Path,
    overrides: list[str],
    parity_limit: int | None = 256,
    tvm_parity_limit: int | None = 64,
    *,
    tvm: bool = True,
    report: bool = True,
    report_batches: tuple[int, ...] = (8,),
    report_seqs: tuple[int, ...] = (64,),
    report_iters: int = 10,
    report_backends: tuple[str, ...] = ("torch", "ort", "tvm"),
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary (also ``out/summary.json``).

    ``tvm=False`` / ``report=False`` leave those stages out (tests); the report measures
    ``report_batches`` x ``report_seqs`` with ``report_iters`` timed runs per row.
    """
    from qexport.config import load_recipe
    from qexport.evaluation import evaluate, load_tokenizer, reference_predictor, runner_predictor
    from qexport.io import atomic_write_json
    from qexport.train import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clock = _Clock()
    rec = load_recipe(recipe, [*DEMO_OVERRIDES, *overrides])
    split = rec.train.test_split or rec.train.eval_split
    limit = rec.train.test_limit if rec.train.test_split else rec.train.eval_limit
    summary: dict[str, Any] = {
        "recipe": str(recipe), "overrides": [*DEMO_OVERRIDES, *overrides], "task": rec.task, "split": split,
        "max_length": rec.max_length,
    }
    files: dict[str, Any] = {}

    with clock("train", "train: FP fine-tuning -> QAT -> integer checkpoint"):
        train_dir = out / "train"
        tr = train(rec, train_dir, resume=train_dir.exists(), final_int_eval=False,
                   token_cache=out / "cache")
    ckpt = train_dir / "checkpoint"
    files["checkpoint"] = str(ckpt)
    files["training_curve"] = str(train_dir / "training_curve.png")

    with clock("size", "size"):
        from qexport.report.size import checkpoint_size

        size = checkpoint_size(ckpt)
        summary["size"] = {"bytes": size["bytes"], "fp32_bytes": size["fp32_bytes"],
                           "ratio_vs_fp32": round(float(size["ratio_vs_fp32"]), 2)}

    with clock("onnx", "ONNX export (functions + flat)"):
        from qexport.export.exporter import export_onnx

        onnx_fn = export_onnx(ckpt, out / "model.functions.onnx", form="functions", linear="qdq")
        # the flat form with integer linears: what TVM builds here and what the report times
        onnx_flat = export_onnx(ckpt, out / "model.flat.onnx", form="flat", linear="integer") if tvm else None
        files["onnx"] = str(onnx_fn)

    parity: dict[str, Any] = {}
    with clock("ort", "ONNX Runtime: parity, then the test split"):
        from qexport.backends import get_backend

        parity["ort"] = _parity(ckpt, "ort", onnx_fn, rec.task, split, parity_limit, rec.max_length,
                                out / "parity-ort")
        tok = load_tokenizer(ckpt)
        if parity["ort"]["mismatches"] == 0:
            predictor, scorer = runner_predictor(get_backend("ort").load(onnx_fn), "logits"), "ort"
        else:  # not proven exact: score the integer model with the reference itself (slow)
            from qexport.models.integer import IntegerModel

            predictor, scorer = reference_predictor(IntegerModel.from_checkpoint(ckpt)), "torch reference"
        n = _split_rows(rec.task, split, limit)
        with progress(f"integer model on {rec.task}:{split} ({scorer})", n) as advance:
            ev = evaluate(predictor, rec.task, tok, split, limit=limit, batch_size=64,
                          max_length=rec.max_length, on_batch=advance)
    metric = None if ev.metric is None else round(float(ev.metric["metric"]), 2)
    summary["accuracy"] = {
        "metric": tr.get("metric_name", "metric"),
        "fp": None if tr.get("fp_metric") is None else round(float(tr["fp_metric"]), 2),
        "qat": None if tr.get("qat_metric") is None else round(float(tr["qat_metric"]), 2),
        "integer": metric,
        "integer_scored_by": scorer,
        "examples": ev.examples,
    }
    if (train_dir / "fp").is_dir():
        with clock("dynamic", "the CPU user's INT8 route: ORT quantize_dynamic of the FP model"):
            from qexport.report.baselines import dynamic_int8_accuracy

            dyn = dynamic_int8_accuracy(train_dir / "fp", rec.task, split, limit=limit, batch_size=64,
                                        max_length=rec.max_length, work_dir=out / "dynamic-int8")
            summary["accuracy"]["dynamic_int8"] = (
                None if dyn.get("metric") is None else round(float(dyn["metric"]), 2)
            )

    prebuilt: dict[str, Path] = {}
    if tvm:
        with clock("tvm", "TVM (llvm): build + parity"):
            ok, why = get_backend("tvm").available()
            if not ok:
                parity["tvm"] = {"skipped": why}
            else:
                assert onnx_flat is not None
                if report:
                    # TVM's thread pool reads this once, at its first parallel call (the parity
                    # run below): the report's TVM rows must run on the report's threads too
                    os.environ.setdefault("TVM_NUM_THREADS", str(REPORT_THREADS))
                tvm_dir = get_backend("tvm").compile(onnx_flat, out / "tvm-llvm", target="llvm")
                prebuilt["tvm-int8-cpu"] = tvm_dir  # the report times this library
                parity["tvm"] = _parity(ckpt, "tvm", tvm_dir, rec.task, split, tvm_parity_limit,
                                        rec.max_length, out / "parity-tvm")
    summary["parity"] = parity

    if report:
        with clock("report", "CPU latency report"):
            from qexport.report.latency import run_report

            try:
                rep = run_report(ckpt, None, list(report_backends), "cpu", list(report_batches),
                                 list(report_seqs), report_iters, out / "report", warmup=2,
                                 point_budget_s=10.0, threads=REPORT_THREADS, prebuilt=prebuilt)
            except BackendError as exc:
                rep = {"rows": [], "error": str(exc)}
            head = rep.get("headline", {})
            summary["cpu_latency"] = {
                "int8": _headline_point(head, "int8"), "fp32": _headline_point(head, "fp32"),
                "fp32_over_int8": _round(head.get("cpu_speedup_int8_vs_fp32"), 2),
                "dynamic_ms": _round(head.get("dynamic_ms"), 2),
                "dynamic_over_int8": _round(head.get("cpu_speedup_int8_vs_dynamic"), 2),
                "iters": report_iters,
                "threads": REPORT_THREADS,
            }
            files["report"] = rep.get("report_md")
            files["report_json"] = rep.get("report_json")
            files["plots"] = list(rep.get("plots", []))

    summary["timings_s"] = {**clock.stages, "total": clock.total()}
    summary["cpu_s"] = clock.cpu
    summary["machine"] = {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    files["summary"] = str(out / "summary.json")
    summary["files"] = files
    atomic_write_json(out / "summary.json", summary)
    return summary


def _fmt(x: float | None, nd: int) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def summary_table(s: dict[str, Any]) -> Table:
    """The demo's last screen: what a person reads in ten seconds (rounded numbers, file paths)."""
    acc = s.get("accuracy", {})
    t = Table(title=f"qexport demo: {s.get('task')}:{s.get('split')} ({acc.get('examples', '?')} examples)",
              show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row(f"{acc.get('metric', 'metric')} (%)",
              f"FP {_fmt(acc.get('fp'), 2)}   QAT {_fmt(acc.get('qat'), 2)}   "
              f"integer {_fmt(acc.get('integer'), 2)} (scored by {acc.get('integer_scored_by')})")
    if acc.get("dynamic_int8") is not None:
        t.add_row("ORT quantize_dynamic", f"{_fmt(acc['dynamic_int8'], 2)} (the FP model, float "
                                          "nonlinear ops, dynamic INT8 matmuls; not integer-only)")
    size = s.get("size")
    if size:
        t.add_row("size", f"{size['bytes'] / 1e6:.1f} MB vs {size['fp32_bytes'] / 1e6:.1f} MB FP32: "
                          f"{size['ratio_vs_fp32']:.2f}x smaller")
    for name, p in s.get("parity", {}).items():
        if "skipped" in p:
            t.add_row(f"parity {name}", f"skipped: {p['skipped']}")
        else:
            ok = "[green]bit-exact[/]" if p["mismatches"] == 0 else "[red]MISMATCH[/]"
            t.add_row(f"parity {name}", f"{p['examples']} examples, {p['mismatches']} mismatched "
                                        f"logits_int elements: {ok}")
    lat = s.get("cpu_latency")
    if lat:
        i8, f32 = lat.get("int8"), lat.get("fp32")
        if i8 and f32:
            t.add_row("CPU latency", f"INT8 {i8['ms']:.1f} ms ({i8['row']}) vs FP32 {f32['ms']:.1f} ms "
                                     f"({f32['row']}), batch {i8['batch']}, seq {i8['seq']}, "
                                     f"{lat.get('threads', '?')} thread(s): "
                                     f"INT8 {lat['fp32_over_int8']:.2f}x as fast")
            if lat.get("dynamic_ms") is not None:
                t.add_row("", f"ORT quantize_dynamic {lat['dynamic_ms']:.1f} ms: qexport "
                              f"{lat['dynamic_over_int8']:.2f}x as fast")
        else:
            t.add_row("CPU latency", "not measured (see the report)")
    tm = s.get("timings_s", {})
    if tm:
        parts = ", ".join(f"{k} {v:.0f} s" for k, v in tm.items() if k != "total")
        t.add_row("time", f"{tm.get('total', 0) / 60:.1f} min ({parts})")
    f = s.get("files", {})
    for label, key in (("report", "report"), ("summary", "summary"), ("checkpoint", "checkpoint")):
        if f.get(key):
            t.add_row(label, str(f[key]))
    plots = [p for p in [f.get("training_curve"), *f.get("plots", [])] if p]
    if plots:
        t.add_row("plots", "\n".join(str(p) for p in plots))
    return t

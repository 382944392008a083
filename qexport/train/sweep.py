"""Run several recipes and compare them (the seeds' sweep over presets and tasks).

``run_sweep(recipes, out_dir)`` trains each recipe into ``out_dir/<recipe stem>/`` (a finished
run is reused, an interrupted one resumed; recipes whose FP stage is the same, e.g. the six presets
on one task, train it once and the others start from it), then writes:

* ``sweep.json``: one row per recipe (task, preset, quantized groups, quantizer, weight bits,
  distillation, precision schedule, fp/qat/int metric and the integer model's drop from FP, training
  time, QAT/FP step-time ratio, true size of the integer checkpoint from its manifest's byte counts);
* ``sweep.md``: the same as a markdown table (the seeds' tables: accuracy per combination, layer
  group and bit width, with and without KD, per cyclic schedule);
* ``accuracy.png``: metric per combination (bar; FP and integer side by side);
* ``time_vs_accuracy.png``: training time vs metric (scatter, labelled);
* ``size_vs_accuracy.png``: true integer checkpoint size vs metric (scatter, labelled);
* ``training_curves.png``: dev metric over training steps of every run (FP then QAT).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qexport.config import load_recipe
from qexport.io import atomic_write_json, atomic_write_text
from qexport.train.plots import save_figure
from qexport.train.state import load_state


def _manifest_size(ckpt: Path) -> dict[str, Any]:
    mf = ckpt / "manifest.json"
    if not mf.is_file():
        return {}
    m = json.loads(mf.read_text())
    return {
        "size_bytes": m.get("total_bytes"),
        "size_by_part": m.get("bytes"),
        "file_bytes": m.get("file_bytes"),
    }


def _row(recipe_path: Path, out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    rec = load_recipe(recipe_path)
    metric = summary.get("int_metric", summary.get("fp_metric"))
    w, sched = rec.quant.weights, rec.quant.schedule
    fp_m, int_m = summary.get("fp_metric"), summary.get("int_metric")
    row: dict[str, Any] = {
        "recipe": recipe_path.stem,
        "task": rec.task,
        "model": rec.model,
        "preset": rec.quant.preset,
        "weight_bits": (w.bits if w is not None else rec.quant.weight_bits) if rec.runs_qat else 32,
        "groups": (w.groups if w is not None else "ALL+EMB") if rec.runs_qat else "-",
        "quantizer": (w.quantizer if w is not None else "minmax") if rec.runs_qat else "-",
        "mode": w.mode if w is not None else "fully",
        "kd": rec.distillation.enabled,
        "schedule": "+".join(
            x for x in (f"cpt {sched.cyclic}" if sched.cyclic else "",
                        f"latent {sched.latent_steps}" if sched.latent_steps else "") if x
        ) or "-",
        "drop": (fp_m - int_m) if (fp_m is not None and int_m is not None) else None,
        "metric_name": summary.get("metric_name", "metric"),
        "fp_metric": summary.get("fp_metric"),
        "qat_metric": summary.get("qat_metric"),
        "int_metric": summary.get("int_metric"),
        "metric": metric,
        "train_time_s": summary.get("train_time_s"),
        "wall_time_s": summary.get("wall_time_s"),
        "qat_step_time_ratio": summary.get("qat_step_time_ratio"),
        "out_dir": str(out),
    }
    if summary.get("checkpoint"):
        row.update(_manifest_size(Path(summary["checkpoint"])))
    return row


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mb(x: Any) -> str:
    return "-" if not x else f"{x / 1e6:.2f}"


def sweep_markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| recipe | task | preset | groups | quantizer | bits | KD | schedule | FP | QAT | integer "
        "| drop | train time (s) | QAT/FP step time | int size (MB) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['recipe']} | {r['task']} | {r['preset']} | {r.get('groups', '-')} "
        f"| {r.get('quantizer', '-')} "
        f"| {r['weight_bits']} | {'yes' if r.get('kd') else 'no'} | {r.get('schedule', '-')} "
        f"| {_fmt(r['fp_metric'])} | {_fmt(r['qat_metric'])} | {_fmt(r['int_metric'])} "
        f"| {_fmt(r.get('drop'))} "
        f"| {_fmt(r['train_time_s'], 1)} | {_fmt(r['qat_step_time_ratio'])} | {_mb(r.get('size_bytes'))} |"
        for r in rows
    ]
    name = rows[0]["metric_name"] if rows else "metric"
    return f"# Sweep\n\nMetric: {name} (%), on each recipe's test split.\n\n{head}" + "\n".join(lines) + "\n"


def _scatter(rows: list[dict[str, Any]], key: str, scale: float, xlabel: str, title: str, path: Path) -> Path:
    """Metric against ``row[key] * scale``, one labelled point per recipe."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        if not r.get(key) or r["metric"] is None:
            continue
        x = r[key] * scale
        ax.scatter([x], [r["metric"]])
        ax.annotate(r["recipe"], (x, r["metric"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("metric (%)")
    ax.set_title(title)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def plot_sweep(rows: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """The seeds' two plots: metric per combination (bar) and training time vs metric (scatter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths: list[Path] = []
    labels = [r["recipe"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows)), 4))
    xs = range(len(rows))
    fp = [r["fp_metric"] or 0.0 for r in rows]
    integer = [r["int_metric"] if r["int_metric"] is not None else float("nan") for r in rows]
    ax.bar([x - 0.2 for x in xs], fp, width=0.4, label="FP")
    ax.bar([x + 0.2 for x in xs], integer, width=0.4, label="integer")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{rows[0]['metric_name'] if rows else 'metric'} (%)")
    ax.set_title("Accuracy per combination")
    # zoom on the range the values span (differences of a point are the story, not 0-100)
    vals = [v for v in fp + integer if v == v and v > 0]
    if vals:
        lo, hi = min(vals), max(vals)
        ax.set_ylim(max(0.0, lo - max(2.0, 0.5 * (hi - lo))), min(100.0, hi + max(1.0, 0.3 * (hi - lo))))
        for x, v in zip(xs, integer, strict=True):
            if v == v:
                ax.annotate(f"{v:.2f}", (x + 0.2, v), ha="center", va="bottom", fontsize=7)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    try:
        paths.append(save_figure(fig, out_dir / "accuracy.png"))
    finally:
        plt.close(fig)

    paths.append(_scatter(rows, "train_time_s", 1.0, "training time (s)", "Training time vs accuracy",
                          out_dir / "time_vs_accuracy.png"))
    paths.append(_scatter(rows, "size_bytes", 1e-6, "integer checkpoint size (MB)", "Size vs accuracy",
                          out_dir / "size_vs_accuracy.png"))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        mf = Path(r["out_dir"]) / "metrics.json"
        hist = json.loads(mf.read_text()) if mf.is_file() else []
        # one x axis: QAT steps continue after the FP stage's last step
        fp_end = max((h["step"] for h in hist if h["stage"] == "fp"), default=0)
        xs_ = [h["step"] + (fp_end if h["stage"] == "qat" else 0) for h in hist]
        if xs_:
            ax.plot(xs_, [h["metric"] for h in hist], marker=".", label=r["recipe"])
    ax.set_xlabel("training step (FP, then QAT)")
    ax.set_ylabel("dev metric (%)")
    ax.set_title("Training curves")
    if rows:
        ax.legend(fontsize=7)
    try:
        paths.append(save_figure(fig, out_dir / "training_curves.png"))
    finally:
        plt.close(fig)
    return paths


def _finished_fp_stages(out_dir: Path) -> list[tuple[dict[str, Any], Path]]:
    """FP stages finished by earlier runs in ``out_dir`` (a later sweep in the same directory reuses them)."""
    from qexport.config import validate_recipe
    from qexport.errors import QexportError
    from qexport.train.trainer import fp_stage_key

    found: list[tuple[dict[str, Any], Path]] = []
    for d in sorted(p for p in out_dir.iterdir() if (p / "state").is_dir() and (p / "fp").is_dir()):
        try:
            st = load_state(d)
            if st is not None and "fp" in st.get("results", {}) and st.get("stage") != "fp":
                found.append((fp_stage_key(validate_recipe(st["recipe"])), d))
        except QexportError:
            continue  # an unreadable or outdated run is just not reused
    return found


def run_sweep(recipes: list[Path], out_dir: Path, device: str | None = None) -> Path:
    """Train every recipe (reusing finished runs), write the comparison; return ``sweep.md``'s path."""
    from qexport.train.trainer import fp_stage_key, train

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    # (FP stage key, run dir) of finished FP stages: earlier runs in out_dir, then this sweep's
    fp_done: list[tuple[dict[str, Any], Path]] = _finished_fp_stages(out_dir)
    for path in recipes:
        path = Path(path)
        rec = load_recipe(path)
        run_dir = out_dir / path.stem
        done = run_dir / "summary.json"
        st = load_state(run_dir) if (run_dir / "state").is_dir() else None
        same = st is not None and st["recipe"] == rec.dump()
        key = fp_stage_key(rec)
        if same and done.is_file() and st is not None and st.get("stage") == "done":
            summary = json.loads(done.read_text())
        else:  # resume an interrupted run of the same recipe, else start afresh (reusing an equal FP stage)
            fp_from = next((d for k, d in fp_done if k == key), None)
            summary = train(rec, run_dir, resume=same, device=device, fp_from=fp_from)
        if rec.runs_fp:
            fp_done.append((key, run_dir))
        rows.append(_row(path, run_dir, summary))
        atomic_write_json(out_dir / "sweep.json", rows)
    md = out_dir / "sweep.md"
    atomic_write_text(md, sweep_markdown(rows))
    plot_sweep(rows, out_dir)
    return md

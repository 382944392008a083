"""Turning a report document into sizes, speedup tables (I-BERT Table 3 form), Markdown and plots.

Speedup of an INT8 row over a baseline row at one (batch, seq) is
``baseline median / INT8 median``; "Avg." is the arithmetic mean over the grid, as in
I-BERT's Table 3. Each INT8 row is compared with the same runtime's FP32 and FP16 rows
(the paper's comparison) and with PyTorch's eager FP32/FP16 (what users start from).
Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qexport.io import atomic_path
from qexport.report.size import PARTS

MB = 1e6


def artifact_sizes(rows: Sequence[dict[str, Any]], size: dict[str, Any]) -> list[dict[str, Any]]:
    """True on-disk size of every measured artifact next to FP32/FP16 of the same parameters."""
    fp32, fp16 = int(size["fp32_bytes"]), int(size["fp16_bytes"])

    def entry(name: str, path: str | None, nbytes: int, **kw: Any) -> dict[str, Any]:
        return {
            "name": name,
            "path": path,
            "bytes": nbytes,
            "fp32_bytes": fp32,
            "fp16_bytes": fp16,
            "vs_fp32": fp32 / nbytes if nbytes else None,
            "vs_fp16": fp16 / nbytes if nbytes else None,
            **kw,
        }

    out = [
        entry("integer checkpoint (tensors)", size["path"], int(size["bytes"]), kind="checkpoint"),
        entry(
            "integer checkpoint (model.safetensors file)",
            size["path"],
            int(size["file_bytes"]),
            kind="checkpoint-file",
        ),
    ]
    seen: set[str] = set()
    for r in rows:
        path, nbytes = r.get("artifact"), r.get("artifact_bytes")
        if not path or not nbytes or path in seen:
            continue
        seen.add(path)
        users = [x["label"] for x in rows if x.get("artifact") == path]
        kind = "onnx" if path.endswith(".onnx") else "trt-plan" if path.endswith(".plan") else "tvm-lib"
        out.append(entry(f"{' / '.join(users)}: {Path(path).name}", path, int(nbytes), kind=kind))
    return out


def _ok_point(row: dict[str, Any], b: int, s: int) -> dict[str, Any] | None:
    if row.get("status") != "ok":
        return None
    return next((p for p in row["points"] if p["batch"] == b and p["seq"] == s and p["status"] == "ok"), None)


def speedups(
    rows: Sequence[dict[str, Any]], batches: Sequence[int], seqs: Sequence[int]
) -> list[dict[str, Any]]:
    """For each INT8 row and each baseline that ran: speedup per (seq, batch) and the average."""
    by_key = {r["key"]: r for r in rows}
    out: list[dict[str, Any]] = []
    for r in rows:
        if r["precision"] != "int8" or r["status"] != "ok":
            continue
        rt = r["runtime"]
        bases = [f"{rt}-fp32", f"{rt}-fp16", "torch-eager-fp32", "torch-eager-fp16"]
        if r["key"] != "ort-dynamic-int8":  # qexport's integer rows against the CPU user's INT8 route
            bases.append("ort-dynamic-int8")
        for bk in dict.fromkeys(bases):
            base = by_key.get(bk)
            if base is None or base["status"] != "ok":
                continue
            pts: list[dict[str, Any]] = []
            for s in seqs:
                for b in batches:
                    i8, fb = _ok_point(r, b, s), _ok_point(base, b, s)
                    if i8 is not None and fb is not None:
                        pts.append({"batch": b, "seq": s, "speedup": fb["median_ms"] / i8["median_ms"]})
            if pts:
                out.append(
                    {
                        "int8": r["key"],
                        "baseline": bk,
                        "label": f"{r['label']} vs {base['label']}",
                        "same_runtime": base["runtime"] == rt,
                        "points": pts,
                        "avg": sum(p["speedup"] for p in pts) / len(pts),
                    }
                )
    return out


# ----------------------------------------------------------------------------- markdown


def _mb(n: float | None) -> str:
    return "-" if n is None else f"{n / MB:.2f}"


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return lines


def _grid(doc: dict[str, Any]) -> list[tuple[int, int]]:
    st = doc["settings"]
    return [(b, s) for s in st["seqs"] for b in st["batches"]]


def _cell(row: dict[str, Any], b: int, s: int, what: str) -> str:
    p = next((p for p in row["points"] if p["batch"] == b and p["seq"] == s), None)
    if p is None:
        return "-"
    if p["status"] != "ok":
        return p["status"]
    if what == "latency":
        star = f" *{p['iters']}" if p.get("budget_hit") else ""
        return f"{p['median_ms']:.2f} ({p['p10_ms']:.2f}-{p['p90_ms']:.2f}){star}"
    return _mb(p.get("peak_mem_bytes"))


def markdown(doc: dict[str, Any]) -> str:
    """report.md: headline, sizes, latency, I-BERT Table 3 speedups, memory, skipped rows."""
    hw, st, size = doc["hardware"], doc["settings"], doc["size"]["checkpoint"]
    m = doc["model"]
    gpu = hw.get("gpu")
    lines = [
        "# qexport report",
        "",
        f"- checkpoint: `{doc['checkpoint']}` ({m['arch']}, {m['layers']} layers x {m['hidden']} hidden, "
        f"{m['params'] / 1e6:.1f} M params, preset {size.get('preset')}, bits {size.get('bits')})",
        f"- device: **{st['device']}**; CPU {hw['cpu']} ({hw['logical_cores']} logical cores); "
        f"GPU {gpu['name'] if gpu else 'none'}; load average at start {hw.get('loadavg_at_start')}, "
        f"at end {hw.get('loadavg_at_end')}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v),
        f"- timing: {st['iters']} timed runs after {st['warmup']} warm-up runs per point "
        f"(a point over {st.get('point_budget_s')} s stops early: marked *); {st['timing']}; "
        f"random token ids, full attention mask; threads {st.get('threads') or 'runtime default'} "
        f"(torch default {doc.get('threads', {}).get('torch')})",
        "",
    ]
    h = doc.get("headline", {})
    lines += ["## Headline", ""]
    lines.append(
        f"- true size: {_mb(size['bytes'])} MB vs FP32 {_mb(size['fp32_bytes'])} MB "
        f"(**{size['ratio_vs_fp32']:.2f}x smaller**) and FP16 {_mb(size['fp16_bytes'])} MB "
        f"({size['ratio_vs_fp16']:.2f}x)"
    )
    if h.get("cpu_speedup_int8_vs_fp32") is not None:
        lines.append(
            f"- CPU: {h['int8_row']} {h['int8_ms']:.2f} ms vs {h['fp32_row']} {h['fp32_ms']:.2f} ms at "
            f"batch {h['batch']}, seq {h['seq']}: **{h['cpu_speedup_int8_vs_fp32']:.2f}x**"
        )
        if h.get("dynamic_ms") is not None:
            lines.append(
                f"- vs ORT `quantize_dynamic` INT8 {h['dynamic_ms']:.2f} ms: "
                f"**{h['cpu_speedup_int8_vs_dynamic']:.2f}x**"
            )
    else:
        lines.append(f"- CPU speedup qexport INT8 vs FP32: not measured ({h.get('reason', 'n/a')})")
    lines.append("")

    lines += ["## True size", "", "Checkpoint by part (MB):", ""]
    body = [
        [p, _mb(d["bytes"]), _mb(d["fp32_bytes"]), _mb(d["fp16_bytes"])] for p, d in size["parts"].items()
    ]
    body.append(["**total**", _mb(size["bytes"]), _mb(size["fp32_bytes"]), _mb(size["fp16_bytes"])])
    lines += _table(["part", "stored", "FP32", "FP16"], body) + ["", "Artifacts on disk:", ""]
    body = [
        [
            a["name"],
            _mb(a["bytes"]),
            f"{a['vs_fp32']:.2f}x" if a["vs_fp32"] else "-",
            f"{a['vs_fp16']:.2f}x" if a["vs_fp16"] else "-",
        ]
        for a in doc["size"]["artifacts"]
    ]
    lines += _table(["artifact", "MB", "smaller than FP32", "smaller than FP16"], body) + [""]

    grid = _grid(doc)
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    cols = [f"BS={b} SL={s}" for b, s in grid]
    if ok:
        lines += ["## Latency", "", "Median ms per batch (p10-p90):", ""]
        lines += _table(
            ["row", *cols], [[r["label"], *(_cell(r, b, s, "latency") for b, s in grid)] for r in ok]
        )
        lines.append("")
    sp = doc.get("speedups", [])
    if sp:
        seqs, batches = st["seqs"], st["batches"]
        lines += [
            "## INT8 speedup (I-BERT Table 3 form)",
            "",
            "Speedup = baseline median / INT8 median, per sequence length (SL) and batch size (BS).",
            "",
        ]
        header = ["INT8 vs", *(f"SL={s} BS={b}" for s in seqs for b in batches), "Avg."]
        body = []
        for e in sp:
            vals = {(p["seq"], p["batch"]): p["speedup"] for p in e["points"]}
            cells = [f"{vals[(s, b)]:.2f}" if (s, b) in vals else "-" for s in seqs for b in batches]
            body.append([e["label"], *cells, f"{e['avg']:.2f}"])
        lines += _table(header, body) + [""]
    if ok:
        lines += [
            "## Peak memory",
            "",
            "MB above the process/device usage before the runtime was loaded:",
            "",
        ]
        lines += _table(
            ["row", *cols, "source"],
            [
                [
                    r["label"],
                    *(_cell(r, b, s, "mem") for b, s in grid),
                    next((p["mem_source"] for p in r["points"] if p.get("mem_source")), "-"),
                ]
                for r in ok
            ],
        )
        lines.append("")
    notes = [(r["label"], n) for r in doc["rows"] for n in r.get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {lab}: {n}" for lab, n in notes] + [""]
    bad = [r for r in doc["rows"] if r["status"] != "ok"]
    bad_pts = [(r, p) for r in ok for p in r["points"] if p["status"] != "ok"]
    if bad or bad_pts:
        lines += ["## Not measured", ""]
        body = [[r["label"], r["status"], str(r["reason"]).replace("|", "/")] for r in bad]
        body += [
            [f"{r['label']} BS={p['batch']} SL={p['seq']}", p["status"], str(p["reason"]).replace("|", "/")]
            for r, p in bad_pts
        ]
        lines += _table(["row", "status", "reason"], body) + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plots


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def plots(doc: dict[str, Any], out_dir: Path) -> list[Path]:
    """latency.png (grouped bars per batch/seq), speedup.png (per batch), size.png (stacked by part)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir = Path(out_dir)
    st = doc["settings"]
    grid = _grid(doc)
    written: list[Path] = []
    title = f"{doc['model']['arch']} {doc['model']['layers']}x{doc['model']['hidden']} on {st['device']}"

    # latency: one group per (batch, seq), one bar per row that ran
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(grid) * max(1, len(ok)) / 3 + 3), 4.5))
    if ok:
        width = 0.8 / len(ok)
        x = np.arange(len(grid))
        vals_all: list[float] = []
        for i, r in enumerate(ok):
            pts = [_ok_point(r, b, s) for b, s in grid]
            med = [p["median_ms"] if p else np.nan for p in pts]
            lo = [p["median_ms"] - p["p10_ms"] if p else 0.0 for p in pts]
            hi = [p["p90_ms"] - p["median_ms"] if p else 0.0 for p in pts]
            vals_all += [v for v in med if v == v]
            ax.bar(
                x + (i - (len(ok) - 1) / 2) * width, med, width, yerr=[lo, hi], capsize=2, label=r["label"]
            )
        ax.set_xticks(x, [f"BS={b}\nSL={s}" for b, s in grid])
        if vals_all and max(vals_all) / max(min(vals_all), 1e-9) > 30:
            ax.set_yscale("log")
        ax.set_ylabel("median latency (ms), p10-p90")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no row ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Latency: {title}")
    written.append(_save(fig, out_dir / "latency.png"))
    plt.close(fig)

    # speedup per batch: one panel per sequence length
    sp = doc.get("speedups", [])
    seqs = st["seqs"]
    fig, axes = plt.subplots(1, len(seqs), figsize=(max(5.0, 4.5 * len(seqs)), 4), squeeze=False)
    for ax, s in zip(axes[0], seqs, strict=True):
        if sp:
            width = 0.8 / len(sp)
            x = np.arange(len(st["batches"]))
            for i, e in enumerate(sp):
                vals = {p["batch"]: p["speedup"] for p in e["points"] if p["seq"] == s}
                ax.bar(
                    x + (i - (len(sp) - 1) / 2) * width,
                    [vals.get(b, np.nan) for b in st["batches"]],
                    width,
                    label=e["label"],
                )
            ax.set_xticks(x, [str(b) for b in st["batches"]])
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xlabel("batch size")
            ax.set_ylabel("speedup (x)")
        else:
            ax.text(0.5, 0.5, "no INT8/baseline pair ran", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"INT8 speedup, SL={s}")
    if sp:
        axes[0][0].legend(fontsize=7)
    written.append(_save(fig, out_dir / "speedup.png"))
    plt.close(fig)

    # size: FP32 / FP16 / checkpoint stacked by part, artifacts as whole files
    size = doc["size"]["checkpoint"]
    arts = [a for a in doc["size"]["artifacts"] if not a.get("kind", "").startswith("checkpoint")]
    labels = ["FP32", "FP16", "INT checkpoint"] + [Path(a["path"]).name for a in arts]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.5))
    bottom = np.zeros(len(labels))
    for p in PARTS:
        part = size["parts"][p]
        seg = np.array([part["fp32_bytes"], part["fp16_bytes"], part["bytes"]] + [0] * len(arts), dtype=float)
        seg /= MB
        ax.bar(labels, seg, bottom=bottom, label=p)
        bottom += seg
    if arts:
        whole = np.array([0, 0, 0] + [a["bytes"] for a in arts], dtype=float) / MB
        ax.bar(labels, whole, bottom=bottom, label="whole artifact file", color="lightgray", hatch="//")
    ax.set_ylabel("MB")
    ax.set_title(f"True size: {title} ({size['ratio_vs_fp32']:.2f}x smaller than FP32)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    written.append(_save(fig, out_dir / "size.png"))
    plt.close(fig)
    return written

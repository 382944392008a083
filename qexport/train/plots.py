"""Training-curve plot (matplotlib, Agg): train loss and dev metric per evaluation, per stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexport.io import atomic_path


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure atomically (:func:`qexport.io.atomic_path`)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def plot_training_curve(history: list[dict[str, Any]], path: Path, title: str = "") -> Path | None:
    """Two panels over global steps (FP then QAT): train loss and the dev metric. None if no rows."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    offset = 0
    for stage in ("fp", "qat"):
        rows = [r for r in history if r["stage"] == stage]
        if not rows:
            continue
        xs = [offset + r["step"] for r in rows]
        ax_loss.plot(xs, [r["loss"] for r in rows], marker=".", label=f"{stage} train")
        ax_loss.plot(xs, [r["eval_loss"] for r in rows], marker="x", linestyle="--", label=f"{stage} dev")
        ax_metric.plot(xs, [r["metric"] for r in rows], marker="o", label=stage)
        offset = xs[-1]
    ax_loss.set_xlabel("step (FP, then QAT)")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_metric.set_xlabel("step (FP, then QAT)")
    ax_metric.set_ylabel(f"dev {history[0].get('metric_name', 'metric')} (%)")
    ax_metric.legend()
    if title:
        fig.suptitle(title)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)

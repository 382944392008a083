"""Kill a real training process and resume it: the result is bitwise equal to an uninterrupted run.

``python -m qexport.train`` runs a tiny recipe (2-layer BERT, synthetic CSV task, FP then QAT).
The interrupted run is SIGKILLed twice - right after its first state save (FP stage) and again
once the QAT stage has saved a state - and resumed with ``--resume`` each time.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.tiny import make_tiny_model, make_tiny_task, tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
    )
    env.pop("WORLD_SIZE", None)
    return env


def _cmd(recipe: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "qexport.train", str(recipe), "-o", str(out), "--device", "cpu", *extra]


def _progress(out: Path) -> dict[str, Any] | None:
    p = out / "state" / "progress.json"
    try:
        return dict(json.loads(p.read_text()))
    except (OSError, json.JSONDecodeError):
        return None


def _run_until(cmd: list[str], out: Path, cond: Any, timeout: float = 120.0) -> dict[str, Any]:
    """Start ``cmd``, SIGKILL it as soon as ``cond(progress)`` holds; return that progress."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < timeout:
            prog = _progress(out)
            if prog is not None and cond(prog):
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return prog
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"training ended (rc {proc.returncode}) before the kill point:\n{err[-3000:]}")
            time.sleep(0.02)
        pytest.fail("kill point not reached in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    raise AssertionError("unreachable")


def _finish(cmd: list[str]) -> None:
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_sigkill_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model")
    task = make_tiny_task(tmp_path / "task.csv", n_train=192, n_dev=32, n_test=32)
    rec = tiny_recipe_dict(
        model,
        task,
        fp={"steps": 9, "lr": 1e-3, "batch_size": 16, "warmup_ratio": 0.1},
        qat={"steps": 9, "lr": 2e-4, "batch_size": 16, "calib_batches": 2},
        train={"eval_every": 4, "save_every": 3, "seed": 3, "device": "cpu"},
    )
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(rec))

    ref, run = tmp_path / "ref", tmp_path / "run"
    _finish(_cmd(recipe, ref))

    first = _run_until(_cmd(recipe, run), run, lambda p: p["stage"] == "fp")
    assert first["step"] < 9  # killed inside the FP stage
    second = _run_until(_cmd(recipe, run, "--resume"), run, lambda p: p["stage"] == "qat" and p["step"])
    assert 0 < second["step"] < 9  # killed inside the QAT stage
    _finish(_cmd(recipe, run, "--resume"))

    # the best FP model, the best QAT state and the integer checkpoint are bitwise identical
    assert _sha(ref / "fp" / "model.safetensors") == _sha(run / "fp" / "model.safetensors")
    assert _sha(ref / "checkpoint" / "model.safetensors") == _sha(run / "checkpoint" / "model.safetensors")
    a = torch.load(ref / "qat" / "best.pt", weights_only=True)
    b = torch.load(run / "qat" / "best.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

    # same evaluations (apart from wall time) and same final metrics
    def rows(p: Path) -> list[dict[str, Any]]:
        return [
            {k: v for k, v in r.items() if k != "wall_time"}
            for r in json.loads((p / "metrics.json").read_text())
        ]

    assert rows(ref) == rows(run)
    assert len(rows(ref)) == 6  # steps 4, 8, 9 of each stage
    s_ref = json.loads((ref / "summary.json").read_text())
    s_run = json.loads((run / "summary.json").read_text())
    for key in ("fp_metric", "qat_metric", "int_metric", "fp_dev_metric", "qat_dev_metric"):
        assert s_ref[key] == s_run[key], key
    assert (run / "training_curve.png").stat().st_size > 1000

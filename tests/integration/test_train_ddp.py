"""``torchrun --nproc_per_node 2 -m qexport.train`` on CPU (gloo): DDP really averages gradients.

With dropout off, two processes with batch 8 each see, step for step, the two halves of the
single-process batch of 16 (the seeded DistributedSampler interleaves one permutation), so
the DDP run's FP model must match the single-process one up to float rounding. The QAT stage
runs too (activation-range buffers broadcast from rank 0) and writes an integer checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.tiny import make_tiny_model, make_tiny_task, tiny_recipe_dict

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _recipe(tmp: Path, name: str, batch: int) -> Path:
    model = tmp / "model"
    if not model.exists():
        make_tiny_model(model, dropout=0.0)
        make_tiny_task(tmp / "task.csv", n_train=256, n_dev=32, n_test=32)
    rec = tiny_recipe_dict(
        model,
        tmp / "task.csv",
        fp={"steps": 6, "lr": 1e-3, "batch_size": batch, "warmup_ratio": 0.2},
        qat={"steps": 3, "lr": 2e-4, "batch_size": batch, "calib_batches": 1},
        train={"eval_every": 1000, "save_every": 2, "seed": 1, "device": "cpu"},
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_single_process(tmp_path: Path) -> None:
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        "-m",
        "qexport.train",
        str(_recipe(tmp_path, "ddp", 8)),
        "-o",
        str(ddp_out),
        "--device",
        "cpu",
    ]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    # rank 0 alone logs and prints the summary
    assert res.stderr.count("[fp] step 6/6") == 1, res.stderr[-2000:]
    assert res.stdout.count('"world_size": 2') == 1
    summary = json.loads((ddp_out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["fp_steps"] == 6 and summary["qat_steps"] == 3
    assert (ddp_out / "checkpoint" / "manifest.json").is_file()
    assert summary["int_metric"] is not None

    single = [
        sys.executable,
        "-m",
        "qexport.train",
        str(_recipe(tmp_path, "single", 16)),
        "-o",
        str(single_out),
        "--device",
        "cpu",
    ]
    res = subprocess.run(single, env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]

    a = load_file(str(ddp_out / "fp" / "model.safetensors"))
    b = load_file(str(single_out / "fp" / "model.safetensors"))
    init = load_file(str(tmp_path / "model" / "model.safetensors"))
    moved = 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5, msg=k)
        if k in init and not torch.equal(a[k], init[k]):
            moved += 1
    assert moved > 10  # training really changed the weights

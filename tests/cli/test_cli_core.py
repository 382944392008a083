"""Bad input to the core commands: one clear line on stderr, exit code 2, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qexport.cli import main


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["quantize", "--preset", "bogus"], "unknown preset 'bogus'"),
        (["quantize", "--weight-bits", "3"], "weight_bits must be one of 2, 4, 8"),
        (["quantize", "--model", "./no/such/model"], "model path does not exist"),
        (["size", "/nonexistent/ckpt"], "checkpoint not found"),
        (["quantize", "--model", "random:gpt9"], "unknown random architecture"),
        (["quantize", "--groups", "FFN+ATTN"], "unknown layer group 'ATTN'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv: list[str], needle: str, capsys, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, _, err = run([*argv, "-o", str(tmp_path / "out")] if argv[0] == "quantize" else argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0]
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.iterdir())  # no temp directories left either


def test_non_bert_model_is_refused(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from transformers import GPT2Config

    gpt = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(gpt)
    code, _, err = run(["quantize", "--model", str(gpt), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "unsupported model type 'gpt2'" in err
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint_size(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "manifest.json").write_text("garbage")
    code, _, err = run(["size", str(ck)], capsys)
    assert code == 2 and "corrupt checkpoint manifest" in err


def test_size_json(int_checkpoint: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    code, out, _ = run(["size", str(int_checkpoint), "--json"], capsys)
    assert code == 0
    rep = json.loads(out)
    assert {"bytes", "fp32_bytes", "fp16_bytes", "ratio_vs_fp32"} <= rep.keys()
    assert rep["fp32_bytes"] == 4 * rep["params"]
    # MiniLM: ~22.7M params; INT8 weights + int32 biases + scales: 3.5x..4x smaller than FP32
    assert 22_000_000 < rep["params"] < 23_500_000
    assert 3.5 < rep["ratio_vs_fp32"] < 4.0


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qexport.cli", "size", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: checkpoint not found")


def test_ptq_on_layer_groups(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Seed 004's PTQ: only the chosen groups get the low bit width, calibrated on real data."""
    from tests.tiny import make_tiny_model, make_tiny_task

    model = make_tiny_model(tmp_path / "model")
    task = make_tiny_task(tmp_path / "task.csv", n_train=64, n_dev=8, n_test=8)
    out = tmp_path / "ckpt"
    code, _, err = run(["quantize", "--model", str(model), "--groups", "MHA", "--weight-bits", "4",
                        "--data", f"csv:{task}", "--calib-batches", "2", "-o", str(out)], capsys)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["weight_groups"] == "MHA" and m["calibration"] == f"data:csv:{task}"
    wb = m["weight_bits"]
    assert {wb[f"l{i}.{n}"] for i in range(2) for n in "qkvo"} == {4}
    assert {wb[f"l{i}.{n}"] for i in range(2) for n in ("f1", "f2")} == {8}

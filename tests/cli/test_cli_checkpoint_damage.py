"""A truncated or altered ``model.safetensors``: ``size``, ``onnx`` and ``verify`` each refuse the
checkpoint with one ``error:`` line and exit 2 (the manifest records the file's bytes and sha256)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from qexport.cli import main
from tests.tiny import make_tiny_model, make_tiny_task


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qexport.ptq import post_training_quantize

    root = tmp_path_factory.mktemp("damage")
    model = make_tiny_model(root / "model", hidden=32)
    task = make_tiny_task(root / "task.csv", n_train=32, n_dev=8, n_test=8)
    return post_training_quantize(str(model), preset="full", data=f"csv:{task}", calib_batches=1,
                                  batch_size=8, max_length=32, out_dir=root / "ckpt")


def _truncate(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _alter(f: Path) -> None:  # same length, one byte of the last tensor changed
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01
    f.write_bytes(bytes(data))


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (_truncate, "(truncated or altered)"),
    "altered": (_alter, "does not match its manifest's sha256"),
}


def _commands(ck: Path, out: Path) -> dict[str, list[str]]:
    return {
        "size": ["size", str(ck)],
        "size-json": ["size", str(ck), "--json"],
        "onnx": ["onnx", str(ck), "-o", str(out / "m.onnx")],
        "verify": ["verify", str(ck), "--model", str(out / "none.onnx"), "-o", str(out)],
    }


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("command", ["size", "size-json", "onnx", "verify"])
def test_damaged_checkpoint_is_one_error_line(
    tiny_ckpt: Path, damage: str, command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    hurt, needle = DAMAGE[damage]
    hurt(ck / "model.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    code = main(_commands(ck, out)[command])
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: corrupt checkpoint: ") and needle in lines[0]
    assert list(out.iterdir()) == []  # nothing written


def test_intact_checkpoint_passes(
    tiny_ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["size", str(tiny_ckpt), "--json"]) == 0
    assert main(["onnx", str(tiny_ckpt), "-o", str(tmp_path / "m.onnx")]) == 0
    assert (tmp_path / "m.onnx").is_file()
    capsys.readouterr()

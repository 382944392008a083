"""Usage errors (click's): the usage line and one ``error:`` line on stderr, exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qexport.cli import main


@pytest.mark.parametrize(
    ("argv", "usage", "needle"),
    [
        (["ort", "model.onnx", "-o", "out"], "Usage: qexport ort ", "No such option: -o"),  # unknown option
        (["size", "--nonsense"], "Usage: qexport size ", "No such option: --nonsense"),
        (["size"], "Usage: qexport size ", "Missing argument 'checkpoint'"),  # missing argument
        (["nosuchcmd"], "Usage: qexport [OPTIONS] COMMAND", "No such command 'nosuchcmd'"),  # unknown command
        (["quantize", "--weight-bits", "abc"], "Usage: qexport quantize ",
         "Invalid value for '--weight-bits'"),  # bad value
    ],
)
def test_usage_error_is_usage_plus_one_error_line(
    argv: list[str], usage: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith(usage)
    assert lines[1].startswith("error: ") and needle in lines[1]
    assert "Traceback" not in err


def test_usage_error_through_the_console_script() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "qexport.cli", "size", "--nonsense"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == "error: No such option: --nonsense"
    assert "Traceback" not in proc.stderr


def test_bare_command_prints_help_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "qexport.cli"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert "verify" in proc.stdout + proc.stderr and "Traceback" not in proc.stderr


def test_help_is_not_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["size", "--help"]) == 0
    out, _ = capsys.readouterr()
    assert "Usage: qexport size" in out

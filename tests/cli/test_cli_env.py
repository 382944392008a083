"""``qexport --version`` and ``qexport env``: what is installed and what can run here."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import platform
import re
from pathlib import Path

import pytest

import qexport
from qexport.cli import main


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(["--version"], capsys)
    assert code == 0 and err == ""
    assert out.strip() == f"qexport {qexport.__version__}"
    assert re.fullmatch(r"qexport \d+\.\d+\.\d+", out.strip())
    assert importlib.metadata.version("qexport") == qexport.__version__


def _flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_env_json_matches_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["env", "--json"], capsys)
    assert code == 0
    env = json.loads(out)
    v = env["versions"]
    assert v["python"] == platform.python_version()
    for dist in ("torch", "transformers", "onnx", "onnxruntime"):
        assert v[dist] == importlib.metadata.version(dist)
    if Path("/proc/cpuinfo").is_file():
        flags = _flags()
        assert env["cpu"]["features"] == {f: f in flags for f in env["cpu"]["features"]}
        assert {"avx2", "avx512_vnni", "avx_vnni", "amx_int8"} <= set(env["cpu"]["features"])
    b = env["backends"]
    assert set(b) == {"ort", "tvm", "trt"}
    assert b["ort"] == {"available": True, "info": importlib.metadata.version("onnxruntime")}
    assert b["tvm"]["available"] == (importlib.util.find_spec("tvm") is not None)
    if importlib.util.find_spec("tensorrt") is None:
        assert b["trt"]["available"] is False and "TensorRT is not installed" in b["trt"]["info"]


def test_env_text(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["env"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert any(ln.startswith("torch") and importlib.metadata.version("torch") in ln for ln in lines)
    assert any(ln.startswith("backend ort") and "available" in ln for ln in lines)
    assert any(ln.startswith("nvcc") for ln in lines)

"""A file that is not ONNX: every backend's ``compile`` refuses it with one BackendError line."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from qexport.backends import backend_names, get_backend
from qexport.backends.base import read_onnx
from qexport.cli import main
from qexport.errors import BackendError

JUNK = {
    "text": b"junk\n",
    "empty": b"",
    "bytes": bytes(range(256)) * 3,
}


@pytest.mark.parametrize("backend", ["ort", "tvm", "trt"])
@pytest.mark.parametrize("kind", sorted(JUNK))
def test_compile_refuses_a_file_that_is_not_onnx(backend: str, kind: str, tmp_path: Path) -> None:
    assert backend in backend_names()
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(JUNK[kind])
    with pytest.raises(BackendError, match="is not an ONNX model") as info:
        get_backend(backend).compile(junk, tmp_path / "out")
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.onnx"]  # nothing written


def test_compile_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="ONNX model not found"):
        get_backend("tvm").compile(tmp_path / "nope.onnx")


def test_read_onnx_accepts_a_model(tmp_path: Path) -> None:
    x = helper.make_tensor_value_info("x", TensorProto.INT64, [1])
    y = helper.make_tensor_value_info("y", TensorProto.INT64, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))
    onnx.save(model, tmp_path / "m.onnx")
    assert [o.name for o in read_onnx(tmp_path / "m.onnx").graph.output] == ["y"]


def test_cli_tvm_on_junk_is_one_error_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(JUNK["text"])
    assert main(["tvm", str(junk)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {junk} is not an ONNX model")

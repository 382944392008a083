"""Build and run a TensorRT engine for a tiny contract graph (docker/Dockerfile.trt image, CUDA GPU).

Marked ``trt`` (excluded by the default ``-m "not slow and not gpu and not trt"``); run with
``pytest -m trt tests/gpu/test_trt_engine.py``. Skips with a reason when tensorrt or CUDA is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from qexport.backends import get_backend

pytestmark = [pytest.mark.trt, pytest.mark.gpu]

W = np.array([[3, -2, 1, 5]], dtype=np.int8)  # [1, 4]


def _tiny_model() -> onnx.ModelProto:
    """ids*mask (int32) -> Q/DQ(int8, 1.0, 0) -> MatMul with int8 W -> int32 -> ReduceSum -> Div 2."""
    nodes = [
        h.make_node("Cast", ["input_ids"], ["ids"], to=T.INT32),
        h.make_node("Cast", ["attention_mask"], ["mask"], to=T.INT32),
        h.make_node("Mul", ["ids", "mask"], ["x"]),
        h.make_node("Min", ["x", "c127"], ["xc"]),
        h.make_node("Unsqueeze", ["xc", "ax2"], ["x3"]),
        h.make_node("Cast", ["x3"], ["xf"], to=T.FLOAT),
        h.make_node("QuantizeLinear", ["xf", "one", "zp"], ["xq"]),
        h.make_node("DequantizeLinear", ["xq", "one", "zp"], ["xd"]),
        h.make_node("DequantizeLinear", ["w", "one", "zp"], ["wd"]),
        h.make_node("MatMul", ["xd", "wd"], ["acc_f"]),
        h.make_node("Cast", ["acc_f"], ["acc"], to=T.INT32),
        h.make_node("ReduceSum", ["acc", "ax1"], ["s"], keepdims=0),
        h.make_node("Abs", ["s"], ["sa"]),
        h.make_node("Div", ["sa", "two"], ["logits_int"]),
        h.make_node("Cast", ["logits_int"], ["lf"], to=T.FLOAT),
        h.make_node("Mul", ["lf", "scale"], ["logits"]),
    ]
    inits = [
        nh.from_array(np.array(127, np.int32), "c127"),
        nh.from_array(np.array([2], np.int64), "ax2"),
        nh.from_array(np.array([1], np.int64), "ax1"),
        nh.from_array(np.array(1.0, np.float32), "one"),
        nh.from_array(np.array(0, np.int8), "zp"),
        nh.from_array(W, "w"),
        nh.from_array(np.array(2, np.int32), "two"),
        nh.from_array(np.array(0.25, np.float32), "scale"),
    ]
    inputs = [
        h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
        h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
    ]
    outputs = [
        h.make_tensor_value_info("logits", T.FLOAT, ["batch", 4]),
        h.make_tensor_value_info("logits_int", T.INT32, ["batch", 4]),
    ]
    graph = h.make_graph(nodes, "tiny", inputs, outputs, inits)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])


def _reference(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.minimum(ids.astype(np.int64) * mask, 127)  # [b, s]
    acc = x[:, :, None] * W.astype(np.int64)[None, :, :]  # [b, s, 4]
    out: np.ndarray = (np.abs(acc.sum(axis=1)) // 2).astype(np.int32)  # non-negative: trunc == floor
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ok, why = get_backend("trt").available()
    if not ok:
        pytest.skip(f"needs TensorRT: {why}")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    d = tmp_path_factory.mktemp("trt")
    onnx.save(_tiny_model(), str(d / "tiny.onnx"))
    cache = d / "timing.cache"
    plan = get_backend("trt").compile(
        d / "tiny.onnx",
        d / "tiny.plan",
        precision="int8",
        shapes="batch=1:2:4,seq=1:8:16",
        workspace_mb=256,
        timing_cache=cache,
    )
    assert plan == d / "tiny.plan" and plan.stat().st_size > 0
    assert cache.is_file() and cache.stat().st_size > 0
    return plan


def test_sidecar(engine: Path) -> None:
    meta = json.loads(engine.with_name(engine.name + ".json").read_text())
    assert meta["precision"] == "int8" and meta["strongly_typed"] is True
    assert meta["engine_bytes"] == engine.stat().st_size
    assert meta["shapes"] == {"batch": [1, 2, 4], "seq": [1, 8, 16]}
    assert meta["tensorrt_version"] and meta["build_seconds"] >= 0


@pytest.mark.parametrize(("batch", "seq"), [(1, 1), (3, 5), (4, 16)])
def test_engine_matches_integer_reference(engine: Path, batch: int, seq: int) -> None:
    rng = np.random.default_rng(batch * 100 + seq)
    ids = rng.integers(0, 200, size=(batch, seq), dtype=np.int64)
    mask = (rng.random((batch, seq)) < 0.8).astype(np.int64)
    mask[:, 0] = 1
    runner = get_backend("trt").load(engine, device="cuda")
    out = runner.run({"input_ids": ids, "attention_mask": mask})
    expected = _reference(ids, mask)
    assert out["logits_int"].dtype == np.int32
    np.testing.assert_array_equal(out["logits_int"], expected)
    np.testing.assert_array_equal(out["logits"], expected.astype(np.float32) * np.float32(0.25))


def test_shape_outside_profile_is_a_clear_error(engine: Path) -> None:
    from qexport.errors import BackendError

    runner = get_backend("trt").load(engine, device="cuda")
    ids = np.ones((5, 4), np.int64)  # batch 5 > max 4
    with pytest.raises(BackendError, match="profile"):
        runner.run({"input_ids": ids, "attention_mask": ids})

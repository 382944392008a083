"""TVM backend on small hand-made integer ONNX graphs that follow the integer-graph contract.

The graph exercises MatMulInteger (int8 x int8 -> int32), a QDQ scale-1 MatMul, Div with
non-negative operands and a Max(x, 1)-guarded divisor, Where, a Gather lookup table,
ReduceSum/ReduceMax and Cast; TVM's outputs must equal onnxruntime's exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qexport.errors import BackendError
from tests.tiny import save_checked_graph

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
tvm = pytest.importorskip("tvm")

pytestmark = pytest.mark.tvm

HIDDEN, OUT = 32, 8


def _int_graph(path: Path, *, opset: int = 18) -> Path:
    """An integer mini-encoder-like graph (dynamic batch/seq) obeying the contract."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    vocab = 50
    inits = [
        nh.from_array(rng.integers(-127, 128, (vocab, HIDDEN)).astype(np.int8), "emb"),
        nh.from_array(rng.integers(-127, 128, (HIDDEN, HIDDEN)).astype(np.int8), "w1"),
        nh.from_array(rng.integers(-127, 128, (HIDDEN, OUT)).astype(np.int8), "w2"),
        nh.from_array(np.array(1.0, np.float32), "one_f"),
        nh.from_array(np.array(0, np.int8), "zp8"),
        nh.from_array(np.array(1, np.int32), "one_i"),
        nh.from_array(np.array(0, np.int32), "zero_i"),
        nh.from_array(np.array(127, np.int32), "i127"),
        nh.from_array(np.array(-127, np.int32), "im127"),
        nh.from_array(np.array(16, np.int32), "i16"),
        nh.from_array((2 ** np.arange(8)).astype(np.int32), "pow2_lut"),
        nh.from_array(np.array([1], np.int64), "ax1"),
        nh.from_array(np.array([-1], np.int64), "axm1"),
        nh.from_array(np.array(0.125, np.float32), "logit_scale"),
    ]
    n = h.make_node
    nodes = [
        n("Cast", ["input_ids"], ["ids32"], to=T.INT32),
        n("Cast", ["attention_mask"], ["mask32"], to=T.INT32),
        n("Gather", ["emb", "ids32"], ["x8"], axis=0),  # [B,S,H] int8
        # linear 1: MatMulInteger int8 x int8 -> int32
        n("MatMulInteger", ["x8", "w1", "zp8", "zp8"], ["acc1"]),
        # requant by a guarded divisor: Div on non-negative operands, divisor = Max(x, 1)
        n("Abs", ["acc1"], ["abs1"]),
        n("ReduceMax", ["abs1", "axm1"], ["rmax"], keepdims=1),  # [B,S,1]
        n("Div", ["rmax", "i127"], ["d0"]),
        n("Max", ["d0", "one_i"], ["div"]),  # guarded divisor >= 1
        n("Div", ["abs1", "div"], ["q_abs"]),
        n("Less", ["acc1", "zero_i"], ["neg"]),
        n("Neg", ["q_abs"], ["q_neg"]),
        n("Where", ["neg", "q_neg", "q_abs"], ["q1"]),
        n("Min", ["q1", "i127"], ["q1a"]),
        n("Max", ["q1a", "im127"], ["q1b"]),
        n("Cast", ["q1b"], ["q8"], to=T.INT8),
        # linear 2: QDQ scale 1 -> float MatMul on exact integers -> Cast int32
        n("DequantizeLinear", ["q8", "one_f", "zp8"], ["qf"]),
        n("DequantizeLinear", ["w2", "one_f", "zp8"], ["w2f"]),
        n("MatMul", ["qf", "w2f"], ["acc2f"]),
        n("Cast", ["acc2f"], ["acc2"], to=T.INT32),
        # masked mean pool over seq: ReduceSum of masked rows, divided by Max(count,1)
        n("Unsqueeze", ["mask32", "axm1"], ["m3"]),
        n("Mul", ["acc2", "m3"], ["acc2m"]),
        n("ReduceSum", ["acc2m", "ax1"], ["s"], keepdims=0),  # [B,OUT]
        n("ReduceSum", ["mask32", "ax1"], ["cnt"], keepdims=1),  # [B,1]
        n("Max", ["cnt", "one_i"], ["cnt1"]),
        n("Abs", ["s"], ["s_abs"]),
        n("Div", ["s_abs", "cnt1"], ["mean_abs"]),
        n("Less", ["s", "zero_i"], ["sneg"]),
        n("Neg", ["mean_abs"], ["mean_neg"]),
        n("Where", ["sneg", "mean_neg", "mean_abs"], ["pooled"]),
        # power-of-two lookup (no BitShift): 2^(|q| / 16) in [1, 128], max over hidden then
        # over the unmasked positions
        n("Abs", ["q1b"], ["qa"]),
        n("Div", ["qa", "i16"], ["e0"]),
        n("Gather", ["pow2_lut", "e0"], ["p2"], axis=0),  # [B,S,H]
        n("ReduceMax", ["p2", "axm1"], ["p2h"], keepdims=0),  # [B,S]
        n("Mul", ["p2h", "mask32"], ["p2m"]),
        n("ReduceMax", ["p2m", "ax1"], ["p2max"], keepdims=1),  # [B,1]
        n("Add", ["pooled", "p2max"], ["logits_int"]),
        n("Cast", ["logits_int"], ["logits_f"], to=T.FLOAT),
        n("Mul", ["logits_f", "logit_scale"], ["logits"]),
    ]
    graph = h.make_graph(
        nodes,
        "int_graph",
        [
            h.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["batch", "seq"]),
        ],
        [
            h.make_tensor_value_info("logits", T.FLOAT, ["batch", OUT]),
            h.make_tensor_value_info("logits_int", T.INT32, ["batch", OUT]),
        ],
        inits,
    )
    return save_checked_graph(graph, path, opset)


def _feeds(batch: int, seq: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 50, (batch, seq)).astype(np.int64)
    mask = np.ones((batch, seq), np.int64)
    for b in range(batch):  # ragged padding, and one fully-masked row when batch > 1
        keep = 0 if (b == batch - 1 and batch > 1) else int(rng.integers(1, seq + 1))
        mask[b, keep:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _ort(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds), strict=True))


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _int_graph(tmp_path_factory.mktemp("tvm") / "int_graph.onnx")


@pytest.fixture(scope="module")
def dyn_artifact(graph: Path) -> Path:
    from qexport.backends.tvm import TVMBackend

    return TVMBackend().compile(graph, graph.parent / "dyn", target="llvm", shapes=None)


def test_registered_and_available() -> None:
    from qexport.backends.base import backend_names, get_backend

    assert "tvm" in backend_names()
    ok, info = get_backend("tvm").available()
    assert ok and info == tvm.__version__


def test_graph_is_nontrivial(graph: Path) -> None:
    """The reference outputs use the whole int32 range we care about (guards a dead graph)."""
    ref = _ort(graph, _feeds(7, 16))
    assert ref["logits_int"].dtype == np.int32
    assert len(np.unique(ref["logits_int"])) > 10
    assert (ref["logits_int"] < 0).any() and (ref["logits_int"] > 0).any()


@pytest.mark.parametrize("batch,seq", [(1, 16), (7, 16), (7, 5)])
def test_llvm_dynamic_matches_ort_exactly(graph: Path, dyn_artifact: Path, batch: int, seq: int) -> None:
    from qexport.backends.tvm import TVMBackend

    runner = TVMBackend().load(dyn_artifact, device="cpu")
    feeds = _feeds(batch, seq, seed=batch * 100 + seq)
    got, ref = runner.run(feeds), _ort(graph, feeds)
    assert set(got) == {"logits", "logits_int"}
    assert got["logits_int"].dtype == np.int32
    np.testing.assert_array_equal(got["logits_int"], ref["logits_int"])
    np.testing.assert_array_equal(got["logits"], ref["logits"])


def test_sidecar(dyn_artifact: Path) -> None:
    meta = json.loads((dyn_artifact / "tvm.json").read_text())
    assert meta["tvm_version"] == tvm.__version__
    assert meta["shapes"] is None and meta["device"] == "cpu"
    assert meta["target"]["kind"] == "llvm" and meta["target"]["mcpu"]
    assert meta["library_bytes"] == (dyn_artifact / "lib.so").stat().st_size > 0
    assert meta["int8_matmuls"] == 1 and "int32" in meta["int8_matmul_strategy"]
    assert meta["outputs"] == ["logits", "logits_int"]
    assert not [p for p in dyn_artifact.parent.iterdir() if p.name.startswith(".dyn")]  # no temp left


def test_static_shapes_and_mismatch_message(graph: Path, tmp_path: Path) -> None:
    from qexport.backends.tvm import TVMBackend

    art = TVMBackend().compile(graph, tmp_path / "static", target="llvm", shapes={"batch": 7, "seq": 16})
    runner = TVMBackend().load(art, device="cpu")
    feeds = _feeds(7, 16, seed=3)
    np.testing.assert_array_equal(runner.run(feeds)["logits_int"], _ort(graph, feeds)["logits_int"])
    assert json.loads((art / "tvm.json").read_text())["shapes"] == {"batch": 7, "seq": 16}
    with pytest.raises(BackendError, match=r"built for batch=7,seq=16; got input_ids shape \(1, 16\)"):
        runner.run(_feeds(1, 16))


def test_bad_inputs(dyn_artifact: Path, graph: Path, tmp_path: Path) -> None:
    from qexport.backends.tvm import TVMBackend

    runner = TVMBackend().load(dyn_artifact, device="cpu")
    with pytest.raises(BackendError, match="missing inputs"):
        runner.run({"input_ids": np.zeros((1, 4), np.int64)})
    with pytest.raises(BackendError, match="must have shape"):
        runner.run({"input_ids": np.zeros((4,), np.int64), "attention_mask": np.zeros((4,), np.int64)})
    with pytest.raises(BackendError, match="not a tvm artifact"):
        TVMBackend().load(tmp_path, device="cpu")
    with pytest.raises(BackendError, match="bad tvm target"):
        TVMBackend().compile(graph, tmp_path / "x", target="no-such-target")
    with pytest.raises(BackendError, match="symbolic dim 'seq'"):
        TVMBackend().compile(graph, tmp_path / "x", target="llvm", shapes={"batch": 2})


def test_fp32_matmul_graph(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from qexport.backends.tvm import TVMBackend

    rng = np.random.default_rng(5)
    w = nh.from_array(rng.standard_normal((6, 4)).astype(np.float32), "w")
    g = h.make_graph(
        [
            h.make_node("Cast", ["input_ids"], ["xf"], to=T.FLOAT),
            h.make_node("MatMul", ["xf", "w"], ["y"]),
            h.make_node("Cast", ["attention_mask"], ["m"], to=T.FLOAT),
            h.make_node("Mul", ["y", "m"], ["logits"]),
        ],
        "fp",
        [
            h.make_tensor_value_info("input_ids", T.INT64, ["batch", 6]),
            h.make_tensor_value_info("attention_mask", T.INT64, ["batch", 1]),
        ],
        [h.make_tensor_value_info("logits", T.FLOAT, ["batch", 4])],
        [w],
    )
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    path = tmp_path / "fp.onnx"
    onnx.save(m, str(path))
    runner = TVMBackend().load(TVMBackend().compile(path, tmp_path / "fp", target="llvm"), "cpu")
    feeds = {
        "input_ids": rng.integers(-5, 5, (3, 6)).astype(np.int64),
        "attention_mask": np.array([[1], [0], [1]], np.int64),
    }
    np.testing.assert_allclose(runner.run(feeds)["logits"], _ort(path, feeds)["logits"], rtol=1e-6, atol=1e-6)
    meta = json.loads((tmp_path / "fp" / "tvm.json").read_text())
    assert meta["int8_matmuls"] == 0


def test_patch_library_bin_roundtrip() -> None:
    """The CUDA AOT packer swaps exactly the cuda module's source for the fatbin."""
    import struct

    from qexport.backends.tvm import _patch_library_bin

    def s(x: bytes) -> bytes:
        return struct.pack("<Q", len(x)) + x

    src, fmap = b"__global__ void k(){}", b"\x01\x02FMAP"
    cuda_body = s(b"cuda") + fmap + s(src)
    row_ptr, children = struct.pack("<4Q", 3, 0, 1, 1), struct.pack("<2Q", 1, 1)
    payload = row_ptr + children + s(b"_lib") + s(b"cuda") + s(cuda_body)
    blob = struct.pack("<Q", len(payload)) + payload
    out = _patch_library_bin(blob, src.decode(), b"FATBIN!")
    want_body = s(b"fatbin") + fmap + s(b"FATBIN!")
    assert out.endswith(s(want_body))
    assert struct.unpack_from("<Q", out)[0] == len(out) - 8
    with pytest.raises(BackendError, match="could not find"):
        _patch_library_bin(blob, "other source", b"x")


_CUDA_SCRIPT = r"""
import json, sys
from qexport.backends.tvm import TVMBackend
out = TVMBackend().compile(sys.argv[1], sys.argv[2], target="t4", shapes={"batch": 2, "seq": 128})
print(json.dumps({"out": str(out)}))
"""


def test_cuda_sm75_cross_compile(graph: Path, tmp_path: Path) -> None:
    """No GPU needed: kernels for sm_75 are compiled ahead of time by nvcc into lib.so (~25 s).

    Runs in a subprocess: a crash inside TVM's scheduler must fail this test, not kill pytest.
    """
    if not Path("/usr/local/cuda/bin/nvcc").exists():
        pytest.skip("nvcc not installed")
    res = subprocess.run(
        [sys.executable, "-c", _CUDA_SCRIPT, str(graph), str(tmp_path / "t4")],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    art = tmp_path / "t4"
    meta = json.loads((art / "tvm.json").read_text())
    assert meta["arch"] == "sm_75" and meta["target"]["arch"] == "sm_75" and meta["device"] == "cuda"
    assert meta["cuda_aot"]["format"] == "fatbin" and meta["cuda_aot"]["bytes"] > 0
    lib = (art / "lib.so").read_bytes()
    assert meta["library_bytes"] == len(lib)
    assert b"__global__" not in lib  # kernels shipped compiled, not as source for NVRTC
    assert meta["int8_matmul_strategy"].startswith("cuda:")

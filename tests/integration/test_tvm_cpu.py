"""Scheduled TVM llvm builds (qexport.backends.tvm_cpu): exact, recorded, and their bad inputs.

* MiniLM (PTQ checkpoint) on real rt text: the scheduled build's ``logits_int`` equal the PyTorch
  integer reference element for element, for ``--linear integer`` (functions form, dynamic
  shapes) and (``slow``) ``--linear qdq`` (flat form, static shapes); the sidecar records the
  rules;
* a GEMM's requantisation / reshape into heads runs in its epilogue, exactly (static and dynamic).
* a small integer graph with edge values (INT32_MIN/MAX numerators, runtime and constant
  divisors, 2- and 3-input Min/Max, a Gather table, MatMulInteger) equals ONNX Runtime exactly,
  and its build prints no TVM warning;
* an unknown ``mcpu``, ``tune`` without static shapes and a tuning database made for other
  shapes each raise one clear error; MetaSchedule tuning itself is ``slow``.
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

I32 = np.iinfo(np.int32)


# --------------------------------------------------------------------------------------------
# MiniLM on rt
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rt_cases(int_checkpoint: Path) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, reference logits_int): rt batch 1 at length 5, batch 7 at 17, batch 2 padded to 32;
    texts of other domains (BBC news at 128 tokens; code, SQL, logs, other languages, emoji,
    punctuation runs, one-letter rows) at batch 3 and 6."""
    from qexport.data import Example, encode, get_task
    from qexport.evaluation import load_tokenizer
    from qexport.models.integer import IntegerModel

    tok = load_tokenizer(int_checkpoint)
    ex = get_task("rt").load("test")
    news = get_task("bbc").load("test")
    other = [Example(t) for t in (
        "def f(x): return x**2 + 3*x - 7  # a python one-liner",
        "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY name;",
        "ERROR 2026-12-03T04:00:00Z worker-3 connection reset by peer (errno 104)",
        "¡Hola! ¿Cómo estás? Ça va très bien, merci. 日本語のテキストも少し。 😂😂😂",
        "!" * 90,
        "a",
    )]
    ref = IntegerModel.from_checkpoint(int_checkpoint)
    out = []
    cases = ((ex[:1], 5, None), (ex[1:8], 17, None), (ex[8:10], 32, 32),
             (news[:3], 128, None), (other, 64, None))
    for batch, max_len, pad_to in cases:
        enc = encode(batch, tok, max_length=max_len, pad_to=pad_to)
        feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        out.append((feeds, ref(enc["input_ids"], enc["attention_mask"]).numpy()))
    return out


@pytest.fixture(scope="module")
def dyn_integer(int_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qexport.backends.tvm import TVMBackend
    from qexport.export.exporter import export_onnx

    work = tmp_path_factory.mktemp("tvmcpu")
    model = export_onnx(int_checkpoint, work / "m.integer.onnx", linear="integer")
    return TVMBackend().compile(model, work / "dyn", target="llvm")


@pytest.fixture(scope="module")
def static_qdq(int_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qexport.backends.tvm import TVMBackend
    from qexport.export.exporter import export_onnx

    work = tmp_path_factory.mktemp("tvmcpu")
    model = export_onnx(int_checkpoint, work / "m.qdq.onnx", form="flat", linear="qdq")
    return TVMBackend().compile(model, work / "static", target="llvm", shapes={"batch": 2, "seq": 32})


def test_minilm_integer_dynamic_bit_exact(dyn_integer: Path, rt_cases) -> None:  # type: ignore[no-untyped-def]
    from qexport.backends.tvm import TVMBackend

    runner = TVMBackend().load(dyn_integer, "cpu")
    for feeds, ref in rt_cases:
        got = runner.run(feeds)["logits_int"]
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ref)


def test_minilm_sidecar_records_rules(dyn_integer: Path) -> None:
    meta = json.loads((dyn_integer / "tvm.json").read_text())
    rules = meta["cpu_schedules"]
    # distinct PrimFuncs (layers that compile alike share one): linears, attention, pooler, head
    assert rules.get("matmul", 0) + rules.get("int8_gemm", 0) >= 8
    assert rules["elementwise"] > 0 and rules["reduction"] > 0
    assert rules.get("unscheduled", 0) <= 5  # scalar shape arithmetic only
    assert meta["relax_rewrites"]["minmax_stack"] > 0 and meta["relax_rewrites"]["take_clip"] > 0
    # requantization by 2^k of sign-split magnitudes (every linear, LayerNorm, softmax) -> shifts
    assert meta["relax_rewrites"]["pow2_divides_to_shifts"] > 50
    assert meta["target"]["num-cores"] >= 1 and meta["target"]["mcpu"]
    assert meta["tuning"] is None and "int32" in meta["int8_matmul_strategy"]


@pytest.mark.slow  # a 50 s static build; the qdq lowering itself is tested on small graphs
def test_minilm_qdq_static_bit_exact_and_shape_check(static_qdq: Path, rt_cases) -> None:  # type: ignore[no-untyped-def]
    from qexport.backends.tvm import TVMBackend

    runner = TVMBackend().load(static_qdq, "cpu")
    feeds, ref = rt_cases[2]  # batch 2, seq 32: the built shape
    np.testing.assert_array_equal(runner.run(feeds)["logits_int"], ref)
    longer = {k: np.concatenate([v, v[:, :8]], axis=1) for k, v in feeds.items()}
    with pytest.raises(BackendError, match=r"built for batch=2,seq=32; got input_ids shape \(2, 40\)"):
        runner.run(longer)
    rules = json.loads((static_qdq / "tvm.json").read_text())["cpu_schedules"]
    assert rules.get("matmul", 0) + rules.get("int8_gemm", 0) > 0


# --------------------------------------------------------------------------------------------
# a small graph with edge values
# --------------------------------------------------------------------------------------------
def _edge_graph(path: Path) -> Path:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(0)
    inits = [
        nh.from_array(np.array(1, np.int32), "one"),
        nh.from_array(np.array(7, np.int32), "seven"),
        nh.from_array(np.array(-3, np.int32), "mthree"),
        nh.from_array(np.array(0, np.int32), "zero"),
        nh.from_array(np.array(255, np.int32), "i255"),
        nh.from_array(np.array(1 << 20, np.int32), "big"),
        nh.from_array(rng.integers(-(1 << 30), 1 << 30, 256).astype(np.int32), "table"),
        nh.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "w"),
        nh.from_array(np.array([-1], np.int64), "axm1"),
    ]
    n = h.make_node
    nodes = [
        n("Max", ["d", "one"], ["dd"]),  # guarded runtime divisor >= 1
        n("Div", ["x", "dd"], ["q"]),  # truncating division, runtime divisor
        n("Div", ["x", "seven"], ["q7"]),  # constant divisor
        n("Div", ["x", "mthree"], ["qm3"]),  # negative constant divisor
        n("Min", ["q", "q7", "big"], ["m3"]),  # 3-input Min
        n("Max", ["m3", "qm3"], ["m"]),
        n("Max", ["x", "zero"], ["xp"]),
        n("Min", ["xp", "i255"], ["idx"]),  # clamped table index
        n("Gather", ["table", "idx"], ["g"], axis=0),
        n("Sub", ["m", "g"], ["e"]),
        n("Cast", ["x"], ["x8"], to=T.INT8),  # wraps: ORT and TVM agree on truncation
        n("MatMulInteger", ["x8", "w"], ["acc"]),
        n("ReduceMax", ["acc", "axm1"], ["accmax"], keepdims=1),
        n("Add", ["e", "accmax"], ["out"]),
    ]
    graph = h.make_graph(
        nodes,
        "edge",
        [
            h.make_tensor_value_info("x", T.INT32, ["batch", 64]),
            h.make_tensor_value_info("d", T.INT32, ["batch", 64]),
        ],
        [h.make_tensor_value_info("out", T.INT32, ["batch", 64])],
        inits,
    )
    return save_checked_graph(graph, path)


def _edge_feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(I32.min, I32.max, (batch, 64), dtype=np.int64).astype(np.int32)
    edges = np.array([I32.min, I32.max, I32.min + 1, -1, 0, 1, -7, 7, -6, 6, 255, 256, -255], np.int32)
    x.flat[: len(edges)] = edges
    d = rng.integers(-5, 1 << 16, (batch, 64)).astype(np.int32)
    d.flat[:4] = [0, -1, 1, I32.max]
    return {"x": x, "d": d}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _edge_graph(tmp_path_factory.mktemp("edge") / "edge.onnx")


_BUILD = r"""
import sys
from qexport.backends.tvm import TVMBackend
TVMBackend().compile(sys.argv[1], sys.argv[2], target="llvm")
"""


@pytest.fixture(scope="module")
def edge_build(edge: Path) -> tuple[Path, str]:
    """The scheduled build, in a subprocess so that TVM's own stderr lines are seen."""
    out = edge.parent / "sched"
    res = subprocess.run([sys.executable, "-c", _BUILD, str(edge), str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res.stderr


def test_edge_graph_matches_ort_exactly(edge: Path, edge_build: tuple[Path, str]) -> None:
    from qexport.backends.tvm import TVMBackend

    runner = TVMBackend().load(edge_build[0], "cpu")
    sess = ort.InferenceSession(str(edge), providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 1), (3, 2), (8, 3)):
        feeds = _edge_feeds(batch, seed)
        want = sess.run(["out"], feeds)[0]
        assert len(np.unique(want)) > want.size // 2  # a live graph
        np.testing.assert_array_equal(runner.run(feeds)["out"], want)
    meta = json.loads((edge_build[0] / "tvm.json").read_text())
    assert meta["relax_rewrites"]["minmax_stack"] == 5 and meta["relax_rewrites"]["take_clip"] >= 1
    assert meta["cpu_schedules"].get("matmul", 0) + meta["cpu_schedules"].get("int8_gemm", 0) >= 1


def test_build_prints_no_tvm_warning(edge_build: tuple[Path, str]) -> None:
    assert "Fast mode" not in edge_build[1]
    assert "Warning" not in edge_build[1], edge_build[1][-2000:]


def test_unscheduled_build_still_reachable_and_exact(edge: Path, tmp_path: Path) -> None:
    from qexport.backends.tvm import TVMBackend

    art = TVMBackend().compile(edge, tmp_path / "old", target="llvm", schedule=False)
    assert json.loads((art / "tvm.json").read_text())["cpu_schedules"] is None
    feeds = _edge_feeds(2, 9)
    want = ort.InferenceSession(str(edge), providers=["CPUExecutionProvider"]).run(["out"], feeds)[0]
    np.testing.assert_array_equal(TVMBackend().load(art, "cpu").run(feeds)["out"], want)


# --------------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------------
def test_unknown_mcpu_is_one_error(edge: Path, tmp_path: Path) -> None:
    from qexport.backends.tvm import TVMBackend

    with pytest.raises(BackendError, match="unknown llvm mcpu 'no-such-cpu'"):
        TVMBackend().compile(edge, tmp_path / "x", target='{"kind": "llvm", "mcpu": "no-such-cpu"}')
    assert not (tmp_path / "x").exists()


def test_cli_tune_needs_static_shapes(edge: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from qexport.cli import main

    code = main(["tvm", str(edge), "-o", str(tmp_path / "t"), "--tune", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: tuning needs static shapes")
    code = main(["tvm", str(edge), "-o", str(tmp_path / "t"), "--target", '{"kind": "llvm", "mcpu": "nope"}'])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "unknown llvm mcpu 'nope'" in err[0]


def test_tuning_db_for_other_shapes_is_refused(edge: Path, tmp_path: Path) -> None:
    from qexport.backends import tvm_cpu
    from qexport.backends.tvm import TVMBackend

    target = tvm.target.Target(tvm_cpu.llvm_target_spec({"kind": "llvm"}))
    db = tmp_path / "db"
    tvm_cpu.open_database(db, tvm_cpu.tune_key(target, {"batch": 4}), create=True)
    with pytest.raises(BackendError, match="made for another shapes"):
        TVMBackend().compile(edge, tmp_path / "a", target="llvm", shapes={"batch": 2}, tune_db=db)
    with pytest.raises(BackendError, match="made for another shapes"):
        TVMBackend().compile(edge, tmp_path / "a", target="llvm", tune_db=db)  # dynamic
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.json").write_text("{}")
    with pytest.raises(BackendError, match="not a qexport tuning database"):
        TVMBackend().compile(edge, tmp_path / "a", target="llvm", shapes={"batch": 4},
                             tune_db=tmp_path / "junk")
    # the database of these shapes applies (no records yet: default schedules, same answers)
    art = TVMBackend().compile(edge, tmp_path / "b", target="llvm", shapes={"batch": 4}, tune_db=db)
    meta = json.loads((art / "tvm.json").read_text())
    assert meta["tuning"] == {"trials": 0, "db": str(db), "shapes": {"batch": 4}, "applied": True}
    feeds = _edge_feeds(4, 5)
    want = ort.InferenceSession(str(edge), providers=["CPUExecutionProvider"]).run(["out"], feeds)[0]
    np.testing.assert_array_equal(TVMBackend().load(art, "cpu").run(feeds)["out"], want)


def test_tune_without_metaschedule_deps_is_one_error(edge: Path, tmp_path: Path) -> None:
    import importlib.util

    missing = [m for m in ("psutil", "cloudpickle", "xgboost") if importlib.util.find_spec(m) is None]
    if not missing:
        pytest.skip("MetaSchedule's dependencies are installed")
    from qexport.backends.tvm import TVMBackend

    with pytest.raises(BackendError, match=f"MetaSchedule tuning needs {missing[0]}"):
        TVMBackend().compile(edge, tmp_path / "t", target="llvm", shapes={"batch": 2}, tune=4)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_metaschedule_tuning_roundtrip(edge: Path, tmp_path: Path) -> None:
    """A handful of MetaSchedule trials, then a rebuild that reuses the database; exact."""
    for mod in ("psutil", "cloudpickle", "xgboost"):
        pytest.importorskip(mod)
    from qexport.backends.tvm import TVMBackend

    art = TVMBackend().compile(edge, tmp_path / "tuned", target="llvm", shapes={"batch": 2}, tune=8)
    meta = json.loads((art / "tvm.json").read_text())
    assert meta["tuning"]["trials"] == 8 and meta["tuning"]["db"] == str(art / "tune-db")
    assert (art / "tune-db" / "database_tuning_record.json").stat().st_size > 0
    again = TVMBackend().compile(edge, tmp_path / "again", target="llvm", shapes={"batch": 2},
                                 tune_db=art / "tune-db")
    feeds = _edge_feeds(2, 4)
    want = ort.InferenceSession(str(edge), providers=["CPUExecutionProvider"]).run(["out"], feeds)[0]
    for a in (art, again):
        np.testing.assert_array_equal(TVMBackend().load(a, "cpu").run(feeds)["out"], want)


# --------------------------------------------------------------------------------------------
# requantization divides by powers of two -> right shifts
# --------------------------------------------------------------------------------------------
_SHIFT_OUTS = ("q_const", "q_table", "q_three", "q_signed")


def _shift_graph(path: Path) -> Path:
    """sign/magnitude requantization as the exporter writes it, plus two divides that are no shifts."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    inits = [
        nh.from_array(np.array([1 << (c % 31) for c in range(64)], np.int32), "pow2_c"),  # per channel
        nh.from_array(np.array([1 << k for k in range(31)], np.int32), "pow2_table"),
        nh.from_array(np.array(3, np.int32), "three"),
        nh.from_array(np.array(0, np.int32), "zero"),
        nh.from_array(np.array(30, np.int32), "i30"),
        nh.from_array(np.array(1 << 29, np.int32), "cap"),
        nh.from_array(np.array(1 << 20, np.int32), "rnd"),
    ]
    n = h.make_node
    nodes = [
        n("Abs", ["x"], ["a"]),
        n("Div", ["a", "pow2_c"], ["q_const"]),  # -> right_shift by a per-channel constant
        n("Max", ["s", "zero"], ["s0"]),
        n("Min", ["s0", "i30"], ["k"]),  # clamped runtime index into the shift table
        n("Gather", ["pow2_table", "k"], ["den"], axis=0),
        n("Min", ["a", "cap"], ["ac"]),
        n("Add", ["ac", "rnd"], ["ar"]),  # |x| clipped + rounding: still >= 0
        n("Div", ["ar", "den"], ["qt"]),  # -> right_shift by take(log2 table, k)
        n("Sign", ["x"], ["sg"]),
        n("Mul", ["sg", "qt"], ["q_table"]),
        n("Div", ["a", "three"], ["q_three"]),  # not a power of two: stays a divide
        n("Div", ["x", "pow2_c"], ["q_signed"]),  # dividend may be negative: stays a divide
    ]
    graph = h.make_graph(
        nodes,
        "shifts",
        [
            h.make_tensor_value_info("x", T.INT32, ["batch", 64]),
            h.make_tensor_value_info("s", T.INT32, ["batch", 64]),
        ],
        [h.make_tensor_value_info(o, T.INT32, ["batch", 64]) for o in _SHIFT_OUTS],
        inits,
    )
    return save_checked_graph(graph, path)


def _shift_feeds(batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.integers(-I32.max, I32.max, (batch, 64), dtype=np.int64).astype(np.int32)
    edges = [I32.max, -I32.max, I32.max - 1, -1, 0, 1, -7, 7, 3, -3, (1 << 30) - 1, 1 << 30, -(1 << 30) - 1]
    x.flat[: len(edges)] = edges
    s = rng.integers(-3, 34, (batch, 64)).astype(np.int32)
    s.flat[:6] = [0, 30, 31, -1, I32.max, I32.min]
    return {"x": x, "s": s}


def test_pow2_divides_become_exact_shifts(tmp_path: Path) -> None:
    import onnx
    from tvm import s_tir
    from tvm.relax.frontend.onnx import from_onnx

    from qexport.backends import tvm_cpu
    from qexport.backends.tvm import TVMBackend

    model = _shift_graph(tmp_path / "shifts.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm")
    rewrites = json.loads((art / "tvm.json").read_text())["relax_rewrites"]
    assert rewrites["pow2_divides_to_shifts"] == 2
    # q_signed (a per-channel divisor) in float64, q_three (one constant) stays an integer divide
    assert (rewrites["divides_in_float64"], rewrites["divides_left"]) == (1, 1)
    # take(log2(pow2_table), k) is clip(k, 0, 30); the take of pow2_table itself (left unused by
    # the shift) is 1 << clip(k, 0, 30)
    assert rewrites["take_tables"] == 2

    runner = TVMBackend().load(art, "cpu")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for batch, seed in ((1, 1), (4, 2)):
        feeds = _shift_feeds(batch, seed)
        got = runner.run(feeds)
        for name, want in zip(_SHIFT_OUTS, sess.run(list(_SHIFT_OUTS), feeds), strict=True):
            assert len(np.unique(want)) > 8, name  # a live output
            np.testing.assert_array_equal(got[name], want, err_msg=name)

    # the shifted loops are vectorisable. Before: two PrimFuncs divide by a loaded value, the
    # fused table chain and ``divide(_, pow2_c)`` (q_const and q_signed share it); after: only the
    # signed one is left
    import tvm

    def runtime_divides(mod: object) -> int:
        n = 0
        for _gv, func in mod.functions_items():  # type: ignore[attr-defined]
            if isinstance(func, tvm.tirx.PrimFunc):
                sch = s_tir.Schedule(func)
                blocks = sch.get_child_blocks(tvm_cpu._root(sch))
                n += sum(tvm_cpu._divides_at_runtime(sch, b) for b in blocks)
        return n

    target = tvm.target.Target("llvm")
    imported = from_onnx(onnx.load(str(model)), keep_params_in_input=False)
    before = tvm_cpu.fused(tvm_cpu._take_clip(tvm_cpu._rewrite_stacked_minmax(imported)[0])[0], target)
    info = tvm_cpu.BuildInfo()
    after = tvm_cpu.fused(tvm_cpu.prepare(imported, target, info, frozenset()), target)
    assert info.rewrites["pow2_divides_to_shifts"] == 2
    assert (runtime_divides(before), runtime_divides(after)) == (2, 0)


def _division_graph(path: Path) -> Path:
    from onnx import TensorProto as T
    from onnx import helper as h

    graph = h.make_graph(
        [h.make_node("Div", ["x", "d"], ["q"])],
        "division",
        [h.make_tensor_value_info(x, T.INT32, ["batch", 64]) for x in ("x", "d")],
        [h.make_tensor_value_info("q", T.INT32, ["batch", 64])],
    )
    return save_checked_graph(graph, path)


def test_runtime_divides_in_float64_truncate_exactly(tmp_path: Path) -> None:
    """int32 / int32 by a runtime divisor runs as double division + truncating cast: equal to
    ONNX's truncating integer Div over the whole int32 range (divisor 0 and INT32_MIN / -1
    excluded: undefined in ONNX Runtime too)."""
    from qexport.backends.tvm import TVMBackend

    model = _division_graph(tmp_path / "div.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm")
    assert json.loads((art / "tvm.json").read_text())["relax_rewrites"]["divides_in_float64"] == 1
    runner = TVMBackend().load(art, "cpu")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    big = I32.max
    edges_x = [big, -big, big - 1, -big + 1, 0, 1, -1, 7, -7, 1 << 30, -(1 << 30), 123456789, I32.min]
    edges_d = [1, -1, 2, -2, 3, -3, big, -big, I32.min, 7, 1 << 16, 65537, 46341]
    for batch, scale in ((64, 2**31 - 1), (64, 2**16), (64, 100)):
        x = rng.integers(-big, big, (batch, 64), dtype=np.int64).astype(np.int32)
        d = rng.integers(-scale, scale, (batch, 64), dtype=np.int64).astype(np.int32)
        d[d == 0] = 1
        ex, ed = np.meshgrid(edges_x, edges_d, indexing="ij")
        x.flat[: ex.size], d.flat[: ed.size] = ex.ravel(), ed.ravel()
        d[(x == I32.min) & (d == -1)] = 2
        feeds = {"x": x, "d": d}
        want = sess.run(["q"], feeds)[0]
        np.testing.assert_array_equal(want, (np.abs(x.astype(np.int64)) // np.abs(d.astype(np.int64)))
                                      * np.sign(x.astype(np.int64) * d), err_msg="reference")
        np.testing.assert_array_equal(runner.run(feeds)["q"], want)


def test_formula_tables_become_arithmetic(tmp_path: Path) -> None:
    """A gather from an affine table (a*i + b) or a shift table (c << i) becomes that formula of
    the index; the values are the table's for every index."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from qexport.backends.tvm import TVMBackend

    n = 31
    inits = [
        nh.from_array((3 * np.arange(n) - 5).astype(np.int32), "affine"),
        nh.from_array((5 << np.arange(n - 4)).astype(np.int32), "shifts"),
        nh.from_array(np.array([1, 2, 4, 9], np.int32), "other"),  # no formula: stays a gather
    ]
    nodes = [
        h.make_node("Gather", ["affine", "i"], ["a"], axis=0),
        h.make_node("Gather", ["shifts", "j"], ["s"], axis=0),
        h.make_node("Gather", ["other", "k"], ["o"], axis=0),
    ]
    ins = [h.make_tensor_value_info(x, T.INT32, ["batch", 16]) for x in "ijk"]
    outs = [h.make_tensor_value_info(x, T.INT32, ["batch", 16]) for x in "aso"]
    model = save_checked_graph(h.make_graph(nodes, "tables", ins, outs, inits), tmp_path / "t.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm")
    assert json.loads((art / "tvm.json").read_text())["relax_rewrites"]["take_tables"] == 2
    rng = np.random.default_rng(0)
    feeds = {"i": rng.integers(0, n, (4, 16)).astype(np.int32),
             "j": rng.integers(0, n - 4, (4, 16)).astype(np.int32),
             "k": rng.integers(0, 4, (4, 16)).astype(np.int32)}
    feeds["i"].flat[:2], feeds["j"].flat[:2] = [0, n - 1], [0, n - 5]
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(list("aso"), feeds)
    got = TVMBackend().load(art, "cpu").run(feeds)
    for name, w in zip("aso", want, strict=True):
        np.testing.assert_array_equal(got[name], w, err_msg=name)


# --------------------------------------------------------------------------------------------
# GEMM epilogues
# --------------------------------------------------------------------------------------------
def _epilogue_graph(path: Path) -> Path:
    """Two int8 GEMMs: one requantised, reshaped into heads and transposed (an elementwise
    consumer: goes into the GEMM's epilogue), one reduced over its rows (stays a kernel of its own)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    rng = np.random.default_rng(3)
    w1 = rng.integers(-128, 128, (128, 96)).astype(np.int8)
    w1[:, 0] = -128  # extreme columns: the most negative and the largest sums
    w1[:, 1] = 127
    inits = [
        nh.from_array(w1, "w1"),
        nh.from_array(rng.integers(-128, 128, (128, 64)).astype(np.int8), "w2"),
        nh.from_array(rng.integers(-5000, 5000, 96).astype(np.int32), "bias"),
        nh.from_array(rng.integers(1, 40, 96).astype(np.int32), "mult"),
        nh.from_array(np.array(4096, np.int32), "den"),
        nh.from_array(np.array(-128, np.int32), "lo"),
        nh.from_array(np.array(127, np.int32), "hi"),
        nh.from_array(np.array([0, 0, 3, 32], np.int64), "heads"),
        nh.from_array(np.array([2], np.int64), "last"),
    ]
    nodes = [
        h.make_node("MatMulInteger", ["x", "w1"], ["y1"]),
        h.make_node("Add", ["y1", "bias"], ["b1"]),
        h.make_node("Mul", ["b1", "mult"], ["m1"]),
        h.make_node("Div", ["m1", "den"], ["d1"]),
        h.make_node("Max", ["d1", "lo"], ["c0"]),
        h.make_node("Min", ["c0", "hi"], ["c1"]),
        h.make_node("Cast", ["c1"], ["q1"], to=T.INT8),
        h.make_node("Reshape", ["q1", "heads"], ["r1"]),
        h.make_node("Transpose", ["r1"], ["heads_out"], perm=[0, 2, 1, 3]),
        h.make_node("MatMulInteger", ["x", "w2"], ["y2"]),
        h.make_node("ReduceMax", ["y2", "last"], ["rowmax"], keepdims=1),
    ]
    graph = h.make_graph(
        nodes,
        "epilogues",
        [h.make_tensor_value_info("x", T.INT8, ["batch", "seq", 128])],
        [
            h.make_tensor_value_info("heads_out", T.INT8, ["batch", 3, "seq", 32]),
            h.make_tensor_value_info("rowmax", T.INT32, ["batch", "seq", 1]),
        ],
        inits,
    )
    return save_checked_graph(graph, path)


@pytest.mark.parametrize("shapes", [{"batch": 2, "seq": 23}, None], ids=["static", "dynamic"])
def test_gemm_epilogue_fuses_the_requantisation_and_stays_exact(tmp_path: Path, shapes) -> None:  # type: ignore[no-untyped-def]
    """The requantise -> reshape -> transpose chain, and the reshape in front of a reduction, run
    in their GEMMs' epilogues (the sidecar counts them); every output equals ONNX Runtime's
    exactly, including int8 extremes and M = batch*seq not a multiple of the register tile."""
    from qexport.backends import tvm_gemm
    from qexport.backends.tvm import TVMBackend
    from qexport.host import cpu_flags

    model = _epilogue_graph(tmp_path / "epi.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm", shapes=shapes)
    meta = json.loads((art / "tvm.json").read_text())
    if tvm_gemm.select_strategy(cpu_flags()).kind != "scalar":
        assert meta["int8_gemm_epilogues"] == "2 of 2 GEMM consumers fused", meta
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    runner = TVMBackend().load(art, "cpu")
    rng = np.random.default_rng(0)
    for seed in range(3):
        x = rng.integers(-128, 128, (2, 23, 128)).astype(np.int8)
        x[0, :2] = -128 if seed else 127
        names = ["heads_out", "rowmax"]
        want = sess.run(names, {"x": x})
        got = runner.run({"x": x})
        for name, w in zip(names, want, strict=True):
            np.testing.assert_array_equal(got[name], w, err_msg=name)


# --------------------------------------------------------------------------------------------
# row groups
# --------------------------------------------------------------------------------------------
def _rows_graph(path: Path) -> Path:
    """A LayerNorm-shaped integer chain: row sum, centre, |.|, row max, divide by it; the centred
    value is an output of its own (a group output in the middle)."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    inits = [nh.from_array(np.array([-1], np.int64), "last"), nh.from_array(np.array(64, np.int32), "n"),
             nh.from_array(np.array(1, np.int32), "one"), nh.from_array(np.array(1000, np.int32), "k")]
    nodes = [
        h.make_node("ReduceSum", ["x", "last"], ["s"], keepdims=1),
        h.make_node("Mul", ["x", "n"], ["xn"]),
        h.make_node("Sub", ["xn", "s"], ["centred"]),
        h.make_node("Abs", ["centred"], ["a"]),
        h.make_node("ReduceMax", ["a", "last"], ["m"], keepdims=1),
        h.make_node("Add", ["m", "one"], ["m1"]),
        h.make_node("Mul", ["centred", "k"], ["ck"]),
        h.make_node("Div", ["ck", "m1"], ["normed"]),
    ]
    graph = h.make_graph(
        nodes, "rows", [h.make_tensor_value_info("x", T.INT32, ["batch", "seq", 64])],
        [h.make_tensor_value_info(o, T.INT32, ["batch", "seq", 64]) for o in ("normed", "centred")], inits,
    )
    return save_checked_graph(graph, path)


@pytest.mark.parametrize("shapes", [{"batch": 2, "seq": 5}, None], ids=["static", "dynamic"])
def test_row_group_merges_the_reductions_and_stays_exact(tmp_path: Path, shapes) -> None:  # type: ignore[no-untyped-def]
    """Row sum -> centre -> row max -> divide become one kernel, computed row by row (the
    sidecar counts the group); both outputs equal ONNX Runtime's exactly."""
    from qexport.backends.tvm import TVMBackend

    model = _rows_graph(tmp_path / "rows.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm", shapes=shapes)
    meta = json.loads((art / "tvm.json").read_text())
    assert meta["relax_rewrites"]["row_groups"] == 1, meta["relax_rewrites"]
    assert meta["cpu_schedules"].get("reduction", 0) >= 1 and not meta["cpu_schedules"].get("fallback")
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    runner = TVMBackend().load(art, "cpu")
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.integers(-1000, 1000, (2, 5, 64)).astype(np.int32)
        x[0, 0] = 7  # a constant row: centred 0, max 0
        want = sess.run(["normed", "centred"], {"x": x})
        got = runner.run({"x": x})
        np.testing.assert_array_equal(got["normed"], want[0])
        np.testing.assert_array_equal(got["centred"], want[1])


def test_a_float_matmul_never_joins_a_row_group(tmp_path: Path) -> None:
    """A float MatMul is a reduction too, but not a row reduction: it keeps its own kernel and
    the matmul schedule (merged into a row group it ran 40x slower), while the row sum after it
    still groups with what follows."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    from qexport.backends.tvm import TVMBackend

    rng = np.random.default_rng(0)
    inits = [nh.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w"),
             nh.from_array(np.array([-1], np.int64), "last")]
    nodes = [h.make_node("MatMul", ["x", "w"], ["y"]),
             h.make_node("ReduceSum", ["y", "last"], ["s"], keepdims=1),
             h.make_node("Sub", ["y", "s"], ["c"]),
             h.make_node("ReduceMax", ["c", "last"], ["m"], keepdims=1),
             h.make_node("Div", ["c", "m"], ["out"])]
    graph = h.make_graph(nodes, "mm", [h.make_tensor_value_info("x", T.FLOAT, ["batch", 8, 64])],
                         [h.make_tensor_value_info("out", T.FLOAT, ["batch", 8, 64])], inits)
    model = save_checked_graph(graph, tmp_path / "mm.onnx")
    art = TVMBackend().compile(model, tmp_path / "art", target="llvm")
    meta = json.loads((art / "tvm.json").read_text())
    assert meta["cpu_schedules"].get("matmul", 0) == 1, meta["cpu_schedules"]
    assert meta["relax_rewrites"]["row_groups"] == 1
    x = rng.standard_normal((2, 8, 64)).astype(np.float32)
    want = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(["out"], {"x": x})[0]
    np.testing.assert_allclose(TVMBackend().load(art, "cpu").run({"x": x})["out"], want, rtol=1e-4, atol=1e-4)

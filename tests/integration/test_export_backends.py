"""The whole integer model through ONNX Runtime and TVM: 0 mismatched logits_int elements.

Real text (the rt test split), both ONNX forms, both linear forms, batch 1 and 7, sequence
lengths 5 to 128. The reference is the PyTorch IntegerModel built from the checkpoint alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from qexport.cli import main
from qexport.data import encode, get_task
from qexport.errors import ExportError
from qexport.evaluation import load_tokenizer
from qexport.export.exporter import export_onnx
from qexport.models.integer import IntegerModel
from qexport.verify import verify


@pytest.fixture(scope="module")
def cases(int_checkpoint: Path) -> list[tuple[dict[str, np.ndarray], np.ndarray]]:
    """(feeds, reference logits_int) for batch 1 and 7 at sequence lengths 5..128."""
    tok = load_tokenizer(int_checkpoint)
    ex = get_task("rt").load("test")
    long = sorted(ex, key=lambda e: -len(e.text))[:7]  # long enough to reach 128 with padding
    ref = IntegerModel.from_checkpoint(int_checkpoint)
    out = []
    plan = ((ex[:1], 5, None), (ex[1:8], 17, None), (long, 64, 128), (ex[8:9], 128, 128))
    for batch, max_len, pad_to in plan:
        enc = encode(batch, tok, max_length=max_len, pad_to=pad_to)
        feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        r = ref(enc["input_ids"], enc["attention_mask"]).numpy()
        out.append((feeds, r))
    assert {f["input_ids"].shape[1] for f, _ in out} == {5, 17, 128}
    assert {f["input_ids"].shape[0] for f, _ in out} == {1, 7}
    return out


@pytest.mark.parametrize("form", ["functions", "flat"])
@pytest.mark.parametrize("linear", ["qdq", "integer"])
def test_ort_bit_exact(int_checkpoint: Path, cases, tmp_path: Path, form: str, linear: str) -> None:  # type: ignore[no-untyped-def]
    path = export_onnx(int_checkpoint, tmp_path / f"m.{form}.{linear}.onnx", form=form, linear=linear)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    domains = {n.domain for n in model.graph.node}
    assert ("qexport" in domains) == (form == "functions")
    # int8 weights: the file is about the checkpoint's size, not FP32's
    ckpt_bytes = json.loads((int_checkpoint / "manifest.json").read_text())["total_bytes"]
    assert path.stat().st_size < 1.2 * ckpt_bytes
    from qexport.backends import get_backend

    runner = get_backend("ort").load(path, "cpu")
    scale = float(dict((p.key, p.value) for p in model.metadata_props)["logits_scale"])
    for feeds, ref in cases:
        out = runner.run(feeds)
        logits, logits_int = out["logits"], out["logits_int"]
        assert logits_int.dtype == np.int32
        np.testing.assert_array_equal(logits_int, ref)
        np.testing.assert_allclose(logits, ref * scale, rtol=1e-6)


@pytest.mark.tvm
def test_tvm_llvm_bit_exact(int_checkpoint: Path, cases, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("tvm")
    from qexport.backends import get_backend

    flat = export_onnx(int_checkpoint, tmp_path / "m.flat.onnx", form="flat", linear="qdq")
    be = get_backend("tvm")
    lib = be.compile(flat, tmp_path / "tvm", target="llvm")
    side = json.loads((lib / "tvm.json").read_text())
    assert side["target"] and (lib / "lib.so").is_file()
    runner = be.load(lib, "cpu")
    for feeds, ref in cases:
        np.testing.assert_array_equal(runner.run(feeds)["logits_int"], ref)


def test_verify_reports_zero_mismatches(int_checkpoint: Path, tmp_path: Path) -> None:
    model = export_onnx(int_checkpoint, tmp_path / "m.onnx")
    res = verify(int_checkpoint, "ort", model, "rt", limit=10, batch_size=7, out_dir=tmp_path)
    assert res["mismatches"] == 0 and res["examples"] == 10 and res["argmax_agreement"] == 1.0
    assert json.loads((tmp_path / "parity.json").read_text())["mismatches"] == 0


def test_verify_detects_a_wrong_model(int_checkpoint: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """A tampered bias makes verify exit 1 with the mismatch count."""
    path = export_onnx(int_checkpoint, tmp_path / "m.onnx")
    m = onnx.load(str(path))
    for t in m.graph.initializer:
        if t.name.startswith("cls.b"):
            arr = numpy_helper.to_array(t).copy()
            arr[0] += 1
            t.CopyFrom(numpy_helper.from_array(arr, t.name))
    onnx.save(m, str(path))
    code = main(["verify", str(int_checkpoint), "--backend", "ort", "--model", str(path), "--limit", "3",
                 "-o", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "3 logits_int elements differ" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--opset", "13"], "opset 13 is too old"),
        (["--form", "weird"], "unknown form 'weird'"),
        (["--linear", "fp8"], "unknown linear form"),
    ],
)
def test_export_bad_options(int_checkpoint: Path, tmp_path: Path, capsys, argv, needle) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "x.onnx"
    code = main(["onnx", str(int_checkpoint), "-o", str(out), *argv])
    assert code == 2 and needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_export_missing_checkpoint(tmp_path: Path) -> None:
    from qexport.errors import CheckpointError

    with pytest.raises(CheckpointError):
        export_onnx(tmp_path / "none", tmp_path / "x.onnx")
    with pytest.raises(ExportError):
        export_onnx(tmp_path / "none", tmp_path / "x.onnx", form="nope")


def test_qdq_linear_exact_only_below_2_pow_24() -> None:
    """The documented limit of the QDQ form: float32 MatMul on int8 values is exact while the
    accumulator stays below 2**24; MatMulInteger is exact beyond it."""

    def run(linear: str, k: int) -> int:
        one = numpy_helper.from_array(np.asarray(1.0, np.float32), "one")
        zp = numpy_helper.from_array(np.asarray(0, np.int8), "zp")
        w = numpy_helper.from_array(np.full((k, 1), 127, np.int8), "w")
        if linear == "qdq":
            nodes = [helper.make_node("DequantizeLinear", ["x", "one", "zp"], ["fx"]),
                     helper.make_node("DequantizeLinear", ["w", "one", "zp"], ["fw"]),
                     helper.make_node("MatMul", ["fx", "fw"], ["f"]),
                     helper.make_node("Cast", ["f"], ["y"], to=TensorProto.INT32)]
        else:
            nodes = [helper.make_node("MatMulInteger", ["x", "w"], ["y"])]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT8, [1, k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])], [one, zp, w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        x = np.full((1, k), 127, np.int8)
        x[0, ::3] = 125
        return int(s.run(None, {"x": x})[0][0, 0])

    for k in (768, 3072):
        exact = int((np.where(np.arange(k) % 3 == 0, 125, 127).astype(np.int64) * 127).sum())
        assert run("integer", k) == exact
        assert (run("qdq", k) == exact) == (exact < 2**24), k


@pytest.mark.tvm
def test_tvm_constant_rows_do_not_crash(tmp_path: Path) -> None:
    """Integer division by zero kills a TVM process (SIGFPE); the graph guards every divisor.
    ILayerNorm over constant rows (variance 0) and ISqrt(0) run in a subprocess and must match."""
    script = tmp_path / "probe.py"
    script.write_text(
        "import numpy as np, torch, onnx\n"
        "from onnx import TensorProto, helper, numpy_helper\n"
        "from qexport.export.functions import DOMAIN, function_protos\n"
        "from qexport.export.constants import to_onnx_inputs\n"
        "from qexport.export.exporter import inline_and_fold\n"
        "from qexport.ops import kernels as K\n"
        "from qexport.backends import get_backend\n"
        "c = K.layernorm_constants(torch.ones(8), torch.linspace(-1, 1, 8), out_scale=0.02)\n"
        "vals = to_onnx_inputs(c)\n"
        "names = [f'k{i}' for i in range(len(vals))]\n"
        "cast = helper.make_node('Cast', ['input_ids'], ['x'], to=TensorProto.INT32)\n"
        "node = helper.make_node('ILayerNorm', ['x', *names], ['y'], domain=DOMAIN)\n"
        "g = helper.make_graph([cast, node], 'g', [helper.make_tensor_value_info('input_ids', "
        "TensorProto.INT64, ['b', 8])], [helper.make_tensor_value_info('y', TensorProto.INT32, ['b', 8])],"
        " [numpy_helper.from_array(a, n) for a, n in zip(vals, names)])\n"
        "m = helper.make_model(g, opset_imports=[helper.make_opsetid('', 18),"
        " helper.make_opsetid(DOMAIN, 1)],"
        " functions=function_protos(['ILayerNorm']), ir_version=10)\n"
        f"onnx.save(inline_and_fold(m), r'{tmp_path}/ln.onnx')\n"
        "be = get_backend('tvm')\n"
        f"lib = be.compile(r'{tmp_path}/ln.onnx', r'{tmp_path}/lnlib', target='llvm')\n"
        "x = np.array([[0]*8, [5]*8, [-7]*8, [131072]*8, list(range(8))], np.int64)\n"
        "class R(be.load(lib, 'cpu').__class__): pass\n"
        "r = be.load(lib, 'cpu'); r.input_names = ('input_ids',)\n"
        "got = r.run({'input_ids': x})['y']\n"
        "ref = K.i_layernorm_int(torch.from_numpy(x), c).numpy()\n"
        "assert (got == ref).all(), (got, ref)\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "OK" in proc.stdout


def test_trt_lint_passes_the_qdq_lowering_and_names_what_fails(  # type: ignore[no-untyped-def]
    int_checkpoint: Path, tmp_path: Path, capsys
) -> None:
    """The QDQ flat form is TensorRT-buildable by the parser's support matrix; the MatMulInteger
    form is not, and --check says which nodes and exits 2."""
    from qexport.backends.trt_support import check_onnx_file, errors_only

    qdq = export_onnx(int_checkpoint, tmp_path / "qdq.onnx", form="flat", linear="qdq")
    assert errors_only(check_onnx_file(qdq)) == []
    assert main(["trt", "--check", str(qdq)]) == 0
    integer = export_onnx(int_checkpoint, tmp_path / "int.onnx", form="flat", linear="integer")
    errs = errors_only(check_onnx_file(integer))
    assert {f.op for f in errs} >= {"MatMulInteger"}
    capsys.readouterr()
    assert main(["trt", "--check", str(integer)]) == 2
    assert "MatMulInteger: TensorRT has no integer MatMul" in capsys.readouterr().out

"""ORT with the load-time rewrites, whole model: 0 mismatched logits_int against the reference.

Real text (the rt test split), batch 1 and 7, sequence lengths 5 to 128 (padded rows included),
for the MiniLM integer model with preset ``full`` (MatMulInteger and QDQ linears, and the AVX2
matmul rule forced), a partial preset and 4-bit weights. The reference is the PyTorch
IntegerModel built from the checkpoint alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from qexport.backends import get_backend
from qexport.data import encode, get_task
from qexport.evaluation import load_tokenizer
from qexport.export.exporter import export_onnx
from qexport.models.integer import IntegerModel

Cases = list[tuple[dict[str, np.ndarray], np.ndarray]]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """PTQ and the reference run on one thread: small work, and with two, torch's workers spin
    against ORT's (or any other process's) on a 2-core machine and run several times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _ptq(tmp_path_factory: pytest.TempPathFactory, name: str, **kw: object) -> Path:
    from qexport.ptq import post_training_quantize

    out = tmp_path_factory.mktemp("ckpt") / name
    return post_training_quantize("minilm", data="rt", calib_batches=1, batch_size=16, max_length=32,
                                  out_dir=out, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def partial_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GELU and tanh stay float (dequantize -> float op -> quantize); softmax and LayerNorm integer."""
    return _ptq(tmp_path_factory, "minilm-partial", preset="linear+softmax+layernorm")


@pytest.fixture(scope="module")
def w4_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ptq(tmp_path_factory, "minilm-w4", preset="full", weight_bits=4)


_CASES: dict[Path, Cases] = {}
_EXPORTS: dict[tuple[Path, str], Path] = {}


def exported(checkpoint: Path, linear: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    key = (checkpoint, linear)
    if key not in _EXPORTS:
        _EXPORTS[key] = export_onnx(checkpoint, tmp_path_factory.mktemp("onnx") / "m.onnx", form="functions",
                                    linear=linear)
    return _EXPORTS[key]


def make_cases(checkpoint: Path) -> Cases:
    """(feeds, reference logits_int) for batch 1 and 7 at sequence lengths 5..128 (cached)."""
    if checkpoint in _CASES:
        return _CASES[checkpoint]
    tok = load_tokenizer(checkpoint)
    ex = get_task("rt").load("test")
    long = sorted(ex, key=lambda e: -len(e.text))[:7]
    ref = IntegerModel.from_checkpoint(checkpoint)
    out = []
    plan = ((ex[:1], 5, None), (ex[1:8], 17, None), (long, 64, 128), (ex[8:9], 128, 128))
    for batch, max_len, pad_to in plan:
        enc = encode(batch, tok, max_length=max_len, pad_to=pad_to)
        feeds = {k: enc[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")}
        out.append((feeds, ref(enc["input_ids"], enc["attention_mask"]).numpy()))
    _CASES[checkpoint] = out
    return out


@pytest.mark.parametrize(
    ("which", "linear", "u8s8"),
    [("full", "integer", "auto"), ("full", "integer", "bounded"), ("partial", "qdq", "auto"),
     ("w4", "integer", "bounded")],
)
def test_rewritten_ort_is_bit_exact(  # type: ignore[no-untyped-def]
    request, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, which: str,
    linear: str, u8s8: str,
) -> None:
    """(The functions x linear-form grid through the backend, rewrites on, is test_export_backends'.)"""
    ckpt = request.getfixturevalue({"full": "int_checkpoint", "partial": "partial_checkpoint",
                                    "w4": "w4_checkpoint"}[which])
    monkeypatch.setenv("QEXPORT_ORT_U8S8", u8s8)
    path = exported(ckpt, linear, tmp_path_factory)
    runner = get_backend("ort").load(path, "cpu")
    report = runner.rewrite_report  # type: ignore[attr-defined]
    assert report is not None and not report.kept, report.summary()
    applied = report.applied
    assert applied["requant"] and applied["lut"] and applied["fused-linears"] == 6, report.summary()
    if which != "partial":
        assert applied["softmax"] == 6 and applied["layernorm"] == 13 and applied["lut-compose"] == 6
    if u8s8 == "bounded" and which == "full":  # 8-bit weights: the AVX2-safe uint8 x uint8 path,
        # but for P V (probabilities in [0, 127]: no int16 pair sum can saturate)
        assert applied["matmul-u8u8"] == 6 * 5 + 2 and applied["matmul-u8s8"] == 6
    if which == "w4":  # |w| <= 7: uint8 x int8 is exact on AVX2 too (not so Q K^T, two int8 activations)
        assert applied["matmul-u8s8"] >= 6 * 5 and applied["matmul-u8u8"] <= 6 + 2
    for feeds, ref in make_cases(ckpt):
        np.testing.assert_array_equal(runner.run(feeds)["logits_int"], ref)


def test_rewrites_switch_off(int_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """``QEXPORT_ORT_REWRITE=0`` (or ``rewrite=False``) runs the file as exported, same integers."""
    path = exported(int_checkpoint, "integer", tmp_path_factory)
    be = get_backend("ort")
    feeds, ref = make_cases(int_checkpoint)[1]
    monkeypatch.setenv("QEXPORT_ORT_REWRITE", "0")
    spec = be.load(path, "cpu")
    assert spec.rewrite_report is None  # type: ignore[attr-defined]
    np.testing.assert_array_equal(spec.run(feeds)["logits_int"], ref)
    monkeypatch.setenv("QEXPORT_ORT_REWRITE", "matmul")
    only = be.load(path, "cpu").rewrite_report  # type: ignore[attr-defined]
    assert only is not None and set(only.applied) <= {"matmul-u8s8", "matmul-u8u8"}
    assert only.kept["ILayerNorm"] == 13
    monkeypatch.delenv("QEXPORT_ORT_REWRITE")
    assert be.load(path, "cpu", rewrite=False).rewrite_report is None  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the saved ORT-CPU form


@pytest.fixture(scope="module")
def ort_cpu_files(int_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The saved ORT-CPU form of the MiniLM checkpoint, per u8s8 policy, through the CLI."""
    from qexport.cli import main

    out = {}
    for policy in ("portable", "vnni"):
        path = tmp_path_factory.mktemp("ortcpu") / f"model.{policy}.onnx"
        argv = ["onnx", str(int_checkpoint), "--form", "ort-cpu", "--linear", "integer", "--u8s8", policy]
        assert main([*argv, "-o", str(path)]) == 0
        out[policy] = path
    return out


@pytest.mark.parametrize("policy", ["portable", "vnni"])
def test_saved_ort_cpu_form_is_bit_exact_in_bare_onnxruntime(
    int_checkpoint: Path, ort_cpu_files: dict[str, Path], policy: str
) -> None:
    """Plain ``onnxruntime.InferenceSession`` (default options) on the saved file: 0 mismatches on rt
    text, and the metadata records the form, the policy and the rewrites."""
    import json

    import onnx
    import onnxruntime as ort

    from qexport.backends.ort_rewrite import exact_int8_gemms

    path = ort_cpu_files[policy]
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qexport_form"] == "ort-cpu" and meta["qexport_ort_u8s8"] == policy
    assert meta["preset"] == "full" and "logits_scale" in meta  # the exporter's metadata is kept
    applied = json.loads(meta["qexport_ort_rewrites"])
    assert applied["fused-linears"] == 6 and applied["softmax"] == 6 and applied["layernorm"] == 13
    assert not [n for n in model.graph.node if n.domain == "qexport"] and not model.functions
    if policy == "portable":  # 8-bit weights: u8 x u8, but for P V (probabilities: no pair sum saturates)
        assert applied["matmul-u8u8"] == 6 * 5 + 2 and applied["matmul-u8s8"] == 6
    else:
        assert applied["matmul-u8s8"] == 6 * 6 + 2 and "matmul-u8u8" not in applied
    if policy == "vnni" and "u8s8" not in exact_int8_gemms():
        pytest.skip("this CPU's u8 x s8 kernel is not exact: the vnni file is refused here (tested below)")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for feeds, ref in make_cases(int_checkpoint):
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
        np.testing.assert_array_equal(got["logits_int"], ref)


def test_backend_loads_the_saved_form_without_rewriting(
    int_checkpoint: Path, ort_cpu_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from qexport.backends import ort_rewrite

    def no_rewrite(*_: object, **__: object) -> None:
        raise AssertionError("a saved ORT-CPU file was rewritten again")

    monkeypatch.setattr(ort_rewrite, "rewrite_for_ort", no_rewrite)
    runner = get_backend("ort").load(ort_cpu_files["portable"], "cpu")
    assert runner.form["qexport_form"] == "ort-cpu"  # type: ignore[attr-defined]
    assert runner.rewrite_report.applied["fused-linears"] == 6  # type: ignore[attr-defined]
    feeds, ref = make_cases(int_checkpoint)[2]
    np.testing.assert_array_equal(runner.run(feeds)["logits_int"], ref)
    # compiling a saved file again copies it as it is
    saved = ort_cpu_files["portable"]
    again = get_backend("ort").compile(saved, saved.with_name("b.onnx"))
    assert again.read_bytes() == saved.read_bytes()


def test_vnni_file_is_refused_where_u8s8_is_not_exact(
    ort_cpu_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On an AVX2-only CPU (the probe finds only u8 x u8 exact) the vnni file is one clear error;
    the portable file still loads."""
    from qexport.backends import ort_rewrite
    from qexport.errors import BackendError

    monkeypatch.setattr(ort_rewrite, "exact_int8_gemms", lambda: frozenset({"u8u8"}))
    with pytest.raises(BackendError, match="--u8s8 vnni.*not exact.*--u8s8 portable"):
        get_backend("ort").load(ort_cpu_files["vnni"], "cpu")
    get_backend("ort").load(ort_cpu_files["portable"], "cpu")


@pytest.mark.parametrize(
    ("extra", "needle"),
    [(["--form", "ort-cpu", "--u8s8", "avx9"], "unknown u8s8 policy 'avx9'"),
     (["--form", "flat", "--u8s8", "vnni"], "--u8s8 applies to --form ort-cpu only"),
     (["--form", "ort-gpu"], "unknown form 'ort-gpu'")],
)
def test_ort_cpu_form_bad_options(int_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                  extra: list[str], needle: str) -> None:
    from qexport.cli import main

    assert main(["onnx", str(int_checkpoint), "-o", str(tmp_path / "m.onnx"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0]
    assert not list(tmp_path.iterdir())

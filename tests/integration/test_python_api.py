"""The Python API (``import qexport``): lazy public names that are the CLI's own objects, typed
errors for bad input, and the examples (own torch loop, ``transformers.Trainer``) end to end:
quantize -> calibrate -> fine-tune -> integer checkpoint -> ONNX -> ORT, bit-exact against the
integer reference on real Rotten Tomatoes texts."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import qexport

ROOT = Path(__file__).resolve().parents[2]


def test_import_is_lazy_and_fast() -> None:
    heavy = "('torch', 'onnx', 'transformers')"
    code = f"import sys, qexport; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_public_names_are_the_library_objects() -> None:
    assert set(qexport.__all__) == {"__version__", *qexport._API}
    for name, module in qexport._API.items():
        obj = getattr(qexport, name)
        assert obj is getattr(importlib.import_module(module), name), name
    assert issubclass(qexport.ModelError, qexport.QexportError)
    with pytest.raises(AttributeError, match="no attribute 'quantise_model'"):
        qexport.quantise_model  # noqa: B018
    assert set(qexport.PRESETS) >= {"fp", "linear", "full"}


def _tiny_bert() -> Any:
    from transformers import AutoModelForSequenceClassification, BertConfig

    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="eager")


def test_gpt2_is_refused_with_a_typed_error() -> None:
    from transformers import AutoModelForSequenceClassification, GPT2Config

    gpt = AutoModelForSequenceClassification.from_config(
        GPT2Config(vocab_size=100, n_positions=32, n_embd=32, n_layer=1, n_head=2, num_labels=2)
    )
    with pytest.raises(qexport.ModelError, match="unsupported model type 'gpt2'"):
        qexport.quantize_model(gpt, "full")
    assert not any(type(m).__module__.startswith("qexport") for m in gpt.modules())


def test_preset_typo_is_a_config_error() -> None:
    model = _tiny_bert()
    with pytest.raises(qexport.ConfigError, match="unknown preset 'ful': choose one of fp, linear"):
        qexport.quantize_model(model, "ful")
    with pytest.raises(qexport.ConfigError, match="weight_bits must be one of 2, 4, 8"):
        qexport.quantize_model(model, "full", weight_bits=3)
    assert getattr(model, "qexport_preset", None) is None  # nothing was swapped


def test_quantizing_twice_is_refused_and_dequantize_allows_it_again() -> None:
    model = _tiny_bert()
    qexport.quantize_model(model, "full")
    with pytest.raises(qexport.ModelError, match="already quantized \\(preset 'full'\\)"):
        qexport.quantize_model(model, "linear")
    qexport.dequantize_model(model)
    qexport.quantize_model(model, "linear")
    assert model.qexport_preset.name == "linear"


def test_freeze_before_calibration_is_a_model_error(tmp_path: Path) -> None:
    model = _tiny_bert()
    qexport.quantize_model(model, "full")
    with pytest.raises(qexport.ModelError, match="never observed: calibrate or train first"):
        qexport.save_checkpoint(model, tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def _parity_on_rt(ckpt: Path, onnx_file: Path, rows: int = 8) -> None:
    """The ORT backend's ``logits_int`` equal the integer reference's on the first rt test texts."""
    ref = qexport.reference_predictor(qexport.IntegerModel.from_checkpoint(ckpt))
    runner = qexport.load_backend(onnx_file, "ort")
    tok = qexport.load_tokenizer(ckpt)
    seen = 0
    for feeds, labels, _ in qexport.iter_batches("rt", tok, "test", limit=rows, batch_size=4, max_length=64):
        got, want = np.asarray(runner.run(feeds)["logits_int"]), ref(feeds)
        assert got.dtype.kind == "i" and np.array_equal(got.astype(np.int64), want)
        assert labels is not None
        seen += len(feeds["input_ids"])
    assert seen == rows


def _env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (subprocesses run this tree)."""
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def _run_example(name: str, out: Path) -> None:
    env = _env()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--fp-steps", "2", "--qat-steps", "2",
         "--test-limit", "16", "-o", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=900, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"test_examples": 16' in proc.stdout


def test_own_loop_example(tmp_path: Path) -> None:
    out = tmp_path / "own"
    _run_example("own_loop.py", out)
    assert qexport.read_manifest(out / "checkpoint")["preset"] == "full"
    _parity_on_rt(out / "checkpoint", out / "model.onnx")


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None,
                    reason="transformers.Trainer needs accelerate (pip install -e .[dev])")
def test_hf_trainer_example(tmp_path: Path) -> None:
    out = tmp_path / "hf"
    _run_example("hf_trainer.py", out)
    _parity_on_rt(out / "checkpoint", out / "model.onnx")


def test_readme_snippet_runs(tmp_path: Path) -> None:
    """The README's "Python API" block, as written, in a scratch directory."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("### Python API")
    block = readme[readme.index("```python\n", start) + len("```python\n") :]
    block = block[: block.index("```")]
    code = block + "\nprint('ACCURACY', ev.metric['metric'], ev.examples)\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=_env(), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "artifacts" / "api" / "checkpoint" / "manifest.json").is_file()
    assert "ACCURACY" in proc.stdout and proc.stdout.strip().endswith(" 1334")

"""CI type-checks the TensorRT backend against tensorrt-stubs: prove the check is live."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / ".venv" / "trt-typings" / "tensorrt" / "__init__.pyi"


@pytest.mark.skipif(not STUBS.is_file(), reason="patched tensorrt-stubs missing: run make venv")
def test_mypy_rejects_a_wrong_tensorrt_call(tmp_path: Path) -> None:
    bad = ROOT / "qexport" / "backends" / "_trt_typing_probe.py"
    bad.write_text(
        "import tensorrt as trt\n\n\n"
        "def f(config: trt.IBuilderConfig) -> None:\n"
        "    config.set_memory_pool_limits(trt.MemoryPoolType.WORKSPACE, 1 << 20)\n"
    )
    try:
        mypy = shutil.which("mypy", path=str(Path(sys.executable).parent)) or "mypy"
        bad_run = subprocess.run([mypy, str(bad)], cwd=ROOT, capture_output=True, text=True, check=False)
        good_run = subprocess.run(
            [mypy, "qexport/backends/trt.py"], cwd=ROOT, capture_output=True, text=True, check=False
        )
    finally:
        bad.unlink()
    assert bad_run.returncode == 1 and "set_memory_pool_limits" in bad_run.stdout
    assert good_run.returncode == 0, good_run.stdout

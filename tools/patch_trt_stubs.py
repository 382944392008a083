"""Make the installed ``tensorrt-stubs`` readable by mypy (writes a fixed copy to DEST).

The published stubs (10.13) put their .pyi files in a plain ``tensorrt/`` folder with
no ``py.typed``, use ``in`` as a parameter name, put a required parameter after
defaulted ones, and define a module-level ``bool`` that shadows the builtin. This
copies them to DEST with those three things fixed; ``[tool.mypy] mypy_path`` points
there so ``qexport/backends/trt.py`` is checked against TensorRT's real API.

Usage: python tools/patch_trt_stubs.py .venv/trt-typings
"""

from __future__ import annotations

import pathlib
import re
import sys
import sysconfig

BOOL = re.compile(r"(?<![\w.])bool(?!\w)")
FILES = ("tensorrt/__init__.pyi", "tensorrt_bindings/__init__.pyi", "tensorrt_bindings/tensorrt.pyi")


def main(dest: pathlib.Path) -> int:
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    if not (site / FILES[0]).is_file():
        print("tensorrt-stubs not installed: pip install --no-deps tensorrt-stubs", file=sys.stderr)
        return 1
    for rel in FILES:
        out = []
        for line in (site / rel).read_text().splitlines(keepends=True):
            if line.startswith("from __future__ import annotations"):
                line += "import builtins\n"
            elif not line.startswith("bool:"):
                line = BOOL.sub("builtins.bool", line)
            if line.lstrip().startswith("def "):
                line = re.sub(r"([(,] ?)in: ", r"\1in_: ", line)
                line = line.replace(", channel_axis: int)", ", channel_axis: int = ...)")
            out.append(line)
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/trt-typings")))

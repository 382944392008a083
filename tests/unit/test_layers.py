"""Stage order of the package's imports: an earlier stage never imports a later one.

    ops <- quant <- models <- train / export <- backends <- verify <- report <- demo / cli

``errors``, ``io``, ``host``, ``config``, ``data`` and ``evaluation`` (the one loop over a task split: it
imports only ``data`` and ``errors`` and runs any predictor it is given) are base layers: any
stage may import them, and they import only each other. The package root ``qexport/__init__.py``
is the public face: the stages may import it (for ``__version__``) and it may name any stage.
Every ``import`` and ``from ... import`` in every module is checked, those inside functions
included (they are how heavy or optional modules load lazily, and they are dependencies all
the same).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "qexport"

BASE = 0
#: first dotted component under ``qexport`` -> stage rank (0: base layer)
STAGES: dict[str, int] = {
    "": BASE, "errors": BASE, "io": BASE, "host": BASE, "config": BASE, "data": BASE, "evaluation": BASE,
    "ops": 1,
    "quant": 2,
    "models": 3,
    "train": 4, "export": 4, "ptq": 4,
    "backends": 5,
    "verify": 6,
    "report": 7,
    "demo": 8, "env": 8, "cli": 8,
}


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "qexport", module
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every qexport import in ``path`` (relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    me = _module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qexport"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "qexport":
                continue
            if mod == "qexport":  # `from qexport import x`: x may be a subpackage
                found += [(node.lineno, f"qexport.{a.name}") for a in node.names if a.name in STAGES]
                found += [(node.lineno, "qexport") for a in node.names if a.name not in STAGES]
            else:
                found.append((node.lineno, mod))
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    bad: list[str] = []
    for path in sorted(root.rglob("*.py")):
        me = _module_name(path, root)
        mine = STAGES[_stage(me)] if me != "qexport" else max(STAGES.values())
        for line, mod in _imports(path, root):
            theirs = STAGES[_stage(mod)]
            if theirs > mine:
                rel = path.relative_to(root.parent)
                bad.append(f"{rel}:{line}: {me} (stage {_stage(me) or 'qexport'}) imports {mod}")
    return bad


def test_every_module_has_a_stage() -> None:
    unknown = sorted({_stage(_module_name(p)) for p in PACKAGE.rglob("*.py")} - set(STAGES))
    assert unknown == [], f"add these to STAGES: {unknown}"


def test_no_import_from_a_later_stage() -> None:
    assert violations() == []


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def f():\n    from qexport.backends import get_backend\n", ["qexport.backends"]),
        ("import qexport.report.size as s\n", ["qexport.report.size"]),
        ("from . import kernels\n", ["qexport.ops"]),
        ("from ..verify import verify\n", ["qexport.verify"]),
        ("from qexport import verify, __version__\n", ["qexport.verify", "qexport"]),
        ("import numpy\nfrom onnx import helper\n", []),
    ],
)
def test_imports_are_found(source: str, expected: list[str], tmp_path: Path) -> None:
    """Function-level, aliased, relative and package-root imports are all seen (the check can fail)."""
    root = tmp_path / "qexport"
    (root / "ops").mkdir(parents=True)
    probe = root / "ops" / "probe.py"
    probe.write_text(source)
    assert [m for _, m in _imports(probe, root)] == expected
    later = [m for m in expected if STAGES[_stage(m)] > STAGES["ops"]]
    found = violations(root)
    assert len(found) == len(later)
    assert all(f.startswith("qexport/ops/probe.py:") for f in found)

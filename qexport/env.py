"""``qexport env``: what this machine offers qexport (library versions, CPU features, backends).

Versions come from the installed distributions' metadata (nothing heavy is imported for them);
CPU features from ``/proc/cpuinfo``'s flags (Linux; empty elsewhere); each backend says whether
it can run here through :meth:`qexport.backends.base.Backend.available` (its runtime imports, or
the reason it does not).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from typing import Any

from qexport.host import cpu_flags, cpu_model

#: CPU flags that decide which integer kernels run fast (ORT's u8s8 GEMM rule, TVM's targets).
CPU_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8", "fma")


def _nvcc() -> str | None:
    """``nvcc``'s release line, or None when it is not on PATH."""
    path = shutil.which("nvcc")
    if path is None:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return path
    release = [ln for ln in out.stdout.splitlines() if "release" in ln]
    return f"{path} ({release[-1].strip()})" if release else path


def environment() -> dict[str, Any]:
    """Python and library versions, CPU model and features, backends (available or why not), nvcc."""
    from qexport.backends import backend_names, get_backend
    from qexport.report.system import versions

    flags = cpu_flags()
    backends: dict[str, dict[str, Any]] = {}
    for name in backend_names():
        try:
            ok, info = get_backend(name).available()
        except Exception as exc:  # a runtime that breaks on import is "not available", with why
            ok, info = False, f"{type(exc).__name__}: {exc}"
        backends[name] = {"available": ok, "info": info}
    return {
        "platform": platform.platform(),
        "versions": versions(),
        "cpu": {"model": cpu_model(), "features": {f: f in flags for f in CPU_FEATURES}},
        "backends": backends,
        "nvcc": _nvcc(),
    }


def format_environment(env: dict[str, Any]) -> str:
    """``env`` as aligned text lines (what ``qexport env`` prints without ``--json``)."""
    lines = [f"platform        {env['platform']}"]
    for k, v in env["versions"].items():
        lines.append(f"{k:<16}{v if v is not None else 'not installed'}")
    feats = env["cpu"]["features"]
    lines.append(f"cpu             {env['cpu']['model']}")
    lines.append("cpu features    " + (" ".join(f for f, on in feats.items() if on) or "none of "
                                     + ", ".join(feats)))
    for name, b in env["backends"].items():
        state = f"available ({b['info']})" if b["available"] else f"not available: {b['info']}"
        lines.append(f"backend {name:<8}{state}")
    lines.append(f"nvcc            {env['nvcc'] or 'not found on PATH'}")
    return "\n".join(lines)

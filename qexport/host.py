"""Facts about the machine qexport runs on: CPU model and feature flags (``/proc/cpuinfo``).

A base layer: backends choose kernels from :func:`cpu_flags` (never assume a feature: machines
of the same kind differ, some with AVX-512 VNNI, some with AVX2 only), ``qexport env`` and the
report print them.
"""

from __future__ import annotations

import contextlib
import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The ``flags`` of the first CPU in ``/proc/cpuinfo`` (empty when there is none)."""
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "flags":
                return set(val.split())
    return set()


def cpu_model() -> str:
    """CPU model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in CPUINFO.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"

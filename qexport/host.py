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

#: ``/proc/cpuinfo`` flag -> LLVM target feature, for the instruction sets a compiler may emit
#: when it vectorises. A host's LLVM CPU name can promise more than the machine has (a VM that
#: reports a Zen 4 model but hides AVX-512): the flags say what runs.
LLVM_FEATURES = {
    "avx": "avx",
    "avx2": "avx2",
    "fma": "fma",
    "f16c": "f16c",
    "bmi1": "bmi",
    "bmi2": "bmi2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512cd": "avx512cd",
    "avx512dq": "avx512dq",
    "avx512vl": "avx512vl",
    "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi",
    "avx512_vbmi2": "avx512vbmi2",
    "avx512_vnni": "avx512vnni",
    "avx512_bf16": "avx512bf16",
    "avx512_bitalg": "avx512bitalg",
    "avx512_vpopcntdq": "avx512vpopcntdq",
    "avx512_fp16": "avx512fp16",
    "avx_vnni": "avxvnni",
    "amx_tile": "amx-tile",
    "amx_int8": "amx-int8",
    "amx_bf16": "amx-bf16",
    "gfni": "gfni",
    "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
}


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

"""What a report ran on (CPU, GPU, library versions) and how much memory a runtime used.

Memory is measured without psutil:

* CPU: the process's resident set from ``/proc/self/status``. The high-water mark
  (``VmHWM``) is reset before each measured shape by writing ``5`` to
  ``/proc/self/clear_refs`` (Linux >= 4.0), so ``VmHWM - baseline`` is the peak a runtime
  reached at that shape, where ``baseline`` is the RSS taken before the runtime was
  loaded, after ``malloc_trim`` has handed freed heap back to the OS (so the number
  includes the runtime's weights, arena and activations). Without
  ``clear_refs`` the process-wide ``ru_maxrss`` is used (it cannot be reset: an
  upper bound, marked so in ``source``).
* CUDA: ``torch.cuda.max_memory_allocated`` (reset per shape) for runtimes whose memory
  goes through torch's allocator (the PyTorch rows); for ORT, TVM and TensorRT, which
  allocate outside torch, the device-wide used memory from ``cudaMemGetInfo`` after the
  timed runs minus the baseline (arenas and engine contexts keep their peak allocation,
  so this is their peak, up to allocator rounding).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexport.host import cpu_model

#: Distributions whose versions go into report.json and ``qexport env`` (absent ones: None).
VERSIONED = (
    "qexport",
    "torch",
    "transformers",
    "onnx",
    "onnxruntime",
    "onnxruntime-gpu",
    "onnxscript",
    "apache-tvm",
    "apache-tvm-ffi",
    "tensorrt",
    "numpy",
    "matplotlib",
)


def physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs in ``/proc/cpuinfo``; None when unknown."""
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                core = val.strip()
                cores.add((phys, core))
    return len(cores) or None


def gpu_info() -> dict[str, Any] | None:
    """Name, memory and compute capability of CUDA device 0, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        props = torch.cuda.get_device_properties(0)
        return {
            "name": str(props.name),
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "cuda": str(torch.version.cuda),
            "count": int(torch.cuda.device_count()),
        }
    except Exception:  # broken drivers: report no GPU rather than fail the report
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def hardware() -> dict[str, Any]:
    """CPU model, logical and physical cores, memory, load average, GPU (None without one)."""
    mem = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    load = None
    with contextlib.suppress(OSError, AttributeError):
        load = [round(x, 2) for x in os.getloadavg()]
    return {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "physical_cores": physical_cores(),
        "memory_bytes": mem,
        "platform": platform.platform(),
        "loadavg_at_start": load,
        "gpu": gpu_info(),
    }


def threads() -> dict[str, int | None]:
    """Intra-op thread counts the runtimes use by default (recorded; never changed here)."""
    out: dict[str, int | None] = {"torch": None}
    with contextlib.suppress(Exception):
        import torch

        out["torch"] = int(torch.get_num_threads())
    return out


# ----------------------------------------------------------------------------- memory


def _status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc ``malloc_trim``), so RSS deltas see new allocations."""
    with contextlib.suppress(Exception):
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if name:
            ctypes.CDLL(name).malloc_trim(0)


def _torch_cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _maxrss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


@dataclass
class MemoryProbe:
    """Peak memory of one runtime at one shape; see the module docstring for the method.

    Use: ``probe = MemoryProbe(device, torch_allocator)``; ``probe.baseline()`` before
    loading the runtime; per shape ``probe.start()`` before warm-up and ``probe.peak()``
    after the timed runs -> ``(bytes or None, source)``.
    """

    device: str
    torch_allocator: bool = False
    _base: int | None = None
    _can_reset: bool = True

    def baseline(self) -> None:
        gc.collect()
        if self.device == "cuda" and not _torch_cuda():
            self._base = None  # no torch CUDA to ask: peak() says "unavailable"
            return
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if self.torch_allocator:
                self._base = int(torch.cuda.memory_allocated())
            else:
                free, total = torch.cuda.mem_get_info()
                self._base = int(total - free)
        else:
            _trim_heap()
            kb = _status_kb("VmRSS")
            self._base = None if kb is None else kb * 1024
            if self._base is None:
                self._base = _maxrss_bytes()

    def start(self) -> None:
        if self.device == "cuda" and self._base is None:
            return
        if self.device == "cuda":
            import torch

            if self.torch_allocator:
                torch.cuda.reset_peak_memory_stats()
        else:
            self._can_reset = _reset_hwm()

    def peak(self) -> tuple[int | None, str]:
        if self._base is None:
            return None, "unavailable"
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            if self.torch_allocator:
                return max(0, int(torch.cuda.max_memory_allocated()) - self._base), (
                    "torch.cuda.max_memory_allocated"
                )
            free, total = torch.cuda.mem_get_info()
            return max(0, int(total - free) - self._base), "cudaMemGetInfo used delta"
        hwm = _status_kb("VmHWM")
        if hwm is not None and self._can_reset:
            return max(0, hwm * 1024 - self._base), "RSS high-water delta"
        maxrss = _maxrss_bytes()
        if maxrss is None:
            return None, "unavailable"
        return max(0, maxrss - self._base), "process ru_maxrss delta (upper bound)"

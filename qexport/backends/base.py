"""Backend ABC and registry.

A backend turns an ONNX file into something it can run (``compile``), loads
that artifact on a device (``load``) and runs it on numpy feeds (``Runner.run``).
Public methods check their inputs and raise :class:`~qexport.errors.BackendError`
with a one-line message; subclasses implement the ``_impl`` methods.

Heavy runtimes (tvm, tensorrt, onnxruntime-gpu) are imported inside the
backend's ``_impl`` methods, never at module import, so ``import qexport``
stays fast and a missing runtime is a clear message, not an ImportError trace.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from qexport.errors import BackendError

_REGISTRY: dict[str, type[Backend]] = {}


class Runner(abc.ABC):
    """A loaded, ready-to-run model."""

    input_names: tuple[str, ...] = ("input_ids", "attention_mask")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise BackendError(f"missing inputs {missing}; expected {list(self.input_names)}")
        return self._run_impl(feeds)

    @abc.abstractmethod
    def _run_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def synchronize(self) -> None:  # noqa: B027 - optional hook, a no-op on CPU
        """Wait for queued device work (timing); a no-op on CPU."""


class Backend(abc.ABC):
    """One runtime: ``ort``, ``tvm`` or ``trt``."""

    name: ClassVar[str]
    install_hint: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if getattr(cls, "name", None):
            _REGISTRY[cls.name] = cls

    @classmethod
    @abc.abstractmethod
    def available(cls) -> tuple[bool, str]:
        """``(True, version)`` when the runtime imports, else ``(False, reason)``."""

    @classmethod
    def require(cls) -> str:
        ok, info = cls.available()
        if not ok:
            raise BackendError(info)
        return info

    def compile(self, model: Path, output: Path | None = None, **options: Any) -> Path:
        model = Path(model)
        read_onnx(model)  # a missing or non-ONNX file: one BackendError line, whatever the backend
        self.require()
        return self._compile_impl(model, None if output is None else Path(output), **options)

    def load(self, artifact: Path, device: str = "cpu", **options: Any) -> Runner:
        artifact = Path(artifact)
        if not artifact.exists():
            raise BackendError(f"{self.name} artifact not found: {artifact}")
        if device not in ("cpu", "cuda"):
            raise BackendError(f"unknown device {device!r}: use cpu or cuda")
        self.require()
        return self._load_impl(artifact, device, **options)

    @abc.abstractmethod
    def _compile_impl(self, model: Path, output: Path | None, **options: Any) -> Path: ...

    @abc.abstractmethod
    def _load_impl(self, artifact: Path, device: str, **options: Any) -> Runner: ...


def read_onnx(path: Path) -> Any:
    """The ``onnx.ModelProto`` in ``path`` (external data not loaded).

    Raises :class:`~qexport.errors.BackendError` (one line) when the file is missing or is not
    an ONNX model: protobuf decodes some junk (an empty file, a few stray bytes) as an empty
    message, so a model without an IR version or graph outputs is refused too.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise BackendError(f"ONNX model not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors: they vary by version
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BackendError(f"{path} is not an ONNX model: {first}") from None
    if proto.ir_version <= 0 or not proto.graph.output:
        raise BackendError(f"{path} is not an ONNX model: no IR version or no graph outputs")
    return proto


def get_backend(name: str) -> Backend:
    """Instantiate the backend registered as ``name`` (imports its module on demand)."""
    _import_builtin_backends()
    if name not in _REGISTRY:
        raise BackendError(f"unknown backend {name!r}: choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]()


def load_backend(
    artifact: Path | str,
    backend: str = "ort",
    device: str = "cpu",
    *,
    output: Path | None = None,
    compile_options: dict[str, Any] | None = None,
    **load_options: Any,
) -> Runner:
    """A ready :class:`Runner` for ``artifact`` on ``backend``.

    ``artifact`` is what the backend loads (an ONNX file for ``ort``, a TVM directory, a TensorRT
    plan) or an ONNX file for a compiling backend (``tvm``, ``trt``), which is compiled first
    (``compile_options``, e.g. ``{"target": "llvm"}``; into ``output`` or the backend's default
    path next to the file). ``Runner.run({"input_ids": ..., "attention_mask": ...})`` returns
    ``logits`` and ``logits_int``. :class:`BackendError` for an unknown backend, a missing runtime
    or artifact, or a model the backend cannot compile.
    """
    be = get_backend(backend)
    path = Path(artifact)
    if backend != "ort" and path.suffix == ".onnx":
        path = be.compile(path, output, **(compile_options or {}))
    return be.load(path, device, **load_options)


def backend_names() -> list[str]:
    _import_builtin_backends()
    return sorted(_REGISTRY)


def _import_builtin_backends() -> None:
    # The modules themselves import nothing heavy at top level.
    import importlib

    for mod in ("ort", "tvm", "trt"):
        try:
            importlib.import_module(f"qexport.backends.{mod}")
        except ModuleNotFoundError as exc:  # a backend module not written yet
            if exc.name != f"qexport.backends.{mod}":
                raise

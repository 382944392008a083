"""Runtimes that compile and run qexport's integer ONNX: ort, tvm, trt."""

from qexport.backends.base import Backend, Runner, backend_names, get_backend, load_backend

__all__ = ["Backend", "Runner", "backend_names", "get_backend", "load_backend"]

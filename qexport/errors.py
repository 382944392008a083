"""Typed errors: every bad input becomes one clear line and an exit code.

The CLI catches :class:`QexportError` and prints ``error: <message>`` to stderr,
then exits with ``exit_code`` (2 for bad input, 1 for a failed check such as a
parity mismatch). Nothing else in the package calls ``sys.exit``.
"""

from __future__ import annotations


class QexportError(Exception):
    """Base class: a message a user can act on, and the exit code to use."""

    exit_code: int = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message} ({hint})")


class ConfigError(QexportError):
    """A recipe, preset or option that fails validation."""


class CheckpointError(QexportError):
    """A checkpoint directory that is missing, incomplete or corrupt."""


class ModelError(QexportError):
    """A model that cannot be loaded or is not a supported architecture."""


class DataError(QexportError):
    """A data set that is missing, empty or malformed."""


class ExportError(QexportError):
    """An ONNX export that cannot be done as asked."""


class BackendError(QexportError):
    """A backend that is missing, or a model it cannot compile or run."""


class OverflowRisk(QexportError):
    """An integer intermediate that would leave its documented range."""


class ParityError(QexportError):
    """A backend whose integer outputs differ from the reference."""

    exit_code = 1

"""The qonnx error hierarchy: one base class, a few named kinds, causes chained."""

from __future__ import annotations


class QonnxError(Exception):
    """Base of every error qonnx raises on purpose; its message is meant for a person."""


class InputError(QonnxError):
    """The model file, the calibration data or a path given by the user is unusable."""


class UnsupportedModelError(InputError):
    """The model uses something qonnx refuses to transform (the message says what)."""


class PipelineParseError(QonnxError):
    """A pipeline string does not parse, names an unknown pass or option, or has a bad value."""


class PreconditionError(QonnxError):
    """A pipeline is well-formed but cannot run: missing data, bad ordering of passes."""


class PassError(QonnxError):
    """A pass failed while running."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"pass '{pass_name}' failed: {message}")
        self.pass_name = pass_name


class VerificationError(QonnxError):
    """A verifier found the model broken after a pass."""


class ExportError(QonnxError):
    """The quantized model could not be written as ONNX."""

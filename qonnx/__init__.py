"""qonnx: a compiler-style post-training quantization toolkit for ONNX graphs.

The distribution is named `qonnx-opt` (the PyPI name `qonnx` belongs to an
unrelated FINN project); the import name and the command are `qonnx`.
"""

from qonnx._version import __version__
from qonnx.app.api import OptimizeResult, optimize, quantize_file
from qonnx.core.ir import Model, load_model
from qonnx.errors import QonnxError
from qonnx.infra.pipeline import Pass, Pipeline

__all__ = ["Model", "OptimizeResult", "Pass", "Pipeline", "QonnxError", "__version__", "load_model", "optimize",
           "quantize_file"]

"""qonnx: a compiler-style post-training quantization toolkit for ONNX graphs.

The distribution is named `qonnx-opt` (the PyPI name `qonnx` belongs to an
unrelated FINN project); the import name and the command are `qonnx`.
"""

__version__ = "0.1.0"

from qonnx.api import OptimizeResult, optimize, quantize_file  # noqa: E402
from qonnx.errors import QonnxError  # noqa: E402
from qonnx.ir import Model, load_model  # noqa: E402
from qonnx.pipeline import Pass, Pipeline  # noqa: E402

__all__ = ["Model", "OptimizeResult", "Pass", "Pipeline", "QonnxError", "load_model", "optimize", "quantize_file"]

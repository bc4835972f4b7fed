"""Quantization-aware fine-tuning (the `qat` pass): a small torch interpreter of the canonical IR, fake quantizers
that follow the quant table, oscillation tracking and the training loop.

torch is an optional extra (`pip install qonnx-opt[qat]`): it is imported only inside this package, and only when
the qat pass runs, so the rest of qonnx works without it.
"""

from __future__ import annotations

from types import ModuleType

from qonnx.errors import PreconditionError

INSTALL_HINT = "pip install qonnx-opt[qat]"


def require_torch() -> ModuleType:
    """The torch module, or a PreconditionError saying how to install it."""
    try:
        import torch
    except ImportError as e:  # also raised when sys.modules['torch'] is None (blocked)
        raise PreconditionError(f"pass 'qat' needs PyTorch, which is not installed: {INSTALL_HINT}") from e
    return torch

"""Numeric checks between two float models (used by the numeric verifier), and the float types they allow."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from qonnx.core.ir import Model
from qonnx.data.calibration import CalibrationSet
from qonnx.errors import UnsupportedModelError
from qonnx.runtime.ort import make_session

# How far an exact pass may move the float outputs (largest change over the output's largest magnitude), per
# float type the model computes in. An exact pass (fold-bn, canonicalize, ...) computes new constants in float64
# and rounds them once to the model's type, so each folded constant moves by up to the unit roundoff u (half an
# ulp) and the one rounding of the removed intermediate (BatchNorm's output) disappears; the outputs then move
# by a few u relative to their magnitude, independently of the depth (one pass changes one layer at a time).
# - float32 (u = 6e-8): 1e-4 as always, far above rounding: it also absorbs ORT kernels summing in another order.
# - float16 (u = 2**-11 = 4.9e-4, eps 9.8e-4): 2e-3 = 4u = 2 eps. fold-bn on Conv+BN+Relu+Conv (tests/helpers,
#   seeds 0-4) moves the outputs by 3.9e-4 to 7.7e-4 (0.8u to 1.6u); 1e-4 rejected every float16 model with a
#   BatchNorm. A few ulps times the depth would be too loose: one exact pass rounds once, whatever the depth.
# - bfloat16 (u = 2**-8 = 3.9e-3, eps 7.8e-3): 1.6e-2 = 4u = 2 eps, the same margin.
# A model mixing types is held to its coarsest one.
VERIFY_RTOL: dict[str, float] = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}
DEFAULT_RTOL = VERIFY_RTOL["float32"]

# Float types ONNX Runtime cannot take as a graph input or return as an output (ORT 1.32): its Python API has no
# bfloat16 arrays ("No corresponding Numpy type"), and its CPU execution provider has no bfloat16 Conv, Relu,
# BatchNormalization or QuantizeLinear kernels either. A bfloat16 Cast inside a float32 graph runs (not refused).
ORT_CPU_UNSUPPORTED: dict[str, str] = {
    "bfloat16": "ONNX Runtime cannot take or return bfloat16 arrays and its CPU execution provider has no "
                "bfloat16 Conv/BatchNormalization/QuantizeLinear kernels, so the model cannot be calibrated or "
                "checked; convert it to float32 or float16",
}


def float_type_name(dtype: Any) -> str | None:
    """'float32', 'float16', 'bfloat16', ... for a numpy dtype or an ONNX element type (None if not a float)."""
    if dtype is None:
        return None
    try:
        dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype) if isinstance(dtype, int) else dtype)
    except (TypeError, KeyError, ValueError):
        return None
    name = dt.name
    return name if name == "bfloat16" or np.issubdtype(dt, np.floating) else None


def float_types(model: Model) -> set[str]:
    """The float types of the model's tensors (inputs, outputs, constants and typed intermediates); constants
    by their dtype, so lazily loaded weights stay on disk."""
    return {kind for tensor in model.tensors().values() if (kind := float_type_name(tensor.dtype)) is not None}


def verify_rtol(model: Model) -> float:
    """The numeric verifier's tolerance for a model: that of its coarsest float type."""
    return max((VERIFY_RTOL.get(t, DEFAULT_RTOL) for t in float_types(model)), default=DEFAULT_RTOL)


def refuse_unrunnable_types(model: Model) -> None:
    """Refuse, in one line, a model whose graph inputs or outputs have a float type ONNX Runtime cannot run."""
    for role, tensors in (("input", model.inputs), ("output", model.outputs)):
        for tensor in tensors:
            kind = float_type_name(tensor.dtype)
            if kind in ORT_CPU_UNSUPPORTED:
                raise UnsupportedModelError(f"graph {role} '{tensor.name[:60]}' is {kind}: {ORT_CPU_UNSUPPORTED[kind]}")


def sample_feed(model: Model, calibration: CalibrationSet | None = None, seed: int = 0, batch: int = 2
                ) -> dict[str, np.ndarray]:
    """Inputs to compare models on: a calibration batch if there is one, else seeded noise."""
    if calibration is not None:
        return calibration.first_batch(batch)
    rng = np.random.default_rng(seed)
    feed = {}
    for tensor in model.inputs:
        dims = [d if isinstance(d, int) and d > 0 else (batch if i == 0 else 8)
                for i, d in enumerate(tensor.shape or [])]
        dtype = Model.dtype_of(tensor) or np.dtype(np.float32)
        if np.issubdtype(dtype, np.floating):
            feed[tensor.name] = rng.standard_normal(dims).astype(dtype)
        elif dtype == np.bool_:
            feed[tensor.name] = np.ones(dims, dtype=bool)
        else:
            feed[tensor.name] = rng.integers(0, 2, size=dims).astype(dtype)
    return feed


def compare_float_models(before: Model, after: Model, calibration: CalibrationSet | None = None,
                         seed: int = 0) -> float:
    """Largest output change relative to the output's magnitude, over all outputs."""
    refuse_unrunnable_types(before)
    feed = sample_feed(before, calibration, seed)
    ref = make_session(before.to_bytes()).run(None, feed)
    new = make_session(after.to_bytes()).run(None, feed)
    worst = 0.0
    for a, b in zip(ref, new):
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.size == 0:
            continue
        scale = max(float(np.max(np.abs(a))), 1e-12)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst

"""Quantization parameters of weights and biases, and the integer codes the exporters write."""

from __future__ import annotations

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role, TensorQuant
from qonnx.numerics.quant import quantize, scale_in_float_type, scale_zero_point
from qonnx.numerics.ranges import RangeOptions
from qonnx.numerics.weight_ranges import weight_range

INT32_LIMIT = 2**31 - 1


def _guard_bias(bias: np.ndarray, s_x: float, s_w: np.ndarray) -> tuple[np.ndarray, int]:
    """Raise weight scales of channels whose int32 bias would overflow (dead channels)."""
    need: np.ndarray | np.float64 = np.abs(bias.astype(np.float64)) / (float(s_x) * INT32_LIMIT * 0.5)
    if s_w.ndim == 0:  # per-tensor weights: one scale must serve every channel
        need = np.max(need)
    grow = need > s_w
    return np.where(grow, need, s_w).astype(np.float32), int(np.count_nonzero(grow))


def in_tensor_type(model: Model, tensor, scale: np.ndarray) -> np.ndarray:
    """A float16 tensor's scale rounded to float16 (held as float32), the value its Q/DQ will hold, so that codes
    computed from the table equal what the exported model computes; other scales are returned as they are."""
    if model.dtype_of(tensor) != np.float16:
        return scale
    return scale_in_float_type(scale, np.float16).astype(np.float32)


def calibrate_weights(model: Model, method: str, range_opts: RangeOptions | None = None) -> None:
    """Weight ranges (data independent); weights already rounded (AdaRound) keep their scales."""
    tensors = model.tensors()
    for name, entry in model.quant.of_role(Role.WEIGHT).items():
        if entry.state is QuantState.ROUNDED:
            continue
        values = model.constant_value(tensors[name])
        assert values is not None  # plan quantizes constant weights only
        rmin, rmax = weight_range(values, entry.scheme, method, range_opts or RangeOptions())
        scale, entry.zero_point = scale_zero_point(rmin, rmax, entry.scheme)
        entry.scale = in_tensor_type(model, tensors[name], scale)
        entry.method, entry.state = method, QuantState.CALIBRATED


def set_bias_params(model: Model) -> int:
    """int32 bias parameters (scale s_x * s_w, zero point 0); returns how many weight scales grew.

    A weight scale grows only where the int32 bias would overflow (dead channels).
    """
    table, tensors, grown = model.quant, model.tensors(), 0
    for name, entry in table.of_role(Role.BIAS).items():
        assert entry.bias_of is not None  # plan records the layer's input and weight with every bias
        x_name, w_name = entry.bias_of
        x_entry, w_entry = table.get(x_name), table.get(w_name)
        bias = model.constant_value(tensors[name])
        # Plan quantizes a layer's input and weight with its constant bias, and both are calibrated
        # (the pipeline requires it) before the bias parameters are set.
        assert x_entry is not None and w_entry is not None and bias is not None
        assert x_entry.scale is not None and w_entry.scale is not None
        if w_entry.state is not QuantState.ROUNDED:
            w_entry.scale, n = _guard_bias(bias, float(x_entry.scale), np.asarray(w_entry.scale))
            grown += n
        entry.scale = in_tensor_type(model, tensors[name],
                                     (np.float32(x_entry.scale) * w_entry.scale).astype(np.float32).reshape(-1))
        entry.zero_point = np.zeros(entry.scale.shape, np.int64)
        entry.state = QuantState.CALIBRATED
    return grown


def quantized_weight_codes(entry: TensorQuant, values: np.ndarray) -> np.ndarray:
    """The integer codes of a weight: those a rounding pass fixed (AdaRound), else nearest rounding."""
    if entry.codes is not None:
        return np.asarray(entry.codes)
    assert entry.scale is not None and entry.zero_point is not None  # callers pass calibrated weights only
    return quantize(values, entry.scale, entry.zero_point, entry.scheme)

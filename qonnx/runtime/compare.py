"""Numeric checks between two float models (used by the numeric verifier)."""

from __future__ import annotations

import numpy as np

from qonnx.core.ir import Model
from qonnx.data.calibration import CalibrationSet
from qonnx.runtime.ort import make_session


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

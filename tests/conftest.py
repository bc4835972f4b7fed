"""Shared fixtures (fixtures only: the builders and helpers they use are in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest

from tests.helpers import MODEL_BUILDERS, conv_bn_relu_conv, make_samples, rng, save_model, save_npz


# --------------------------------------------------------------------------- fixtures
@pytest.fixture
def seeded() -> np.random.Generator:
    return rng(0)


@pytest.fixture(params=sorted(MODEL_BUILDERS))
def any_model(request) -> tuple[str, onnx.ModelProto]:
    return request.param, MODEL_BUILDERS[request.param]()


@pytest.fixture
def model_file(tmp_path) -> Callable[..., Path]:
    """Write a model proto (default conv-bn-relu-conv) to tmp_path and return the path."""

    def write(model: onnx.ModelProto | None = None, name: str = "m.onnx") -> Path:
        return save_model(model if model is not None else conv_bn_relu_conv(), tmp_path / name)

    return write


@pytest.fixture
def calib_file(tmp_path) -> Callable[..., Path]:
    """Write calibration .npz for a model (n samples, seeded) and return the path."""

    def write(model: onnx.ModelProto | None = None, n: int = 16, seed: int = 0, name: str = "calib.npz",
              arrays: dict[str, np.ndarray] | None = None) -> Path:
        model = model if model is not None else conv_bn_relu_conv()
        return save_npz(tmp_path / name, arrays if arrays is not None else make_samples(model, n, seed))

    return write


@pytest.fixture
def ctx():
    from qonnx.infra.context import PassContext

    return PassContext(seed=0)


@pytest.fixture(autouse=True)
def timing_independent_default(monkeypatch, request):
    """Unit tests run the default preset without its latency measurement (keep-fast).

    On these tiny models integer kernels always lose to float, so keep-fast would
    (correctly) return float models and hide what the exporter tests look at;
    keep-fast has its own tests (passes/test_keep_fast.py), and infra/test_pipeline checks the
    real preset text.
    """
    if request.node.get_closest_marker("realmodel") or "test_pipeline" in request.node.nodeid:
        return
    from qonnx.passes import PRESETS

    monkeypatch.setitem(PRESETS, "w8a8", PRESETS["w8a8-static"])


"""A graph input that is also a graph output keeps its name and interface through every exporter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import qonnx
from qonnx.export import EXPORTERS
from tests.helpers import build_model, feed_for, make_samples, randn, rng, run_ort


def passthrough_input() -> onnx.ModelProto:
    """x feeds a Conv and is also returned as it is (a second graph output), listed before and after y."""
    g = rng(20)
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,3,8,8] x, float[1,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        r = Relu (c)
        y = Conv <kernel_shape = [1, 1]> (r, w2, b2)
    }""", {"w": randn(g, 4, 3, 3, 3, scale=0.3), "b": randn(g, 4, scale=0.1),
           "w2": randn(g, 4, 4, 1, 1, scale=0.3), "b2": randn(g, 4, scale=0.1)})


def interface(values) -> list[tuple[str, int, tuple]]:
    return [(v.name, v.type.tensor_type.elem_type,
             tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim))
            for v in values]


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
@pytest.mark.parametrize("pipeline", ["w8a8-static", "w8a8"])
def test_input_that_is_an_output_keeps_its_name(fmt: str, pipeline: str) -> None:
    float_model = passthrough_input()
    result = qonnx.optimize(float_model, make_samples(float_model, 16, seed=1), pipeline=pipeline,
                            holdout=0, export_format=fmt, check_fusion=False)
    out = result.model
    assert interface(out.graph.input) == interface(float_model.graph.input)
    assert interface(out.graph.output) == interface(float_model.graph.output)
    # The input is still quantized where the Conv reads it...
    assert any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear") and "x" in n.input for n in out.graph.node)
    # ... and the pass-through output is the input itself, bit for bit.
    feed = feed_for(float_model, seed=5, batch=1)
    ref = run_ort(float_model, feed)
    got = run_ort(out, feed)
    np.testing.assert_array_equal(got[0], feed["x"])
    assert np.max(np.abs(got[1] - ref[1])) < 0.1 * np.max(np.abs(ref[1]))

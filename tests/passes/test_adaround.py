"""The adaround pass: learned rounding on real layer inputs, codes kept as data and exported verbatim."""

from __future__ import annotations

import time

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from qonnx.app.api import optimize
from qonnx.core.qtable import QuantState, Role
from qonnx.data.calibration import open_calibration
from qonnx.errors import PreconditionError
from qonnx.export.qdq import export_qdq
from qonnx.infra.context import PassContext
from qonnx.infra.manager import PassManager
from qonnx.passes import parse_pipeline
from qonnx.rounding.layer_blocks import ConvSpec, im2col
from tests.helpers import (
    attention_like,
    conv_bn_relu_conv,
    conv_pool_gemm,
    depthwise_block,
    feed_for,
    import_proto,
    install_step_clock,
    make_samples,
    matmul_mlp,
    residual_block,
    rng,
    run_ort,
    sqnr,
)

W4_RTN = "canonicalize,fold-bn,plan{weight_bits=4},calibrate{weights=mse}"
W4_ADAROUND = W4_RTN + ",adaround{iterations=2000}"


def run(proto, text, n=64):
    ir = import_proto(proto)
    ctx = PassContext(calibration=open_calibration(make_samples(proto, n), ir), seed=0)
    ir, records = PassManager(parse_pipeline(text), []).run(ir, ctx)
    return ir, records


def output_sqnr(proto, text, n=64):
    result = optimize(proto, make_samples(proto, n), pipeline=text, holdout=0, check_fusion=False)
    feed = feed_for(proto, batch=16)
    return sqnr(run_ort(proto, feed)[0], run_ort(result.model, feed)[0]), result


@pytest.mark.parametrize("builder", [conv_pool_gemm, matmul_mlp, residual_block, conv_bn_relu_conv])
def test_adaround_beats_round_to_nearest_at_4_bits(builder):
    rtn, _ = output_sqnr(builder(), W4_RTN)
    learned, result = output_sqnr(builder(), W4_ADAROUND)
    assert learned > rtn + 0.2, (rtn, learned)
    stats = result.records[-1].stats
    assert stats["median_loss_vs_nearest"] < 1.0


def test_local_search_after_hardening_lowers_the_layer_loss():
    """search=updown (the default) against search=off: the same annealing, then a lower loss per layer."""
    _, searched = output_sqnr(conv_bn_relu_conv(), W4_RTN + ",adaround{iterations=300}")
    _, plain = output_sqnr(conv_bn_relu_conv(), W4_RTN + ",adaround{iterations=300,search=off}")
    assert plain.records[-1].stats["median_loss_vs_hardened"] == 1.0
    assert searched.records[-1].stats["median_loss_vs_hardened"] < 1.0
    assert searched.records[-1].stats["median_loss_vs_nearest"] < plain.records[-1].stats["median_loss_vs_nearest"]
    with pytest.raises(Exception, match="search"):
        parse_pipeline("adaround{search=exhaustive}")


def test_rounded_weights_keep_their_scale_and_export_their_codes_verbatim():
    before, _ = run(conv_pool_gemm(), W4_RTN)
    ir, _ = run(conv_pool_gemm(), W4_ADAROUND)
    proto = export_qdq(ir, pack_int4=False)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    changed = 0
    for name, entry in ir.quant.of_role(Role.WEIGHT).items():
        assert entry.state is QuantState.ROUNDED and "adaround" in entry.method
        np.testing.assert_array_equal(entry.scale, before.quant.get(name).scale)  # never recomputed
        assert entry.codes.shape == ir.constant_value(ir.tensors()[name]).shape
        assert entry.codes.min() >= entry.scheme.qmin and entry.codes.max() <= entry.scheme.qmax
        np.testing.assert_array_equal(inits[name + "_quantized"], entry.codes)
        w = ir.constant_value(ir.tensors()[name])
        scale = entry.scale.reshape([-1 if i == entry.scheme.axis else 1 for i in range(w.ndim)])
        # Every code is the floor or the ceiling of w / s: AdaRound only chooses the rounding direction.
        ratio = w / scale
        assert np.all((entry.codes == np.floor(ratio)) | (entry.codes == np.ceil(ratio))
                      | (entry.codes == entry.scheme.qmin) | (entry.codes == entry.scheme.qmax))
        changed += int(np.sum(entry.codes != np.rint(ratio)))
    assert changed > 0  # some weights were rounded away from nearest


def test_adaround_is_deterministic():
    a = optimize(conv_pool_gemm(), make_samples(conv_pool_gemm(), 32), pipeline=W4_ADAROUND, holdout=0)
    b = optimize(conv_pool_gemm(), make_samples(conv_pool_gemm(), 32), pipeline=W4_ADAROUND, holdout=0)
    assert a.to_bytes() == b.to_bytes()


def test_layers_sharing_an_input_share_one_data_pass():
    ir, records = run(attention_like(), "plan,calibrate,adaround{iterations=200}", n=16)
    stats = records[-1].stats
    assert stats["layers"] == 3  # q, k, v projections (activation x activation MatMuls stay float)
    assert stats["waves"] == 1


def test_depthwise_and_8bit_layers_are_rounded_too():
    ir, records = run(depthwise_block(), "canonicalize,plan{weight_bits=4,keep_8bit=depthwise},"
                                         "calibrate{weights=mse},adaround{iterations=500}")
    bits = {e.scheme.bits for e in ir.quant.of_role(Role.WEIGHT).values()}
    assert bits == {4, 8}
    assert all(e.state is QuantState.ROUNDED for e in ir.quant.of_role(Role.WEIGHT).values())


def test_time_budget_shortens_the_schedule():
    start = time.perf_counter()
    _, records = run(conv_pool_gemm(), W4_RTN + ",adaround{iterations=10000000,time_budget=1.0}")
    assert time.perf_counter() - start < 30.0  # generous: the budget is 1 s, the machine is shared
    assert records[-1].stats["shortened_schedules"] == 2


def test_time_budget_buys_every_layer_the_same_number_of_steps(monkeypatch):
    """Steps timed (here: a fake clock) at a fixed overhead plus a per-multiply-add cost: the conv's step is
    nearly as dear as the Gemm's 14x larger one, so sharing the budget by multiply-adds would starve it."""
    import qonnx.passes.adaround as pass_module

    def cost(shape):
        g, o, i = shape
        return 2e-3 + 1e-8 * g * o * i * i

    real_adaround = pass_module.adaround_weights
    steps = {}

    def recorded(blocks, *args, **kwargs):
        codes, stats = real_adaround(blocks, *args, **kwargs)
        steps[blocks.shape] = stats.iterations
        return codes, stats

    install_step_clock(monkeypatch, lambda problem, beta: cost(problem.weight.shape), pass_module)
    monkeypatch.setattr(pass_module, "step_seconds", cost)
    monkeypatch.setattr(pass_module, "adaround_weights", recorded)
    run(conv_pool_gemm(), W4_RTN + ",adaround{iterations=1000000,time_budget=2.0}")
    assert sorted(steps) == [(1, 4, 27), (1, 10, 64)]
    counts = list(steps.values())
    assert 300 < min(counts) and max(counts) < 1.05 * min(counts), steps


def test_ordering_rules_around_rounding():
    with pytest.raises(PreconditionError, match="calibrate.*AdaRound"):
        parse_pipeline("plan,calibrate,adaround,calibrate").validate(frozenset({"calibration-data"}))
    warnings = parse_pipeline("plan,calibrate,adaround,bias-correction").validate(frozenset({"calibration-data"}))
    assert len(warnings) == 1 and "redundant" in warnings[0]
    with pytest.raises(PreconditionError, match="adaround.*calibrated"):
        parse_pipeline("plan,adaround").validate(frozenset({"calibration-data"}))


def test_weight_only_blocked_adaround_ends_in_matmul_nbits():
    proto = matmul_mlp()
    # 512 samples: the second layer has 32 inputs and one row per sample; with far fewer rows per input the
    # learned rounding fits the calibration set rather than the data (measured: 64 samples lose 0.1 dB).
    plain, _ = output_sqnr(proto, "canonicalize,plan{weight_bits=4,activations=float,block_size=16},"
                                  "calibrate{weights=mse}", n=512)
    learned, result = output_sqnr(proto, "canonicalize,plan{weight_bits=4,activations=float,block_size=16},"
                                         "calibrate{weights=mse},adaround{iterations=2000}", n=512)
    assert [n.op_type for n in result.model.graph.node].count("MatMulNBits") == 2
    assert learned > plain


@pytest.mark.parametrize("group", [1, 4])
def test_pointwise_im2col_matches_the_generic_patches(group):
    x = rng(3).standard_normal((2, 8, 5, 6)).astype(np.float32)
    spec = ConvSpec.from_weight((8, 8 // group, 1, 1), group=group)
    fast = im2col(x, spec)
    # The same pointwise conv through a stride-1 pad-0 2-D kernel of width 1 computed the long way:
    expected = x.reshape(2, group, 8 // group, 30).transpose(1, 0, 3, 2).reshape(group, 60, 8 // group)
    np.testing.assert_array_equal(fast, expected)
    w = rng(4).standard_normal((8, 8 // group, 1, 1)).astype(np.float32)
    node = onnx.helper.make_node("Conv", ["x", "w"], ["y"], group=group)
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", 1, x.shape)],
                                   [onnx.helper.make_tensor_value_info("y", 1, None)],
                                   [numpy_helper.from_array(w, "w")])
    y = run_ort(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)]), {"x": x})[0]
    blocks = w.reshape(group, 8 // group, 8 // group)
    out = np.einsum("gok,gmk->gmo", blocks, fast)  # [g, N*HW, O_g]
    got = out.reshape(group, 2, 30, 8 // group).transpose(1, 0, 3, 2).reshape(2, 8, 5, 6)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)

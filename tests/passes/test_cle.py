"""cle: cross-layer equalization (algorithms.md §2.2-2.4): exact, ranges equalized, better per-tensor W8."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import qonnx
from qonnx.analyses.chains import find_chains
from qonnx.errors import PreconditionError
from qonnx.infra.context import PassContext
from qonnx.infra.manager import PassManager
from qonnx.passes import REGISTRY, parse_pipeline
from qonnx.passes.cle import in_ranges, out_ranges
from tests.helpers import (
    build_model,
    conv_bn_relu_conv,
    depthwise_block,
    feed_for,
    import_proto,
    make_samples,
    op_counts,
    randn,
    residual_block,
    rng,
    run_ort,
    sqnr,
)


def cle(model, **options):
    cls = REGISTRY["cle"]
    return cls(cls.Options(**options)).run(model, PassContext(seed=0))


def weights(model) -> dict[str, np.ndarray]:
    """Weight (input 1) of every Conv/Gemm by the weight's tensor name."""
    return {n.inputs[1].name: model.constant_value(n.inputs[1]).copy()
            for n in model.nodes if n.op in ("Conv", "Gemm")}


def layer(model, weight_name):
    return next(n for n in model.nodes if n.op in ("Conv", "Gemm") and n.inputs[1].name == weight_name)


def ranges(model, weight_name, side):
    """Per-channel max|w| of the named layer's weight: side 'out' or 'in'."""
    lay = next(la for chain in find_chains(model) for la in chain if la.weight.name == weight_name)
    w = model.constant_value(lay.weight).astype(np.float64)
    return out_ranges(lay, w) if side == "out" else in_ranges(lay, w)


def assert_same_outputs(original, model, rtol=1e-5, batch=2):
    """max|Δ| ≤ rtol·max|y| between ORT on the original proto and on the IR model."""
    feed = feed_for(original, seed=11, batch=batch)
    ref = run_ort(original, feed)
    new = run_ort(model.to_onnx(), feed)
    for a, b in zip(ref, new, strict=True):
        assert a.shape == b.shape
        err = float(np.max(np.abs(a.astype(np.float64) - b)))
        assert err <= rtol * float(np.max(np.abs(a))), err


# --------------------------------------------------------------------------- models
def conv_relu_conv(seed=50, act="r = Relu (c1)", extra_inits=None, bias1=True, out_channels=8):
    g = rng(seed)
    inits = {"w1": randn(g, out_channels, 3, 3, 3, scale=0.5), "w2": randn(g, 4, out_channels, 3, 3, scale=0.5),
             "b2": randn(g, 4, scale=0.1), **(extra_inits or {})}
    if bias1:
        inits["b1"] = randn(g, out_channels, scale=0.2)
    args = "x, w1, b1" if bias1 else "x, w1"
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> ({args})
        {act}
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }}""", inits)


def conv_dw_conv(seed=51):
    """Conv -> Relu -> depthwise 3x3 -> Relu -> Conv 1x1: one triplet."""
    g = rng(seed)
    inits = {"w1": randn(g, 8, 4, 1, 1, scale=0.6), "b1": randn(g, 8, scale=0.2),
             "wd": randn(g, 8, 1, 3, 3, scale=0.6), "bd": randn(g, 8, scale=0.2),
             "w3": randn(g, 4, 8, 1, 1, scale=0.6), "b3": randn(g, 4, scale=0.1)}
    return build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (r1, wd, bd)
        r2 = Relu (c2)
        y = Conv <kernel_shape = [1, 1]> (r2, w3, b3)
    }""", inits)


def gemm_relu_gemm(seed=52, trans_b1=1, trans_b2=0, bias_shape=(16,)):
    g = rng(seed)
    w1 = randn(g, 16, 10, scale=0.5) if trans_b1 else randn(g, 10, 16, scale=0.5)
    w2 = randn(g, 6, 16, scale=0.5) if trans_b2 else randn(g, 16, 6, scale=0.5)
    inits = {"w1": w1, "b1": randn(g, *bias_shape, scale=0.2), "w2": w2, "b2": randn(g, 6, scale=0.1)}
    return build_model(f"""
    agraph (float[N,10] x) => (float[N,6] y) {{
        m1 = Gemm <transB = {trans_b1}> (x, w1, b1)
        r1 = Relu (m1)
        y = Gemm <transB = {trans_b2}, alpha = 0.5> (r1, w2, b2)
    }}""", inits)


def three_conv_chain(seed=53):
    """Conv -> LeakyRelu -> Conv -> PRelu (constant slope) -> Conv: two pairs sharing the middle layer."""
    g = rng(seed)
    inits = {"w1": randn(g, 6, 3, 3, 3, scale=0.5), "b1": randn(g, 6, scale=0.2),
             "w2": randn(g, 5, 6, 3, 3, scale=0.5), "b2": randn(g, 5, scale=0.2),
             "w3": randn(g, 4, 5, 1, 1, scale=0.5), "b3": randn(g, 4, scale=0.1),
             "slope": g.uniform(-0.5, 0.5, (5, 1, 1)).astype(np.float32)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = LeakyRelu <alpha = 0.1> (c1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, w2, b2)
        r2 = PRelu (c2, slope)
        y = Conv <kernel_shape = [1, 1]> (r2, w3, b3)
    }""", inits)


def conv_gap_gemm(seed=54, pool="p = GlobalAveragePool (r)", hw=8, features=8):
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm (a classifier head; trivial Conv->Gemm)."""
    g = rng(seed)
    inits = {"w1": randn(g, 8, 3, 3, 3, scale=0.5), "b1": randn(g, 8, scale=0.2),
             "wg": randn(g, 5, features, scale=0.5), "bg": randn(g, 5, scale=0.1)}
    return build_model(f"""
    agraph (float[1,3,{hw},{hw}] x) => (float[1,5] y) {{
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        {pool}
        f = Flatten (p)
        y = Gemm <transB = 1> (f, wg, bg)
    }}""", inits)


def imbalanced(seed=55, factor=100.0):
    """conv_relu_conv with output channel 0 of W1 (and b1) ×factor and input channel 0 of W2 /factor."""
    base = conv_relu_conv(seed)
    from onnx import numpy_helper

    for init in base.graph.initializer:
        value = numpy_helper.to_array(init).copy()
        if init.name in ("w1", "b1"):
            value[0] *= factor
        elif init.name == "w2":
            value[:, 0] /= factor
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return base


# --------------------------------------------------------------------------- structure
@pytest.mark.parametrize("builder, pairs, triplets", [
    (conv_relu_conv, 1, 0),
    (conv_dw_conv, 0, 1),
    (gemm_relu_gemm, 1, 0),
    (three_conv_chain, 2, 0),
    (conv_gap_gemm, 1, 0),
], ids=["conv_relu_conv", "triplet", "gemm", "chain3", "conv_gap_gemm"])
def test_structure(builder, pairs, triplets):
    original = builder()
    result = cle(import_proto(original))
    assert result.modified is True
    assert result.stats["pairs"] == pairs and result.stats["triplets"] == triplets
    assert result.stats["converged"] is True
    assert op_counts(result.model) == op_counts(original)  # only weights change


def test_mobilenet_block_after_relu6_to_relu_is_one_triplet():
    model = import_proto(depthwise_block())
    assert cle(model.copy(), clips="stop").modified is False  # Clip(0, 6) is not homogeneous: no chain
    REGISTRY["relu6-to-relu"]().run(model, PassContext())
    result = cle(model, clips="stop")
    assert result.modified is True and result.stats["triplets"] == 1


def clipping_depthwise_block():
    """depthwise_block with a first layer large enough that Clip(0, 6) is active on many values."""
    proto = depthwise_block()
    for init in proto.graph.initializer:
        if init.name == "w1":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 25, "w1"))
    return proto


def test_relu6_is_scaled_through_exactly_with_per_channel_bounds():
    original = clipping_depthwise_block()
    feed = feed_for(original, seed=11, batch=2)
    inits = {i.name: numpy_helper.to_array(i) for i in original.graph.initializer}
    pre = np.einsum("oc,nchw->nohw", inits["w1"][:, :, 0, 0], feed["x"]) + inits["b1"].reshape(1, -1, 1, 1)
    assert np.mean(pre > 6) > 0.05  # the clip matters in this model
    result = cle(import_proto(original))
    assert result.modified is True and result.stats["triplets"] == 1
    assert result.stats["clips_rescaled"] == 2
    ops = op_counts(result.model)
    assert ops.get("Clip", 0) == 0 and ops["Relu"] == 2 and ops["Min"] == 2
    assert_same_outputs(original, result.model)
    bounds = [result.model.constant_value(n.inputs[1]) for n in result.model.nodes if n.op == "Min"]
    assert all(b.shape == (1, 8, 1, 1) and np.all(b > 0) and np.ptp(b) > 0 for b in bounds)


def test_exact_clip_mode_is_idempotent():
    original = clipping_depthwise_block()
    model = import_proto(original)
    cle(model)
    again = cle(model)
    assert again.stats["triplets"] == 1  # the chain still passes the Relu + Min left behind
    assert again.modified is False
    assert_same_outputs(original, model)


def test_min_bounds_follow_a_later_rescaling_exactly():
    """A model already holding per-channel Min bounds (e.g. equalized with a looser tolerance first)."""
    original = clipping_depthwise_block()
    model = import_proto(original)
    cle(model)
    # Unbalance channel 2 without changing the function: c1 and its Min bound x10, the depthwise row /10.
    w1 = next(n for n in model.nodes if n.op == "Conv" and n.inputs[1].name == "w1")
    first_min = model.consumers(model.consumers(w1.outputs[0])[0].outputs[0])[0]
    wd = next(n for n in model.nodes if n.op == "Conv" and n.inputs[1].name == "wd")
    for tensor, factor, index in ((w1.inputs[1], 10.0, 2), (w1.inputs[2], 10.0, 2),
                                  (first_min.inputs[1], 10.0, (0, 2)), (wd.inputs[1], 0.1, 2)):
        v = model.constant_value(tensor).copy()
        v[index] *= factor
        tensor.values = v
    assert_same_outputs(original, model, rtol=1e-5)
    result = cle(model)
    assert result.modified is True and op_counts(result.model)["Min"] == 2
    assert_same_outputs(original, result.model)


# --------------------------------------------------------------------------- numerics
NUMERIC_CASES = {
    "conv_relu_conv": conv_relu_conv,
    "conv_nobias": lambda: conv_relu_conv(56, bias1=False),
    "conv_identity": lambda: conv_relu_conv(57, act="r = Identity (c1)"),
    "triplet": conv_dw_conv,
    "gemm_transB10": gemm_relu_gemm,
    "gemm_transB01_bias1xN": lambda: gemm_relu_gemm(58, trans_b1=0, trans_b2=1, bias_shape=(1, 16)),
    "chain3_leaky_prelu": three_conv_chain,
    "conv_gap_gemm": conv_gap_gemm,
    "imbalanced": imbalanced,
    "residual_block": residual_block,
}


@pytest.mark.parametrize("name", sorted(NUMERIC_CASES))
def test_float_outputs_unchanged(name):
    original = NUMERIC_CASES[name]()
    result = cle(import_proto(original))
    assert result.modified is True
    assert_same_outputs(original, result.model)


def test_dead_channel_keeps_scale_one():
    original = conv_relu_conv(59)
    from onnx import numpy_helper

    for init in original.graph.initializer:
        if init.name in ("w1", "b1"):
            value = numpy_helper.to_array(init).copy()
            value[2] = 0.0
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    before = weights(import_proto(original))
    result = cle(import_proto(original))
    assert result.modified is True
    after = weights(result.model)
    assert all(np.all(np.isfinite(w)) for w in after.values())
    np.testing.assert_array_equal(after["w2"][:, 2], before["w2"][:, 2])  # s = 1 for the dead channel
    assert_same_outputs(original, result.model)


# --------------------------------------------------------------------------- range equalization
@pytest.mark.parametrize("builder, first, second", [
    (conv_relu_conv, "w1", "w2"), (gemm_relu_gemm, "w1", "w2"), (imbalanced, "w1", "w2"),
], ids=["conv", "gemm", "imbalanced"])
def test_one_pair_step_equalizes_ranges(builder, first, second):
    model = import_proto(builder())
    r1, r2 = ranges(model, first, "out"), ranges(model, second, "in")
    assert not np.allclose(r1, r2, rtol=1e-2)
    result = cle(model, iterations=1)
    assert result.modified is True and result.stats["sweeps"] == 1
    new1, new2 = ranges(result.model, first, "out"), ranges(result.model, second, "in")
    np.testing.assert_allclose(new1, new2, rtol=1e-6)
    np.testing.assert_allclose(new1, np.sqrt(r1 * r2), rtol=1e-6)


def test_triplet_equalizes_all_three_ranges():
    model = import_proto(conv_dw_conv())
    r1, r2, r3 = ranges(model, "w1", "out"), ranges(model, "wd", "out"), ranges(model, "w3", "in")
    result = cle(model, iterations=1)
    assert result.stats["triplets"] == 1
    c = np.cbrt(r1 * r2 * r3)
    for name, side in (("w1", "out"), ("wd", "out"), ("wd", "in"), ("w3", "in")):
        np.testing.assert_allclose(ranges(result.model, name, side), c, rtol=1e-6)


def test_chain_converges_to_equal_ranges_on_every_link():
    result = cle(import_proto(three_conv_chain()), iterations=100, tolerance=1e-9)
    assert result.stats["converged"] is True and result.stats["sweeps"] > 2
    m = result.model
    np.testing.assert_allclose(ranges(m, "w1", "out"), ranges(m, "w2", "in"), rtol=1e-6)
    np.testing.assert_allclose(ranges(m, "w2", "out"), ranges(m, "w3", "in"), rtol=1e-6)


def test_folded_bn_statistics_follow_the_scales():
    model = import_proto(conv_bn_relu_conv())
    REGISTRY["fold-bn"]().run(model, PassContext())
    norm = model.folded_norms["n1"]
    gamma, beta = norm.gamma.copy(), norm.beta.copy()
    w_before = model.constant_value(layer(model, "w1").inputs[1]).astype(np.float64)
    result = cle(model)
    assert result.modified is True
    w_after = model.constant_value(layer(model, "w1").inputs[1]).astype(np.float64)
    s = np.max(np.abs(w_before), axis=(1, 2, 3)) / np.max(np.abs(w_after), axis=(1, 2, 3))
    assert not np.allclose(s, 1.0)
    np.testing.assert_allclose(result.model.folded_norms["n1"].gamma, gamma / s, rtol=1e-5)
    np.testing.assert_allclose(result.model.folded_norms["n1"].beta, beta / s, rtol=1e-5)


# --------------------------------------------------------------------------- quantization benefit
def per_tensor_w8_sqnr(w: np.ndarray) -> float:
    scale = float(np.max(np.abs(w))) / 127
    q = np.clip(np.round(w / scale), -127, 127) * scale
    return sqnr(w, q)


def fake_quantized_output(model, feed) -> np.ndarray:
    """The model's output with every Conv/Gemm weight fake-quantized per tensor to int8."""
    q = model.copy()
    for node in q.nodes:
        if node.op in ("Conv", "Gemm"):
            w = q.constant_value(node.inputs[1])
            scale = float(np.max(np.abs(w))) / 127
            node.inputs[1].values = (np.clip(np.round(w / scale), -127, 127) * scale).astype(w.dtype)
    return run_ort(q.to_onnx(), feed)[0]


def test_per_tensor_w8_sqnr_improves_on_an_imbalanced_model():
    original = imbalanced()
    model = import_proto(original)
    before = {k: per_tensor_w8_sqnr(v) for k, v in weights(model).items()}
    result = cle(model)
    assert result.modified is True
    after = {k: per_tensor_w8_sqnr(v) for k, v in weights(result.model).items()}
    # W1 had one channel 100x the others: its per-tensor grid was wasted on it.
    assert after["w1"] > before["w1"] + 6.0, (before, after)
    assert after["w2"] > before["w2"] - 0.5, (before, after)
    # W2's shrunken input column rounded to ~zero; after CLE it is resolved again.
    w2_before, w2_after = weights(import_proto(original))["w2"], weights(result.model)["w2"]
    scale_before, scale_after = np.max(np.abs(w2_before)) / 127, np.max(np.abs(w2_after)) / 127

    def column_sqnr(w, scale):
        return sqnr(w[:, 0], np.clip(np.round(w[:, 0] / scale), -127, 127) * scale)

    assert column_sqnr(w2_after, scale_after) > column_sqnr(w2_before, scale_before) + 20.0
    # End to end: the per-tensor W8 model is much closer to the float model.
    feed = feed_for(original, seed=12, batch=4)
    reference = run_ort(original, feed)[0]
    snr_before = sqnr(reference, fake_quantized_output(import_proto(original), feed))
    snr_after = sqnr(reference, fake_quantized_output(result.model, feed))
    assert snr_after > snr_before + 6.0, (snr_before, snr_after)


# --------------------------------------------------------------------------- idempotence / convergence
@pytest.mark.parametrize("name", ["conv_relu_conv", "triplet", "gemm_transB10", "chain3_leaky_prelu"])
def test_second_run_changes_nothing(name):
    first = cle(import_proto(NUMERIC_CASES[name]()))
    assert first.modified is True and first.stats["first_max_log_scale"] > 1e-2
    data = first.model.to_bytes()
    second = cle(first.model)
    assert second.modified is False
    assert second.stats["first_max_log_scale"] < 1e-4  # the chain scales approach 1
    assert second.model.to_bytes() == data


# --------------------------------------------------------------------------- negative cases
def _negative(text, inits):
    original = build_model(text, inits)
    model = import_proto(original)
    data = model.to_bytes()
    result = cle(model)
    assert result.modified is False
    assert result.model.to_bytes() == data
    return result


def _conv_pair_inits(seed, c=8, w2_in=None):
    g = rng(seed)
    return {"w1": randn(g, c, 3, 3, 3, scale=0.5), "b1": randn(g, c, scale=0.2),
            "w2": randn(g, 4, w2_in or c, 3, 3, scale=0.5), "b2": randn(g, 4, scale=0.1)}


def test_fan_out_breaks_the_chain():
    _negative("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,8,8,8] z) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
        z = Sigmoid (r)
    }""", _conv_pair_inits(60))


def test_sigmoid_between_layers_breaks_the_chain():
    _negative("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Sigmoid (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }""", _conv_pair_inits(61))


def test_shared_weights_are_left_alone():
    g = rng(62)
    _negative("""
    agraph (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b1)
        r = Relu (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w, b2)
    }""", {"w": randn(g, 4, 4, 3, 3, scale=0.5), "b1": randn(g, 4), "b2": randn(g, 4)})


def test_grouped_conv_is_left_alone():
    _negative("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 2> (r, w2, b2)
    }""", _conv_pair_inits(63, w2_in=4))


def test_graph_output_in_the_middle_is_left_alone():
    _negative("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y, float[1,8,8,8] r) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }""", _conv_pair_inits(64))


def test_weights_that_are_graph_inputs_are_left_alone():
    inits = _conv_pair_inits(65)
    del inits["w2"]
    _negative("""
    agraph (float[1,3,8,8] x, float[4,8,3,3] w2) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r, w2, b2)
    }""", inits)


def test_non_trivial_conv_to_gemm_is_skipped():
    # Flattening 8 channels x 2x2 positions into 32 features: channel i is not Gemm input i.
    g = rng(66)
    _negative("""
    agraph (float[1,3,2,2] x) => (float[1,5] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (c1)
        f = Flatten (r)
        y = Gemm <transB = 1> (f, wg, bg)
    }""", {"w1": randn(g, 8, 3, 3, 3), "b1": randn(g, 8), "wg": randn(g, 5, 32), "bg": randn(g, 5)})


def test_max_pool_and_residual_add_break_chains():
    from tests.helpers import conv_pool_gemm

    assert cle(import_proto(conv_pool_gemm())).modified is False
    # residual_block: only c1 -> Relu -> c2 is a chain (r0 feeds the Add too, c2 feeds the Add).
    chains = find_chains(import_proto(residual_block()))
    assert [[la.weight.name for la in chain] for chain in chains] == [["w1", "w2"]]


# --------------------------------------------------------------------------- ordering and pipelines
def test_cle_refuses_a_calibrated_model():
    original = conv_bn_relu_conv()
    model = import_proto(original)
    from qonnx.data.calibration import open_calibration

    ctx = PassContext(seed=0, calibration=open_calibration(make_samples(original, 8), model, None))
    model, _ = PassManager(parse_pipeline("fold-bn,plan,calibrate")).run(model, ctx)
    with pytest.raises(PreconditionError, match="cle"):
        cle(model)


def test_validation_rejects_cle_after_calibrate():
    with pytest.raises(PreconditionError, match="'cle'") as info:
        parse_pipeline("plan,calibrate,cle").validate(frozenset({"calibration-data"}))
    assert "before calibrate" in str(info.value)


def test_full_data_free_prefix_runs_through_optimize():
    text = "canonicalize,fold-bn,relu6-to-relu,cle,plan,calibrate"
    pipe = parse_pipeline(text)
    assert str(parse_pipeline(str(pipe))) == text
    pipe.validate(frozenset({"calibration-data"}))
    original = depthwise_block()
    result = qonnx.optimize(original, make_samples(original, 16, seed=2), pipeline=text, holdout=0)
    records = {r.name: r for r in result.records}
    assert records["relu6-to-relu"].stats["replaced"] == 2
    assert records["cle"].modified is True and records["cle"].stats["triplets"] == 1
    assert records["cle"].stats["max_rel_change"] <= 1e-4  # checked by the numeric verifier
    assert "cle" in result.ir.metadata["qonnx.pipeline"]
    assert op_counts(result.model).get("QuantizeLinear", 0) > 0


def test_option_round_trip():
    pipe = parse_pipeline("cle{iterations=5,tolerance=1e-06}")
    assert pipe.passes[0].options.iterations == 5 and pipe.passes[0].options.tolerance == 1e-6
    assert str(parse_pipeline(str(pipe))) == str(pipe)


def test_quantized_per_channel_bounds_share_parameters_and_stay_close():
    """After exact CLE through ReLU6 the Relu output takes the Min output's parameters, and the
    per-tensor W8A8 model of the equalized graph follows the float model."""
    original = clipping_depthwise_block()
    samples = make_samples(original, 32, seed=5)
    result = qonnx.optimize(original, samples, pipeline="cle,plan{per_channel=false},calibrate", holdout=8)
    table = result.ir.quant
    for node in (n for n in result.ir.nodes if n.op == "Min"):
        relu_out, min_out = node.inputs[0].name, node.outputs[0].name
        assert table.get(relu_out).tied_to == min_out
        assert np.array_equal(table.get(relu_out).scale, table.get(min_out).scale)
    assert result.fidelity["sqnr_db"] > 25, result.fidelity

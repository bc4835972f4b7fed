"""cle{objective=noise}: scales that trade weight ranges against the activation range between layers, end to end
(the noise model itself is tested in tests/numerics/test_cle_noise.py)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

import qonnx
from qonnx.analyses.chains import activation_output, find_chains
from qonnx.errors import PreconditionError
from qonnx.passes import parse_pipeline
from qonnx.passes.cle import statistics_needed
from tests.helpers import build_model, feed_for, import_proto, make_samples, randn, rng, run_ort, sqnr
from tests.passes.test_cle import NUMERIC_CASES, conv_relu_conv, imbalanced

NOISE = "cle{objective=noise}"


# --------------------------------------------------------------------------- end to end
def edited(model, **edits):
    """The model with the named initializers replaced by edits[name](their value)."""
    for init in model.graph.initializer:
        if init.name in edits:
            init.CopyFrom(numpy_helper.from_array(edits[init.name](numpy_helper.to_array(init).copy()), init.name))
    return model


def channel0(v: np.ndarray, factor: float | None = None, value: float | None = None) -> np.ndarray:
    v = v.copy()
    v[0] = v[0] * factor if factor is not None else value
    return v


def loud_bias(seed=60):
    """conv_relu_conv whose channel 0 has ~zero weights but a bias of 8: a large, constant activation.
    Range equalization scales that channel up (its weights are tiny) and with it the activation range."""
    return edited(conv_relu_conv(seed), w1=lambda v: channel0(v, factor=0.01), b1=lambda v: channel0(v, value=8.0))


def per_tensor_sqnr(model, prefix: str) -> float:
    samples = make_samples(model, 32, seed=3)
    result = qonnx.optimize(model, samples, pipeline=prefix + "plan{per_channel=false},calibrate{method=minmax}",
                            holdout=0)
    feed = feed_for(model, seed=12, batch=8)
    return sqnr(run_ort(model, feed)[0], run_ort(result.model, feed)[0])


def test_noise_objective_keeps_a_loud_activation_down_where_range_equalization_blows_it_up():
    model = loud_bias()
    plain, ranges, noise = (per_tensor_sqnr(model, p) for p in ("", "cle,", NOISE + ","))
    assert ranges < plain - 6.0, (plain, ranges)  # the failure this objective exists for
    assert noise > plain and noise > ranges + 10.0, (plain, ranges, noise)


def test_noise_objective_still_fixes_imbalanced_weights():
    model = imbalanced()
    plain, ranges, noise = (per_tensor_sqnr(model, p) for p in ("", "cle,", NOISE + ","))
    assert ranges > plain + 6.0
    assert noise > plain + 6.0, (plain, ranges, noise)


@pytest.mark.parametrize("name", ["conv_relu_conv", "triplet", "gemm_transB10", "chain3_leaky_prelu",
                                  "conv_gap_gemm", "residual_block", "quiet_clipped_channel"])
def test_float_outputs_unchanged_and_a_second_run_changes_nothing(name):
    # quiet_clipped_channel: the second run reads the bound from the per-channel Min the first one wrote.
    original = quiet_clipped_channel() if name == "quiet_clipped_channel" else NUMERIC_CASES[name]()
    samples = make_samples(original, 16, seed=2)
    result = qonnx.optimize(original, samples, pipeline=f"{NOISE},{NOISE}", holdout=0)
    first, second = (r for r in result.records if r.name == "cle")
    assert first.modified is True and first.stats["pairs"] >= 1
    assert second.modified is False
    feed = feed_for(original, seed=11, batch=2)
    for a, b in zip(run_ort(original, feed), run_ort(result.model, feed), strict=True):
        assert float(np.max(np.abs(a - b))) <= 1e-5 * float(np.max(np.abs(a)))


def test_pooled_pairs_take_the_activation_range_before_the_pool():
    original = NUMERIC_CASES["conv_gap_gemm"]()
    model = import_proto(original)
    (chain,) = find_chains(model, {})
    relu_out = next(n for n in model.nodes if n.op == "Relu").outputs[0].name
    assert activation_output(model, chain[0]) == relu_out
    assert relu_out in statistics_needed(model, [chain])
    assert chain[1].node.inputs[0].name in statistics_needed(model, [chain])  # the pooled Gemm input too


# --------------------------------------------------------------------------- negative cases
def test_noise_objective_needs_calibration_data():
    with pytest.raises(PreconditionError, match="calibration"):
        parse_pipeline(NOISE).validate(frozenset())
    parse_pipeline("cle").validate(frozenset())  # the range objective stays data-free


def test_objective_option_round_trips_and_rejects_unknown_values():
    pipe = parse_pipeline("cle{objective=noise,samples=32}")
    assert str(parse_pipeline(str(pipe))) == str(pipe)
    with pytest.raises(Exception, match="objective"):
        parse_pipeline("cle{objective=loudness}")


def quiet_clipped_channel(seed=61):
    """Conv -> Clip(0, 6) -> Conv whose channel 0 is nearly silent on the calibration data (tiny weights)
    although nothing stops it from reaching the bound 6 on other inputs."""
    base = conv_relu_conv(seed, act="r = Clip (c1, lo, hi)",
                          extra_inits={"lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)})
    return edited(base, w1=lambda v: channel0(v * 4.0, factor=1e-3), b1=lambda v: channel0(v, value=0.0))


def reachable_ranges(model) -> np.ndarray:
    """b / s per channel: the per-channel Min bound that exact CLE leaves after the Relu."""
    (node,) = [n for n in model.nodes if n.op == "Min"]
    return model.constant_value(node.inputs[1]).reshape(-1)


@pytest.mark.parametrize("use_bound", [True, False])
def test_a_quiet_clipped_channel_is_not_scaled_past_its_bound(use_bound, monkeypatch):
    import qonnx.passes.cle

    if not use_bound:  # the statistics alone: what the bound protects against
        monkeypatch.setattr(qonnx.passes.cle, "_upper_bound", lambda model, clips: None)
    original = quiet_clipped_channel()
    result = qonnx.optimize(original, make_samples(original, 16, seed=2), pipeline=NOISE, holdout=0)
    reach = reachable_ranges(result.ir)
    # The quiet channel's bound b / s_0 is where it saturates on new inputs. Judged by its calibration
    # values alone it looks free to scale up, and its bound ends far above every other channel's; with
    # the bound as its range the per-tensor range it would need is part of the trade-off.
    ratio = reach[0] / np.max(reach[1:])
    assert (ratio < 1.5) if use_bound else (ratio > 10.0), reach


# --------------------------------------------------------------------------- data-free statistics (moments)
MOMENTS = "cle{objective=noise,statistics=moments}"


@pytest.mark.parametrize("name", ["conv_relu_conv", "triplet", "chain3_leaky_prelu", "conv_gap_gemm", "bn",
                                  "quiet_clipped_channel"])
def test_moments_need_no_data_keep_the_float_model_and_settle(name):
    from tests.helpers import conv_bn_relu_conv

    builders = {"bn": conv_bn_relu_conv, "quiet_clipped_channel": quiet_clipped_channel}
    original = builders.get(name, NUMERIC_CASES.get(name))()
    parse_pipeline(MOMENTS).validate(frozenset())  # no calibration data needed
    result = qonnx.optimize(original, None, pipeline=f"canonicalize,fold-bn,{MOMENTS},{MOMENTS}")
    first, second = (r for r in result.records if r.name == "cle")
    assert first.modified is True and first.stats["pairs"] >= 1
    assert first.stats["groups_on_ranges"] == 0  # every pair had its statistics (PRelu's too): none fell back
    # The moments follow the rescaled BatchNorm statistics and bounds, so the optimum is where the first
    # run left it.
    assert second.modified is False
    feed = feed_for(original, seed=11, batch=2)
    for a, b in zip(run_ort(original, feed), run_ort(result.model, feed), strict=True):
        assert float(np.max(np.abs(a - b))) <= 1e-5 * float(np.max(np.abs(a)))


def test_moments_keep_a_loud_activation_down_where_range_equalization_blows_it_up():
    model = loud_bias()
    ranges, moments = (per_tensor_sqnr(model, p) for p in ("cle,", MOMENTS + ","))
    assert moments > ranges + 10.0, (ranges, moments)


def unknown_input_chain(depthwise: bool):
    """Sin (no moment estimate) -> Conv -> Relu [-> depthwise Conv -> Relu] -> Conv, channel 0 imbalanced."""
    g = rng(62)
    inits = {"w1": randn(g, 8, 3, 3, 3, scale=0.5), "b1": randn(g, 8, scale=0.2),
             "w2": randn(g, 4, 8, 3, 3, scale=0.5), "b2": randn(g, 4, scale=0.1),
             "wd": randn(g, 8, 1, 3, 3, scale=0.5), "bd": randn(g, 8, scale=0.1)}
    inits["w1"][0] *= 50.0
    inits["b1"][0] *= 50.0
    inits["w2"][:, 0] /= 50.0
    middle = """d = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (r, wd, bd)
        rd = Relu (d)""" if depthwise else "rd = Identity (r)"
    if not depthwise:
        del inits["wd"], inits["bd"]
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {{
        s = Sin (x)
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (s, w1, b1)
        r = Relu (c1)
        {middle}
        y = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (rd, w2, b2)
    }}""", inits)


@pytest.mark.parametrize("depthwise", [False, True])
def test_a_group_reading_a_tensor_with_no_estimate_gets_range_equalization(depthwise):
    model = unknown_input_chain(depthwise)
    ranges = qonnx.optimize(model, None, pipeline="canonicalize,cle", verify=False)
    moments = qonnx.optimize(model, None, pipeline=f"canonicalize,{MOMENTS}", verify=False)
    (record,) = [r for r in moments.records if r.name == "cle"]
    # The whole group falls back, a depthwise triplet as a triplet (scaled to one common range).
    assert record.stats["groups_on_ranges"] == 1
    assert (record.stats["triplets"], record.stats["pairs"]) == ((1, 0) if depthwise else (0, 1))
    for a, b in zip(ranges.model.graph.initializer, moments.model.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    assert record.modified is True


def test_moments_option_checks():
    # Refused when the pipeline is read, before any pass runs.
    with pytest.raises(PreconditionError, match="objective=noise"):
        parse_pipeline("canonicalize,cle{statistics=moments}")
    with pytest.raises(PreconditionError, match="input_range"):
        parse_pipeline("cle{objective=noise,statistics=moments,input_range=[1;-1]}")
    # CLE and estimate-ranges must assume the same input range, or the two estimates disagree.
    with pytest.raises(PreconditionError, match="different input ranges"):
        parse_pipeline("cle{objective=noise,statistics=moments,input_range=[0.0;255.0]},plan,"
                       "estimate-ranges").validate(frozenset())
    parse_pipeline("cle{objective=noise,statistics=moments,input_range=[0.0;255.0]},plan,"
                   "estimate-ranges{input_range=[0.0;255.0]}").validate(frozenset())
    parse_pipeline("dfq-pertensor").validate(frozenset())
    parse_pipeline("cle{input_range=[0.0;255.0]},plan,estimate-ranges").validate(frozenset())  # ranges: no data
    pipe = parse_pipeline("cle{objective=noise,statistics=moments,input_range=[0.0;1.0],width=6.0}")
    assert str(parse_pipeline(str(pipe))) == str(pipe)

"""Builders and helpers the tests share: tiny float models written in ONNX text, seeded data, file helpers.

Every model here is small (a few channels, 8x8 images) so that the whole suite
runs in seconds. Structure is written in ONNX text (`onnx.parser`); weights are
seeded numpy arrays appended as initializers by `build_model`. The fixtures that
use them are in tests/conftest.py.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from qonnx.data.calibration import open_calibration
from qonnx.infra.context import PassContext
from qonnx.passes import parse_pipeline

OPSET = 17
IMPORTS = f'<ir_version: 8, opset_import: ["" : {OPSET}]>'


# --------------------------------------------------------------------------- builders
def build_model(text: str, inits: dict[str, np.ndarray] | None = None, check: bool = True) -> onnx.ModelProto:
    """Parse ONNX text and append `inits` as initializers (names the text uses but does not define)."""
    if not text.lstrip().startswith("<"):
        text = IMPORTS + "\n" + text
    model = onnx.parser.parse_model(text)
    for name, value in (inits or {}).items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def bn_params(gen: np.random.Generator, c: int, prefix: str = "bn") -> dict[str, np.ndarray]:
    return {
        f"{prefix}_g": gen.uniform(0.5, 1.5, c).astype(np.float32),
        f"{prefix}_b": gen.uniform(-0.5, 0.5, c).astype(np.float32),
        f"{prefix}_m": gen.uniform(-0.3, 0.3, c).astype(np.float32),
        f"{prefix}_v": gen.uniform(0.5, 2.0, c).astype(np.float32),
    }


def conv_bn_relu_conv(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv(3->8, 3x3, pad 1) -> BN -> Relu -> Conv(8->4, 1x1) -> y."""
    g = rng(seed)
    inits = {"w1": randn(g, 8, 3, 3, 3, scale=0.3), "b1": randn(g, 8, scale=0.1),
             "w2": randn(g, 4, 8, 1, 1, scale=0.3), "b2": randn(g, 4, scale=0.1), **bn_params(g, 8)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        n1 = BatchNormalization <epsilon = 0.001> (c1, bn_g, bn_b, bn_m, bn_v)
        r1 = Relu (n1)
        y = Conv <kernel_shape = [1, 1]> (r1, w2, b2)
    }""", inits)


def depthwise_block(seed: int = 1) -> onnx.ModelProto:
    """Pointwise Conv -> Clip(0,6) -> depthwise 3x3 -> Clip(0,6) -> pointwise Conv (MobileNetV2 style)."""
    g = rng(seed)
    inits = {"w1": randn(g, 8, 4, 1, 1, scale=0.4), "b1": randn(g, 8, scale=0.1),
             "wd": randn(g, 8, 1, 3, 3, scale=0.4), "bd": randn(g, 8, scale=0.1),
             "w3": randn(g, 4, 8, 1, 1, scale=0.4), "b3": randn(g, 4, scale=0.1),
             "lo": np.array(0.0, np.float32), "hi": np.array(6.0, np.float32)}
    return build_model("""
    agraph (float[1,4,8,8] x) => (float[1,4,8,8] y) {
        c1 = Conv <kernel_shape = [1, 1]> (x, w1, b1)
        r1 = Clip (c1, lo, hi)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1], group = 8> (r1, wd, bd)
        r2 = Clip (c2, lo, hi)
        y = Conv <kernel_shape = [1, 1]> (r2, w3, b3)
    }""", inits)


def residual_block(seed: int = 2) -> onnx.ModelProto:
    """Conv -> Relu -> Conv, added to the block input's Conv branch, Relu, GlobalAveragePool."""
    g = rng(seed)
    inits = {"w0": randn(g, 4, 3, 3, 3, scale=0.3), "b0": randn(g, 4, scale=0.1),
             "w1": randn(g, 4, 4, 3, 3, scale=0.3), "b1": randn(g, 4, scale=0.1),
             "w2": randn(g, 4, 4, 3, 3, scale=0.3), "b2": randn(g, 4, scale=0.1)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,1,1] y) {
        c0 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w0, b0)
        r0 = Relu (c0)
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r0, w1, b1)
        r1 = Relu (c1)
        c2 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r1, w2, b2)
        s = Add (c2, r0)
        r2 = Relu (s)
        y = GlobalAveragePool (r2)
    }""", inits)


def conv_pool_gemm(seed: int = 3, trans_b: int = 1) -> onnx.ModelProto:
    """Conv -> Relu -> MaxPool -> Reshape -> Gemm (classifier head)."""
    g = rng(seed)
    wg = randn(g, 10, 64, scale=0.2) if trans_b else randn(g, 64, 10, scale=0.2)
    inits = {"w1": randn(g, 4, 3, 3, 3, scale=0.3), "b1": randn(g, 4, scale=0.1),
             "shape": np.array([1, 64], np.int64), "wg": wg, "bg": randn(g, 10, scale=0.1)}
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,10] y) {{
        c1 = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w1, b1)
        r1 = Relu (c1)
        p1 = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (r1)
        f1 = Reshape (p1, shape)
        y = Gemm <transB = {trans_b}> (f1, wg, bg)
    }}""", inits)


def matmul_mlp(seed: int = 4) -> onnx.ModelProto:
    """x[B,16] -> MatMul(16x32) -> Add bias -> Relu -> MatMul(32x8) -> y (dynamic batch)."""
    g = rng(seed)
    inits = {"w1": randn(g, 16, 32, scale=0.3), "b1": randn(g, 32, scale=0.1),
             "w2": randn(g, 32, 8, scale=0.3)}
    return build_model("""
    agraph (float[N,16] x) => (float[N,8] y) {
        m1 = MatMul (x, w1)
        a1 = Add (m1, b1)
        r1 = Relu (a1)
        y = MatMul (r1, w2)
    }""", inits)


def attention_like(seed: int = 5) -> onnx.ModelProto:
    """q = x Wq, k = x Wk, scores = q k^T (activation x activation MatMul), softmax, times v."""
    g = rng(seed)
    inits = {"wq": randn(g, 8, 8, scale=0.4), "wk": randn(g, 8, 8, scale=0.4), "wv": randn(g, 8, 8, scale=0.4)}
    return build_model("""
    agraph (float[1,6,8] x) => (float[1,6,8] y) {
        q = MatMul (x, wq)
        k = MatMul (x, wk)
        v = MatMul (x, wv)
        kt = Transpose <perm = [0, 2, 1]> (k)
        s = MatMul (q, kt)
        p = Softmax <axis = -1> (s)
        y = MatMul (p, v)
    }""", inits)


def pad_conv(seed: int = 6, mode: str = "constant", value: float | None = None, consumers: int = 1
             ) -> onnx.ModelProto:
    """An explicit Pad feeding a Conv with no pads (how TF 'SAME' exports look)."""
    g = rng(seed)
    inits = {"pads": np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
             "w": randn(g, 4, 3, 3, 3, scale=0.3), "b": randn(g, 4, scale=0.1)}
    pad_inputs = "x, pads"
    if value is not None:
        inits["pv"] = np.array(value, np.float32)
        pad_inputs += ", pv"
    extra_out = ", float[1,3,10,10] p" if consumers > 1 else ""
    return build_model(f"""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y{extra_out}) {{
        p = Pad <mode = "{mode}"> ({pad_inputs})
        y = Conv <kernel_shape = [3, 3]> (p, w, b)
    }}""", inits)


def shape_chain_pad(seed: int = 7) -> onnx.ModelProto:
    """Pads computed at run time from Shape -> Gather -> ... -> Concat, then Pad -> Conv.

    The whole pads chain is constant once shapes are known; canonicalize must fold
    it and then fold the Pad into the Conv.
    """
    g = rng(seed)
    inits = {"idx": np.array(2, np.int64), "zero1": np.array([0], np.int64),
             "two": np.array(8, np.int64), "one1": np.array([1], np.int64),
             "ax0": np.array([0], np.int64),
             "w": randn(g, 4, 3, 3, 3, scale=0.3), "b": randn(g, 4, scale=0.1)}
    # pad = (H - 8 + 1): 1 on each spatial side for H = 8.
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        sh = Shape (x)
        h = Gather <axis = 0> (sh, idx)
        d = Sub (h, two)
        h1 = Unsqueeze (d, ax0)
        p1 = Add (h1, one1)
        pads = Concat <axis = 0> (zero1, zero1, p1, p1, zero1, zero1, p1, p1)
        xp = Pad (x, pads)
        y = Conv <kernel_shape = [3, 3]> (xp, w, b)
    }""", inits)


def identity_dropout(seed: int = 8) -> onnx.ModelProto:
    """Identity and inference Dropout around a Conv; the output is produced by an Identity."""
    g = rng(seed)
    inits = {"w": randn(g, 4, 3, 3, 3, scale=0.3), "b": randn(g, 4, scale=0.1)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        i0 = Identity (x)
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (i0, w, b)
        d = Dropout (c)
        r = Relu (d)
        y = Identity (r)
    }""", inits)


def one_conv(seed: int = 9) -> onnx.ModelProto:
    """A single Conv followed by Relu: the smallest model that exports to one QLinearConv."""
    g = rng(seed)
    inits = {"w": randn(g, 4, 3, 3, 3, scale=0.3), "b": randn(g, 4, scale=0.2)}
    return build_model("""
    agraph (float[1,3,8,8] x) => (float[1,4,8,8] y) {
        c = Conv <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (x, w, b)
        y = Relu (c)
    }""", inits)


MODEL_BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "conv_bn_relu_conv": conv_bn_relu_conv,
    "depthwise_block": depthwise_block,
    "residual_block": residual_block,
    "conv_pool_gemm": conv_pool_gemm,
    "matmul_mlp": matmul_mlp,
    "attention_like": attention_like,
    "pad_conv": pad_conv,
    "shape_chain_pad": shape_chain_pad,
    "identity_dropout": identity_dropout,
    "one_conv": one_conv,
}


# --------------------------------------------------------------------------- data
def input_shapes(model: onnx.ModelProto, batch: int = 1) -> dict[str, tuple[int, ...]]:
    init = {i.name for i in model.graph.initializer}
    shapes = {}
    for vi in model.graph.input:
        if vi.name in init:
            continue
        dims = []
        for d in vi.type.tensor_type.shape.dim:
            dims.append(d.dim_value if d.HasField("dim_value") else batch)
        shapes[vi.name] = tuple(dims)
    return shapes


def make_samples(model: onnx.ModelProto, n: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """n samples per input, stacked on the leading axis (one sample = batch 1 for static-batch models)."""
    g = rng(seed)
    out = {}
    for name, shape in input_shapes(model).items():
        out[name] = randn(g, n, *shape[1:])
    return out


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def save_model(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run_ort(model: onnx.ModelProto | bytes, feed: dict[str, np.ndarray], level: str = "disable"
            ) -> list[np.ndarray]:
    """Run with ORT on CPU; `level` 'disable' keeps ORT's own fusions out of numeric comparisons."""
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def feed_for(model: onnx.ModelProto, seed: int = 123, batch: int = 2) -> dict[str, np.ndarray]:
    g = rng(seed)
    feed = {}
    for name, shape in input_shapes(model, batch).items():
        feed[name] = randn(g, *shape)
    return feed


def op_counts(model) -> dict[str, int]:
    """Op histogram of an onnx.ModelProto or a qonnx IR Model."""
    if isinstance(model, onnx.ModelProto):
        ops = [n.op_type for n in model.graph.node]
    else:
        ops = [n.op for n in model.nodes]
    counts: dict[str, int] = {}
    for op in ops:
        counts[op] = counts.get(op, 0) + 1
    return counts


def sqnr(ref: np.ndarray, approx: np.ndarray) -> float:
    ref = np.asarray(ref, np.float64)
    noise = np.sum((ref - np.asarray(approx, np.float64)) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref**2) / noise))


def file_state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), os.stat(path).st_mtime_ns


# --------------------------------------------------------------------------- IR, control flow, integer inputs
def import_proto(model: onnx.ModelProto):
    """The qonnx IR for a proto (through the real importer)."""
    from qonnx.core.ir import import_model

    fresh = onnx.ModelProto()
    fresh.CopyFrom(model)
    return import_model(fresh)


def make_if_model(seed: int = 10) -> onnx.ModelProto:
    """A model with an If whose then-branch holds a Conv that reads an outer-scope weight."""
    g = rng(seed)
    w = numpy_helper.from_array(randn(g, 4, 3, 3, 3, scale=0.3), "w")
    b = numpy_helper.from_array(randn(g, 4, scale=0.1), "b")
    w0 = numpy_helper.from_array(randn(g, 4, 3, 3, 3, scale=0.3), "w0")
    b0 = numpy_helper.from_array(randn(g, 4, scale=0.1), "b0")
    then_out = helper.make_tensor_value_info("t_out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    else_out = helper.make_tensor_value_info("e_out", onnx.TensorProto.FLOAT, [1, 4, 8, 8])
    then_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["t_out"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
        "then", [], [then_out])
    else_g = helper.make_graph(
        [helper.make_node("Conv", ["x", "w0", "b0"], ["e_c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["e_c"], ["e_out"])],
        "else", [], [else_out])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["sum"], keepdims=0),
        helper.make_node("Greater", ["sum", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    graph = helper.make_graph(
        nodes, "if_model",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 8, 8])],
        initializer=[w, b, w0, b0, numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def make_int_input_model(seed: int = 11) -> onnx.ModelProto:
    """Token ids (int32) -> Cast -> Gather from an embedding table -> MatMul."""
    g = rng(seed)
    inits = {"emb": randn(g, 20, 8, scale=0.5), "w": randn(g, 8, 4, scale=0.4)}
    return build_model("""
    agraph (int32[1,5] ids) => (float[1,5,4] y) {
        i64 = Cast <to = 7> (ids)
        e = Gather <axis = 0> (emb, i64)
        y = MatMul (e, w)
    }""", inits)


# --------------------------------------------------------------------------- AdaRound clock
class StepClock:
    """perf_counter for qonnx.rounding.adaround (and the modules given to `install_step_clock`) that
    advances only when an AdaRound optimizer step runs, by `cost(problem, beta)` seconds: time budgets
    tested without timing anything."""

    def __init__(self, cost: Callable[..., float]):
        self.now, self.cost = 0.0, cost

    def perf_counter(self) -> float:
        return self.now


def install_step_clock(monkeypatch, cost: Callable[..., float], *modules) -> StepClock:
    import qonnx.rounding.adaround as core

    clock = StepClock(cost)
    real_loss_grad = core.RoundingProblem.loss_grad

    def timed_loss_grad(problem, v, beta, reg_weight, want_loss=True):
        clock.now += cost(problem, beta)
        return real_loss_grad(problem, v, beta, reg_weight, want_loss)

    monkeypatch.setattr(core.RoundingProblem, "loss_grad", timed_loss_grad)
    for module in (core, *modules):
        monkeypatch.setattr(module, "time", clock)
    return clock


def run_passes(model, spec: str, data):
    """Run each pass of `spec` in turn on a calibration context of `data`: (model, the results, the context)."""
    ctx = PassContext(calibration=open_calibration(data, model), seed=0)
    results = []
    for p in parse_pipeline(spec):
        result = p.run(model, ctx)
        model = result.model
        results.append(result)
    return model, results, ctx

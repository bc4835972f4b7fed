"""Planning: which nodes run as integer kernels and how each tensor is quantized (the plan pass's work).

Writes schemes (no parameters yet) into the quant table. The rules follow what
ONNX Runtime's CPU EP fuses (algorithms.md §1.3):
- Conv/Gemm/MatMul with float activations become integer layers; weights are
  int8 symmetric (per output channel by default), activations uint8 asymmetric.
- A single Relu/Clip after a layer is absorbed: the tensor quantized is the
  activation's output, whose range starts at 0, so ORT drops the activation.
- Add/Mul/Concat/pooling run in int8 only when all their inputs are already
  quantized; data-movement ops (Reshape, MaxPool, ...) share their input's
  parameters so ORT can drop the Q/DQ around them.
Op categories come from qonnx.core.ops. Re-planning (protect, keep-fast, estimate-ranges, mixed
precision) is a call of `replan_excluding`, never a nested run of the plan pass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.ops import ABSORBED_ACTIVATIONS, LAYER_OPS, OP_CATEGORIES, Category
from qonnx.core.qtable import LayerQuant, Role, TensorQuant
from qonnx.errors import PreconditionError
from qonnx.infra.base import option
from qonnx.numerics.quant import QuantScheme

ACTIVATION_BITS = {"uint8": 8, "uint4": 4, "uint3": 3}

# Float types whose layers are quantized. QuantizeLinear/DequantizeLinear take float16 from opset 19 (the QDQ
# exporter converts older models); ORT's CPU EP then runs float16 QDQ models correctly but fuses none of them
# into integer kernels. bfloat16 is not here: ORT's CPU EP cannot run it at all (the model is refused).
QUANTIZABLE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def is_quantizable_float(model: Model, tensor) -> bool:
    """True for a float32 or float16 tensor (Model.is_float is float32 only)."""
    return model.dtype_of(tensor) in QUANTIZABLE_FLOATS


@dataclass(frozen=True)
class PlanOptions:
    weight_bits: int = option(8, "bits of weight integers (4: int4 weights, exported packed with opset 21; "
                                 "3: a 3-bit grid, packed in int4 like 4; 6: a 6-bit grid stored in int8, for "
                                 "accelerators with such weights)", choices=(3, 4, 6, 8))
    per_channel: bool = option(True, "one weight scale per output channel (else one per tensor)")
    # Activation bits are a value of this option, not a field of their own: a new field would change the
    # canonical pipeline text (and so the bytes) of every existing output.
    activations: str = option("uint8", "activation type: uint8 (the fast integer one on x86), uint4/uint3 "
                                       "(a 16/8-level grid held in uint8 and clipped to it; for quantization-aware "
                                       "training) or float (weight-only quantization)",
                              choices=("uint8", "uint4", "uint3", "float"))
    block_size: int = option(0, "one weight scale per block of this many inputs and output channel (0 = per "
                                "channel): MatMul/Gemm weights, and Conv weights below 8 bits with at least that "
                                "many input channels per group (their layers run in float after the blocked "
                                "DequantizeLinear; 8-bit Convs keep per-channel scales for QLinearConv)",
                             choices=(0, 16, 32, 64, 128, 256))
    keep_8bit: tuple[str, ...] = option((), "with weight_bits below 8, layers whose weights stay int8, separated by "
                                             "';': first, last (in topological order), depthwise (grouped convs "
                                             "with one input channel per group: few weights, large 4-bit error)")
    exclude: tuple[str, ...] = option((), "node names to keep in float, separated by ';'")
    activation_matmul: bool = option(
        False, "also quantize MatMuls of two activations (attention scores and context); "
               "off by default: softmax probabilities lose most of their precision on a uint8 grid")


def weight_axis(model: Model, node) -> int | None:
    """Output-channel axis of the node's weight tensor (None if the layout is unsupported)."""
    if node.op == "Conv":
        return 0
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    if node.op == "MatMul":
        w = model.constant_value(node.inputs[1])
        return None if w is None or w.ndim < 2 else w.ndim - 1
    return None


def absorbed_output(model: Model, node):
    """The tensor to quantize after a layer: the output of a lone following Relu/Clip(0, b)."""
    out = node.outputs[0]
    consumers = model.consumers(out)
    if len(consumers) == 1 and not model.is_graph_output(out) and consumers[0].op in ABSORBED_ACTIVATIONS:
        bounds = model.clip_bounds(consumers[0])
        if bounds is not None and bounds[0] == 0.0 and is_quantizable_float(model, consumers[0].outputs[0]):
            return consumers[0].outputs[0]
    return out


class Planner:
    def __init__(self, model: Model, opts: PlanOptions):
        unknown = sorted(set(opts.keep_8bit) - {"first", "last", "depthwise"})
        if unknown:
            raise PreconditionError(f"pass 'plan': keep_8bit takes first, last and depthwise, not {unknown}")
        self.model, self.opts = model, opts
        self.weight_only = opts.activations == "float"
        self.table = model.quant
        self.act_scheme = QuantScheme(bits=ACTIVATION_BITS.get(opts.activations, 8), signed=False, symmetric=False)
        self.quantizable: set[str] = set()  # tensors that carry quantized values cheaply

    def activation(self, tensor, tied_to: str | None = None) -> None:
        entry = self.table.get(tensor.name)
        if entry is None:
            self.table.set(tensor.name, TensorQuant(Role.ACTIVATION, self.act_scheme, tied_to=tied_to))
        self.quantizable.add(tensor.name)

    def keep_float(self, node, reason: str) -> None:
        if node.op in LAYER_OPS:
            self.table.kept_float[node.name] = reason

    def compute(self, node) -> None:
        m = self.model
        x = node.inputs[0]
        if not is_quantizable_float(m, x):
            return self.keep_float(node, "input is not float32 or float16")
        if node.op == "Gemm" and (int(node.attrs.get("transA", 0)) or float(node.attrs.get("alpha", 1)) != 1
                                  or float(node.attrs.get("beta", 1)) != 1):
            return self.keep_float(node, "Gemm with transA/alpha/beta is not fused by ORT")
        w_t = node.inputs[1]
        w = m.constant_value(w_t)
        weight_name = bias_name = None
        if w is not None:
            axis = weight_axis(m, node)
            if axis is None or w.dtype != m.dtype_of(x):
                return self.keep_float(node, "weight layout or dtype not supported")
            scheme = self.weight_scheme(node, w, axis)
            if (prev := self.table.get(w_t.name)) is not None and prev.scheme != scheme:
                return self.keep_float(node, "shared weight used with a different layout")
            self.table.set(w_t.name, TensorQuant(Role.WEIGHT, scheme))
            weight_name = w_t.name
            # A blocked weight has no one scale per output channel for an int32 bias: the bias stays float.
            if node.op in ("Conv", "Gemm") and len(node.inputs) > 2 and node.inputs[2].name \
                    and not scheme.block_size:
                b = m.constant_value(node.inputs[2])
                channels = w.shape[axis]
                if b is None or b.shape != (channels,) or len(m.consumers(node.inputs[2])) != 1:
                    return self.keep_float(node, "bias is not a 1-D constant of the layer alone")
                bias_name = node.inputs[2].name
        elif node.op == "MatMul" and is_quantizable_float(m, w_t):
            if self.weight_only:
                return self.keep_float(node, "MatMul of two activations (weight-only plan)")
            if not self.opts.activation_matmul:
                return self.keep_float(node, "MatMul of two activations (enable plan{activation_matmul=true})")
            self.activation(w_t)  # activation x activation MatMul (attention)
        else:
            return self.keep_float(node, "weight is not a constant")
        if self.weight_only:  # float activations: the bias stays float, nothing else is quantized
            self.table.layers[node.name] = LayerQuant(node.name, node.op, x.name, weight_name)
            return None
        self.activation(x)
        out = absorbed_output(m, node)
        if node.op == "Conv":  # QLinearConv needs a Q after the layer
            self.activation(out)
        else:
            self.quantizable.add(out.name)
        if bias_name:
            assert weight_name is not None  # a bias is only taken beside a constant weight
            scheme = QuantScheme(bits=32, signed=True, symmetric=True, axis=0, narrow=False)
            self.table.set(bias_name, TensorQuant(Role.BIAS, scheme, bias_of=(x.name, weight_name)))
        self.table.layers[node.name] = LayerQuant(node.name, node.op, x.name, weight_name, bias_name, out.name)

    def weight_bits(self, node, w: np.ndarray) -> int:
        keep = set(self.opts.keep_8bit)
        if self.opts.weight_bits == 8 or not keep:
            return self.opts.weight_bits
        depthwise = node.op == "Conv" and int(node.attrs.get("group", 1)) > 1 and w.shape[1] == 1
        if ("depthwise" in keep and depthwise) or ("first" in keep and node.name == self.first) \
                or ("last" in keep and node.name == self.last):
            return 8
        return self.opts.weight_bits

    def weight_scheme(self, node, w: np.ndarray, axis: int) -> QuantScheme:
        bits, opts = self.weight_bits(node, w), self.opts
        if opts.block_size and node.op == "Conv" and bits < 8 and w.shape[1] >= opts.block_size:
            # Blocks along the input channels of each output channel (and kernel tap): ONNX's blocked
            # DequantizeLinear on axis 1. 4-bit Convs do not run as QLinearConv anyway.
            return QuantScheme(bits=bits, signed=True, symmetric=True, axis=1, block_size=opts.block_size)
        if opts.block_size and node.op in ("MatMul", "Gemm") and w.ndim == 2:
            # Blocks run along the input (K) axis, one scale per block and output channel: ONNX's blocked
            # DequantizeLinear on that axis, and MatMulNBits' layout once transposed to [N, K].
            k_axis = 1 if node.op == "Gemm" and int(node.attrs.get("transB", 0)) else 0
            return QuantScheme(bits=bits, signed=True, symmetric=True, axis=k_axis, block_size=opts.block_size)
        return QuantScheme(bits=bits, signed=True, symmetric=True, axis=axis if opts.per_channel else None)

    def requant(self, node) -> None:
        m = self.model
        inputs = [t for t in node.inputs if t.name]
        if node.op in ("Add", "Mul") and len(inputs) != 2:
            return
        if any(m.is_constant(t) or t.name not in self.quantizable or not is_quantizable_float(m, t) for t in inputs):
            return
        if not is_quantizable_float(m, node.outputs[0]):
            return
        for t in inputs:
            self.activation(t)
        self.activation(node.outputs[0])

    def bounded(self, node) -> None:
        """Min(x, b >= 0) after a quantized tensor (CLE's per-channel ReLU6 bound): x takes the output's
        parameters, so the saturating quantizer of x already clips at the largest bound."""
        m = self.model
        x, bound = node.inputs[0], m.constant_value(node.inputs[1]) if len(node.inputs) == 2 else None
        if bound is None or np.any(bound < 0) or x.name not in self.quantizable or not is_quantizable_float(m, x):
            return
        out = node.outputs[0]
        self.activation(x)
        self.activation(out)
        x_entry = self.table.get(x.name)
        assert x_entry is not None  # activation() just made it
        x_entry.tied_to = out.name

    def same_params(self, node) -> None:
        m = self.model
        data = node.inputs[0]
        if data.name not in self.quantizable or not is_quantizable_float(m, data):
            return
        for out in node.outputs:
            if is_quantizable_float(m, out):
                # Only recorded: an entry (tied to the source) is created if a consumer needs it.
                self.quantizable.add(out.name)
                self.parent[out.name] = data.name

    def absorbed_activation(self, node) -> None:
        """A Relu/Clip after a quantized tensor carries quantized values too (its Q absorbs it)."""
        if node.inputs[0].name in self.quantizable:
            self.quantizable.add(node.outputs[0].name)

    # What the plan does with each op category (qonnx.core.ops); other ops stay float.
    RULES: ClassVar[dict[Category, str]] = {
        Category.LAYER: "compute",
        Category.REQUANT: "requant",
        Category.MOVEMENT: "same_params",
        Category.MOVEMENT_QDQ: "same_params",
        Category.BOUND: "bounded",
        Category.ACTIVATION: "absorbed_activation",
    }

    def run(self) -> None:
        self.parent: dict[str, str] = {}
        excluded = set(self.opts.exclude)
        unknown = sorted(excluded - {n.name for n in self.model.nodes})
        if unknown:
            raise PreconditionError(f"pass 'plan': exclude names unknown node(s) {', '.join(map(repr, unknown))}")
        compute = [n.name for n in self.model.toposort() if n.op in LAYER_OPS and n.name not in excluded]
        self.first: str | None
        self.last: str | None
        self.first, self.last = (compute[0], compute[-1]) if compute else (None, None)
        for node in self.model.toposort():
            if node.name in excluded:
                self.keep_float(node, "excluded by the user")
                continue
            category = OP_CATEGORIES.get(node.op)
            if category in self.RULES:
                getattr(self, self.RULES[category])(node)
        # A quantized data-movement output shares its source's parameters, and every
        # tensor of the chain back to the source is quantized too, so that ORT sees
        # DQ -> op -> Q with equal parameters and runs the op on integers.
        tensors = self.model.tensors()
        for name in [n for n in self.table.tensors if n in self.parent]:
            cur = name
            while cur in self.parent:
                src = self.parent[cur]
                if self.table.get(src) is None:
                    self.activation(tensors[src])
                root = src
                while root in self.parent:
                    root = self.parent[root]
                self.table.tensors[cur].tied_to = root
                cur = src


def fingerprint(model: Model) -> tuple:
    """What the plan decides (schemes, ties, layers), to report `modified` honestly."""
    table = model.quant
    tensors = tuple(sorted((n, e.role.value, e.scheme, e.tied_to, e.bias_of, e.calibrated)
                           for n, e in table.tensors.items()))
    return tensors, tuple(sorted(table.layers))


def apply_plan(model: Model, options: PlanOptions) -> None:
    """Replace the model's plan by a fresh one made with `options` (lookup tables stay)."""
    model.quant.clear()
    model.quant.plan_options = options
    Planner(model, options).run()


def replan_excluding(model: Model, reasons: dict[str, str]) -> None:
    """Plan again with the current plan's options and the given layers also excluded.

    Layers kept float before keep their reasons; a non-empty reason here replaces the layer's.
    The new plan has no parameters: the caller calibrates (or estimates ranges) again.
    """
    table = model.quant
    previous, per_run = dict(table.kept_float), dict(table.dynamic)
    base = table.plan_options if table.plan_options is not None else PlanOptions()
    exclude = set(base.exclude) | set(reasons)
    apply_plan(model, dataclasses.replace(base, exclude=tuple(sorted(exclude))))
    table.kept_float.update({k: v for k, v in previous.items() if k not in reasons})
    table.kept_float.update({k: v for k, v in reasons.items() if v})
    # MatMuls quantized per run (protect) are out of the static plan; they stay per run while excluded.
    table.dynamic.update({k: v for k, v in per_run.items() if k in exclude and k not in reasons})

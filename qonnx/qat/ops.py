"""One torch function per ONNX operator of the canonical qonnx IR (the ops our canonicalized real models use).

Each takes (inputs, attrs, consts): the input tensors (None for omitted inputs), the node's attributes and the
numpy values of constant inputs (None where an input is computed), and returns the list of outputs. Shapes,
axes and bounds that ONNX passes as inputs are read from `consts`, never from tensors, so the graph stays
traceable and the interpreter never syncs on data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qonnx.errors import PreconditionError

Op = Callable[[list, dict, list], list]


def _pads(attrs: dict, spatial: int, op: str) -> tuple[list[int], bool]:
    """ONNX pads [b1, b2, ..., e1, e2, ...] -> (pads, symmetric); auto_pad other than NOTSET/VALID is refused."""
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto not in ("NOTSET", "VALID"):
        raise PreconditionError(f"pass 'qat': {op} with auto_pad={auto} is not supported by the torch interpreter")
    pads = [int(p) for p in attrs.get("pads", [0] * (2 * spatial))] if auto == "NOTSET" else [0] * (2 * spatial)
    return pads, pads[:spatial] == pads[spatial:]


def _explicit_pad(x: torch.Tensor, pads: list[int], value: float = 0.0) -> torch.Tensor:
    spatial = len(pads) // 2
    torch_pads: list[int] = []
    for i in reversed(range(spatial)):  # F.pad lists the last dimension first
        torch_pads += [pads[i], pads[i + spatial]]
    return F.pad(x, torch_pads, value=value)


def conv(ins: list, attrs: dict, consts: list) -> list:
    x, w = ins[0], ins[1]
    b = ins[2] if len(ins) > 2 else None
    spatial = w.dim() - 2
    if spatial not in (1, 2, 3):
        raise PreconditionError(f"pass 'qat': Conv with {spatial} spatial dimensions is not supported")
    pads, symmetric = _pads(attrs, spatial, "Conv")
    stride = [int(s) for s in attrs.get("strides", [1] * spatial)]
    dilation = [int(d) for d in attrs.get("dilations", [1] * spatial)]
    groups = int(attrs.get("group", 1))
    if not symmetric:
        x, pads = _explicit_pad(x, pads), [0] * (2 * spatial)
    fn = (F.conv1d, F.conv2d, F.conv3d)[spatial - 1]
    return [fn(x, w, b, stride, pads[:spatial], dilation, groups)]


def gemm(ins: list, attrs: dict, consts: list) -> list:
    a, b = ins[0], ins[1]
    if int(attrs.get("transA", 0)):
        a = a.t()
    if int(attrs.get("transB", 0)):
        b = b.t()
    y = torch.matmul(a, b) * float(attrs.get("alpha", 1.0))
    if len(ins) > 2 and ins[2] is not None:
        y = y + float(attrs.get("beta", 1.0)) * ins[2]
    return [y]


def batch_norm(ins: list, attrs: dict, consts: list, stats: tuple | None = None) -> list:
    """Inference form; `stats` = (mean, var) replaces the running statistics (re-estimation)."""
    x, scale, bias, mean, var = ins[:5]
    if stats is not None:
        mean, var = stats
    shape = [1, -1] + [1] * (x.dim() - 2)
    inv = torch.rsqrt(var + float(attrs.get("epsilon", 1e-5)))
    return [(x - mean.reshape(shape)) * (scale * inv).reshape(shape) + bias.reshape(shape)]


def _const_ints(consts: list, index: int, attrs: dict, key: str) -> list[int] | None:
    if len(consts) > index and consts[index] is not None:
        return [int(v) for v in np.asarray(consts[index]).reshape(-1)]
    if key in attrs:
        return [int(v) for v in attrs[key]]
    return None


def _require_const(consts: list, index: int, op: str, what: str) -> np.ndarray:
    if len(consts) <= index or consts[index] is None:
        raise PreconditionError(f"pass 'qat': {op} with a computed {what} is not supported (it must be a constant)")
    return np.asarray(consts[index])


def reshape(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    shape = [int(v) for v in _require_const(consts, 1, "Reshape", "shape").reshape(-1)]
    if not int(attrs.get("allowzero", 0)):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return [x.reshape(shape)]


def flatten(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    axis = int(attrs.get("axis", 1)) % max(x.dim(), 1)
    lead = int(np.prod(x.shape[:axis])) if axis else 1
    return [x.reshape(lead, -1)]


def clip(ins: list, attrs: dict, consts: list) -> list:
    lo = consts[1] if len(consts) > 1 and consts[1] is not None else attrs.get("min")
    hi = consts[2] if len(consts) > 2 and consts[2] is not None else attrs.get("max")
    if (len(ins) > 1 and ins[1] is not None and lo is None) or (len(ins) > 2 and ins[2] is not None and hi is None):
        raise PreconditionError("pass 'qat': Clip with computed bounds is not supported")
    return [torch.clamp(ins[0], None if lo is None else float(lo), None if hi is None else float(hi))]


def _pool_params(x: torch.Tensor, attrs: dict, op: str):
    kernel = [int(k) for k in attrs["kernel_shape"]]
    spatial = len(kernel)
    pads, symmetric = _pads(attrs, spatial, op)
    stride = [int(s) for s in attrs.get("strides", [1] * spatial)]
    return kernel, spatial, pads, symmetric, stride, bool(int(attrs.get("ceil_mode", 0)))


def max_pool(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    kernel, spatial, pads, symmetric, stride, ceil = _pool_params(x, attrs, "MaxPool")
    dilation = [int(d) for d in attrs.get("dilations", [1] * spatial)]
    if not symmetric:
        x, pads = _explicit_pad(x, pads, float("-inf")), [0] * (2 * spatial)
    fn = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[spatial - 1]
    return [fn(x, kernel, stride, pads[:spatial], dilation, ceil_mode=ceil)]


def avg_pool(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    kernel, spatial, pads, symmetric, stride, ceil = _pool_params(x, attrs, "AveragePool")
    include = bool(int(attrs.get("count_include_pad", 0)))
    if not symmetric:
        if not include:
            raise PreconditionError("pass 'qat': AveragePool with asymmetric pads and count_include_pad=0")
        x, pads = _explicit_pad(x, pads), [0] * (2 * spatial)
    fn = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[spatial - 1]
    return [fn(x, kernel, stride, pads[:spatial], ceil_mode=ceil, count_include_pad=include)]


def reduce_mean(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    axes = _const_ints(consts, 1, attrs, "axes")
    keep = bool(int(attrs.get("keepdims", 1)))
    if not axes:
        return [x.mean(dim=tuple(range(x.dim())), keepdim=keep)]
    return [x.mean(dim=tuple(a % x.dim() for a in axes), keepdim=keep)]


def squeeze(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    axes = _const_ints(consts, 1, attrs, "axes")
    if axes is None:
        return [x.squeeze()]
    for a in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(a)
    return [x]


def unsqueeze(ins: list, attrs: dict, consts: list) -> list:
    x = ins[0]
    axes = _const_ints(consts, 1, attrs, "axes")
    if axes is None:
        raise PreconditionError("pass 'qat': Unsqueeze without axes")
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return [x]


def _unary(fn: Callable[[Any], Any]) -> Op:
    return lambda ins, attrs, consts: [fn(ins[0])]


def _binary(fn: Callable[[Any, Any], Any]) -> Op:
    return lambda ins, attrs, consts: [fn(ins[0], ins[1])]


OPS: dict[str, Op] = {
    "Conv": conv,
    "Gemm": gemm,
    "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _binary(torch.div),
    "Pow": _binary(torch.pow),
    "Min": lambda ins, attrs, consts: [torch.stack(torch.broadcast_tensors(*ins)).amin(0)],
    "Max": lambda ins, attrs, consts: [torch.stack(torch.broadcast_tensors(*ins)).amax(0)],
    "Relu": _unary(torch.relu),
    "Clip": clip,
    "LeakyRelu": lambda ins, attrs, consts: [F.leaky_relu(ins[0], float(attrs.get("alpha", 0.01)))],
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "HardSigmoid": lambda ins, attrs, consts: [
        torch.clamp(float(attrs.get("alpha", 0.2)) * ins[0] + float(attrs.get("beta", 0.5)), 0.0, 1.0)],
    "HardSwish": _unary(F.hardswish),
    "Softmax": lambda ins, attrs, consts: [torch.softmax(ins[0], int(attrs.get("axis", -1)))],
    "Sqrt": _unary(torch.sqrt),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Neg": _unary(torch.neg),
    "Identity": _unary(lambda x: x),
    "GlobalAveragePool": _unary(lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)),
    "GlobalMaxPool": _unary(lambda x: x.amax(dim=tuple(range(2, x.dim())), keepdim=True)),
    "AveragePool": avg_pool,
    "MaxPool": max_pool,
    "Flatten": flatten,
    "Reshape": reshape,
    "Transpose": lambda ins, attrs, consts: [ins[0].permute(
        *[int(p) for p in attrs.get("perm", list(reversed(range(ins[0].dim()))))])],
    "Concat": lambda ins, attrs, consts: [torch.cat([t for t in ins if t is not None], int(attrs["axis"]))],
    "BatchNormalization": batch_norm,
    "ReduceMean": reduce_mean,
    "Squeeze": squeeze,
    "Unsqueeze": unsqueeze,
}

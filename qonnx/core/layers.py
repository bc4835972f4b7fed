"""Per-channel arithmetic of Conv/Gemm layers shared by bias correction and moment propagation."""

from __future__ import annotations

import numpy as np


def channel_response(node, weight: np.ndarray, values: np.ndarray) -> np.ndarray | None:
    """sum over inputs and kernel positions of weight[o, c, k] * values[c], per output channel o.

    With the weight error and E[x] this is the mean output shift of rounding; with W^2 and
    Var[x] the output variance of independent inputs. None if the layout is not understood.
    One value stands for every input channel (a graph input whose channel count is unknown).
    """
    values = np.asarray(values)
    if values.size == 1:
        values = np.full(input_channels(node, weight), values.reshape(-1)[0])
    if node.op == "Conv":
        groups = int(node.attrs.get("group", 1))
        summed = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(axis=2)  # [O, C/g]
        out_per_group, in_per_group = summed.shape[0] // groups, summed.shape[1]
        if values.shape[0] != in_per_group * groups:
            return None
        grouped = values.reshape(groups, in_per_group)[np.arange(summed.shape[0]) // out_per_group]
        return np.sum(summed * grouped, axis=1)
    if node.op == "Gemm":
        return weight @ values if int(node.attrs.get("transB", 0)) else values @ weight
    return None


def input_channels(node, weight: np.ndarray) -> int:
    if node.op == "Conv":
        return weight.shape[1] * int(node.attrs.get("group", 1))
    return weight.shape[1] if int(node.attrs.get("transB", 0)) else weight.shape[0]

"""The student: the float graph with fake quantizers that follow the quant table, and the write-back of what it
learned (weights, integer codes, step sizes, BatchNorm statistics) into the IR by tensor name."""

from __future__ import annotations

import logging

import numpy as np
import torch

from qonnx.core.ir import Model
from qonnx.core.qtable import QuantState, Role
from qonnx.errors import PreconditionError
from qonnx.qat.interpreter import GraphModule
from qonnx.qat.quantizers import ActQuantizer, BiasQuantizer, WeightQuantizer
from qonnx.quantize.parameters import set_bias_params

log = logging.getLogger(__name__)


class Student:
    """GraphModule + quantizers: `weights` by weight name, `acts` by root activation name (ties share one)."""

    def __init__(self, model: Model, mode: str = "lsq", learn_acts: bool = True, track_bits: int = 4,
                 momentum: float = 0.01, scale_init: str = "calibrated", octav_iterations: int = 2):
        self.module = GraphModule(model)
        self.weights: dict[str, WeightQuantizer] = {}
        self.acts: dict[str, ActQuantizer] = {}
        table = model.quant
        for name, entry in sorted(table.of_role(Role.WEIGHT).items()):
            if name not in self.module.param_keys:
                raise PreconditionError(f"pass 'qat': weight '{name}' is not a weight of a Conv/Gemm/MatMul")
            s = entry.scheme
            if s.block_size or not (s.signed and s.symmetric):
                raise PreconditionError(f"pass 'qat': weight '{name}' is {s.describe()}; QAT supports symmetric "
                                        "signed weights per channel or per tensor")
            if not entry.calibrated:
                raise PreconditionError(f"pass 'qat': weight '{name}' has no scale yet: calibrate before qat")
            param = self.module.parameter(name)
            scale = torch.from_numpy(np.asarray(entry.scale, np.float32).reshape(-1) if s.axis is not None
                                     else np.asarray(entry.scale, np.float32).reshape(()))
            if entry.codes is not None:  # rounded before (AdaRound): start from that rounding
                with torch.no_grad():
                    shape = [1] * param.dim()
                    if s.axis is not None:
                        shape[s.axis % param.dim()] = -1
                    param.copy_(torch.from_numpy(np.asarray(entry.codes, np.float32)) * scale.reshape(shape))
            elif scale_init == "lsq":  # LSQ's 2 mean|w| / sqrt(Q_P)
                rows = param.detach().abs().movedim(s.axis % param.dim(), 0).reshape(scale.numel(), -1) \
                    if s.axis is not None else param.detach().abs().reshape(1, -1)
                scale = (2 * rows.mean(1) / float(np.sqrt(s.qmax))).reshape(scale.shape)
            quantizer = WeightQuantizer(param.detach(), s, scale, mode=mode, octav_iterations=octav_iterations,
                                        track=s.bits <= track_bits, momentum=momentum)
            self.weights[name] = quantizer
            self.module.set_weight_hook(name, quantizer)
        tensors = model.tensors()
        for name, entry in sorted(table.of_role(Role.ACTIVATION).items()):
            if np.asarray(entry.scale).size != 1:
                raise PreconditionError(f"pass 'qat': activation '{name}' has per-channel parameters")
            root = table.root(name)
            if root not in self.acts:
                root_entry = table.get(root)
                source = root_entry if root_entry is not None and root_entry.calibrated else entry
                self.acts[root] = ActQuantizer(source.scheme, float(np.asarray(source.scale).reshape(())),
                                               int(np.asarray(source.zero_point).reshape(())), learn=learn_acts)
            if name not in tensors:
                raise PreconditionError(f"pass 'qat': quant table names missing tensor '{name}'")
            self.module.set_act_hook(name, self.acts[root])
        for name, q in self.weights.items():
            q.update_octav(self.module.parameter(name).detach())
        for name, entry in sorted(table.of_role(Role.BIAS).items()):
            assert entry.bias_of is not None  # planning gives every bias entry its (input, weight)
            x_name, w_name = entry.bias_of
            act = self.acts.get(table.root(x_name))
            if act is not None and w_name in self.weights and name in self.module.param_keys:
                self.module.set_weight_hook(name, BiasQuantizer(act, self.weights[w_name]))

    def weight_parameters(self) -> list[torch.nn.Parameter]:
        return [self.module.params[k] for k in sorted(self.module.params.keys(), key=lambda k: int(k[1:]))]

    def scale_parameters(self) -> list[torch.nn.Parameter]:
        found = [q.scale for q in self.weights.values() if isinstance(q.scale, torch.nn.Parameter)]
        seen = set()
        for q in self.acts.values():
            if isinstance(q.scale, torch.nn.Parameter) and id(q) not in seen:
                seen.add(id(q))
                found.append(q.scale)
        return found

    def tracked(self) -> dict[str, WeightQuantizer]:
        return {n: q for n, q in self.weights.items() if q.tracker is not None}

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(),
                "acts": {n: q.state_dict() for n, q in self.acts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        for n, q in self.acts.items():
            q.load_state_dict(state["acts"][n])


def write_back(model: Model, student: Student) -> dict[str, int]:
    """Learned values into the IR: weights (as their dequantized codes), codes and step sizes (state ROUNDED),
    other trained parameters, activation step sizes (ties too), BatchNorm statistics; then int32 bias scales."""
    tensors = model.tensors()
    table = model.quant
    module = student.module
    for name, param in module.named_graph_parameters().items():
        value = param.detach().numpy().astype(np.float32)
        quantizer = student.weights.get(name)
        if quantizer is not None:
            entry = table.get(name)
            # Student quantizes only the calibrated weight entries of this table.
            assert entry is not None and entry.scale is not None
            codes = quantizer.codes(param.detach())
            scale = quantizer.step_size().detach()
            entry.codes = codes.numpy().astype(np.int64)
            entry.scale = scale.numpy().astype(np.float32).reshape(np.shape(entry.scale))
            entry.state = QuantState.ROUNDED
            entry.method = entry.method.split("+qat")[0] + "+qat" if entry.method else "qat"
            shape = list(quantizer.shape)
            # The float graph holds the quantized weights: re-deriving codes from it gives the same integers.
            value = (codes * scale.reshape(shape)).numpy().astype(np.float32)
        tensors[name].values = value.astype(tensors[name].values.dtype)
    for name, entry in table.of_role(Role.ACTIVATION).items():
        q = student.acts[table.root(name)]
        # entry.scale may be None (a tie never given its own): np.shape(None) is () at runtime, numpy's stubs omit None.
        entry.scale = np.asarray(float(torch.clamp(q.scale.detach(), min=1e-8)), np.float32).reshape(
            np.shape(entry.scale))  # type: ignore[arg-type]
        entry.method = entry.method.split("+qat")[0] + "+qat" if entry.method else "qat"
    for step in module.batch_norm_steps():
        stats = module.bn_stats.get(step.name)
        if stats is not None:
            for index, stat in zip((3, 4), stats, strict=True):
                t = tensors[step.inputs[index]]
                t.values = stat.detach().numpy().astype(t.values.dtype)
    grown = set_bias_params(model)
    return {"weights": len(student.weights), "activations": len(student.acts), "bias_scale_guards": grown}

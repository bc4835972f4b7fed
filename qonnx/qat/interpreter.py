"""A torch module that runs the canonical qonnx IR node by node (ops in qonnx/qat/ops.py).

Weights and biases of Conv/Gemm/MatMul and BatchNormalization's scale and bias are nn.Parameters, kept 1:1 by
initializer name (`parameter(name)`), so what training learns is written back into the IR by name. Every other
constant is a fixed buffer. Fake quantizers hook in by tensor name: `weight_hooks` transform a parameter where it
is read, `act_hooks` a computed tensor (or a graph input) where it is produced, so every consumer sees the
quantized value, as in the exported QDQ graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from qonnx.core.ir import Model
from qonnx.errors import PreconditionError
from qonnx.qat.ops import OPS, batch_norm

# Inputs of these ops that training may change (all float constants there).
TRAINABLE_INPUTS = {"Conv": (1, 2), "Gemm": (1, 2), "MatMul": (1,), "BatchNormalization": (1, 2)}


@dataclass
class _Step:
    op: str
    name: str
    inputs: list[str]  # "" for omitted inputs
    outputs: list[str]
    attrs: dict
    consts: list  # numpy value of each constant input, else None


def unsupported_ops(model: Model) -> list[str]:
    return sorted({n.op for n in model.nodes if n.op not in OPS})


class _Captured(Exception):
    """Ends a capture run early, once every requested tensor is computed."""


class GraphModule(nn.Module):
    """The float graph as a torch module: forward(*inputs) -> list of graph outputs."""

    def __init__(self, model: Model):
        super().__init__()
        missing = unsupported_ops(model)
        if missing:
            raise PreconditionError(f"pass 'qat': the torch interpreter does not support operator(s) "
                                    f"{', '.join(missing)}")
        if model.has_subgraphs():
            raise PreconditionError("pass 'qat': graphs with If/Loop subgraphs are not supported")
        self.input_names = [t.name for t in model.inputs if not model.is_constant(t)]
        self.output_names = [t.name for t in model.outputs]
        trainable = {n.inputs[i].name for n in model.nodes for i in TRAINABLE_INPUTS.get(n.op, ())
                     if i < len(n.inputs) and n.inputs[i].name}
        self.params = nn.ParameterDict()
        self.param_keys: dict[str, str] = {}
        self._consts: dict[str, torch.Tensor] = {}
        self.steps: list[_Step] = []
        for node in model.toposort():
            consts = []
            for t in node.inputs:
                value = model.constant_value(t) if t.name else None
                consts.append(value)
                if value is None or t.name in self.param_keys or t.name in self._consts:
                    continue
                if t.name in trainable and np.issubdtype(value.dtype, np.floating):
                    key = f"p{len(self.param_keys)}"
                    self.params[key] = nn.Parameter(torch.from_numpy(np.array(value, np.float32)))
                    self.param_keys[t.name] = key
                elif np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer):
                    self._consts[t.name] = torch.from_numpy(np.array(value))
            self.steps.append(_Step(node.op, node.name, [t.name for t in node.inputs],
                                    [t.name for t in node.outputs], dict(node.attrs), consts))
        self.weight_hooks = nn.ModuleDict()  # escaped keys; see hook_key
        self.act_hooks = nn.ModuleDict()
        self.hook_names: dict[str, str] = {}
        # BatchNormalization node name -> (mean, var) used instead of the running statistics, and the
        # per-batch statistics collected while re-estimating (None: not collecting).
        self.bn_stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.bn_collect: dict[str, list] | None = None
        self._capture: dict[str, torch.Tensor | None] | None = None
        self._capture_left: set[str] | None = None

    # ---------------------------------------------------------------- access by name
    def parameter(self, name: str) -> nn.Parameter:
        return self.params[self.param_keys[name]]

    def named_graph_parameters(self) -> dict[str, nn.Parameter]:
        return {name: self.params[key] for name, key in self.param_keys.items()}

    def const(self, name: str) -> torch.Tensor | None:
        return self._consts.get(name)

    def _key(self, name: str) -> str:
        key = self.hook_names.get(name)
        if key is None:
            key = f"h{len(self.hook_names)}"
            self.hook_names[name] = key
        return key

    def set_weight_hook(self, name: str, module: nn.Module) -> None:
        self.weight_hooks[self._key(name)] = module

    def set_act_hook(self, name: str, module: nn.Module) -> None:
        self.act_hooks[self._key(name)] = module

    def weight_hook(self, name: str) -> nn.Module | None:
        key = self.hook_names.get(name)
        return self.weight_hooks[key] if key is not None and key in self.weight_hooks else None

    def act_hook(self, name: str) -> nn.Module | None:
        key = self.hook_names.get(name)
        return self.act_hooks[key] if key is not None and key in self.act_hooks else None

    # ---------------------------------------------------------------- running
    def _value(self, name: str, env: dict) -> torch.Tensor | None:
        if not name:
            return None
        if name in env:
            return env[name]
        key = self.param_keys.get(name)
        if key is not None:
            value = self.params[key]
            hook = self.weight_hook(name)
            value = hook(value) if hook is not None else value
        else:
            value = self._consts.get(name)
            if value is None:
                raise PreconditionError(f"pass 'qat': tensor '{name}' has no value (internal error)")
        env[name] = value
        return value

    def _produced(self, name: str, value: torch.Tensor, env: dict) -> None:
        if self._capture is not None and name in self._capture:
            self._capture[name] = value  # before its fake quantizer: what the node computed
            if self._capture_left is not None:
                self._capture_left.discard(name)
                if not self._capture_left:
                    raise _Captured
        hook = self.act_hook(name)
        env[name] = hook(value) if hook is not None else value

    def forward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        env: dict[str, torch.Tensor] = {}
        for name, value in zip(self.input_names, inputs, strict=True):
            self._produced(name, value, env)
        for step in self.steps:
            ins = [self._value(n, env) for n in step.inputs]
            if step.op == "BatchNormalization":
                outs = self._batch_norm(step, ins)
            else:
                outs = OPS[step.op](ins, step.attrs, step.consts)
            for name, value in zip(step.outputs, outs, strict=False):
                if name:
                    self._produced(name, value, env)
        return [env[n] for n in self.output_names]

    def _batch_norm(self, step: _Step, ins: list) -> list:
        if self.bn_collect is not None:  # re-estimation: normalise with this batch's statistics, record them
            x = ins[0]
            dims = [0] + list(range(2, x.dim()))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            self.bn_collect.setdefault(step.name, []).append((mean.detach(), var.detach()))
            return batch_norm(ins, step.attrs, step.consts, (mean, var))
        return batch_norm(ins, step.attrs, step.consts, self.bn_stats.get(step.name))

    def capture_run(self, inputs: list[torch.Tensor], names: list[str], stop_early: bool = False
                    ) -> dict[str, torch.Tensor | None]:
        """Run once and return the named intermediate tensors (as computed, before any activation quantizer);
        with `stop_early` the run ends as soon as they are all computed. A name no node computes maps to None."""
        self._capture = dict.fromkeys(names)
        self._capture_left = set(names) if stop_early else None
        try:
            self(*inputs)
        except _Captured:
            pass
        finally:
            captured, self._capture, self._capture_left = self._capture, None, None
        return dict(captured)

    def batch_norm_steps(self) -> list[_Step]:
        return [s for s in self.steps if s.op == "BatchNormalization"]

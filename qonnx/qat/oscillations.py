"""Weight oscillation tracking, iterative freezing and the annealing schedules (Nagel et al. 2022, §7.1).

Per weight element and step, with x_int the integer code:
    delta = round(x_int^{t-1} - x_int^t),  dir = sign(delta)
    oscillation when dir * prev_dir == -1, prev_dir being the last non-zero direction
    f <- m 1[osc] + (1 - m) f               (EMA frequency, momentum m)
    x_ema <- m x_int + (1 - m) x_ema        (the value a frozen weight keeps: round(x_ema))
A weight whose f exceeds the freeze threshold is frozen for good at round(x_ema).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_anneal(step: int, total: int, start: float, end: float, anneal_start: float,
                  before: float | None = None) -> float:
    """`before` (default `start`) until anneal_start * total, then a cosine from `start` to `end` at the last step."""
    first = anneal_start * total
    if step < first:
        return start if before is None else before
    rel = (step - first) / max(1.0, total - 1 - first)
    rel = min(1.0, rel)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * rel))


def dampening_weight(step: int, total: int, final: float, anneal_start: float = 0.25) -> float:
    """0 before anneal_start, then cosine-annealed from 0 up to `final`."""
    return cosine_anneal(step, total, 0.0, final, anneal_start)


def freeze_threshold(step: int, total: int, start: float, final: float, anneal_start: float = 0.25) -> float:
    """0 (no freezing) before anneal_start, then cosine decay from `start` to `final`."""
    return cosine_anneal(step, total, start, final, anneal_start, before=0.0)


class OscillationTracker(nn.Module):
    """Oscillation frequency, EMA of the integers and the frozen mask for one weight tensor (buffers)."""

    # Buffers registered by name in __init__; declared here so the type checker sees them as tensors.
    prev_int: torch.Tensor
    prev_dir: torch.Tensor
    freq: torch.Tensor
    ema_int: torch.Tensor
    frozen_int: torch.Tensor
    frozen: torch.Tensor
    window: torch.Tensor
    steps: torch.Tensor

    def __init__(self, shape: tuple[int, ...], momentum: float = 0.01):
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError("momentum must lie in (0, 1]")
        self.momentum = momentum
        for name, dtype in (("prev_int", torch.float32), ("prev_dir", torch.float32), ("freq", torch.float32),
                            ("ema_int", torch.float32), ("frozen_int", torch.float32), ("frozen", torch.bool),
                            ("window", torch.bool)):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def update(self, x_int: torch.Tensor) -> torch.Tensor:
        """Record this step's integers; returns the oscillation mask of this step."""
        m = self.momentum
        x_int = x_int.float()
        if int(self.steps) == 0:
            self.prev_int.copy_(x_int)
            self.ema_int.copy_(x_int)
            self.steps += 1
            return torch.zeros_like(self.frozen)
        direction = torch.sign(torch.round(self.prev_int - x_int))
        osc = (direction * self.prev_dir) == -1
        osc &= ~self.frozen
        self.freq.mul_(1 - m).add_(m * osc.float())
        self.prev_dir.copy_(torch.where(direction != 0, direction, self.prev_dir))
        self.ema_int.mul_(1 - m).add_(m * x_int)
        self.prev_int.copy_(x_int)
        self.window |= osc
        self.steps += 1
        return osc

    @torch.no_grad()
    def freeze(self, threshold: float) -> int:
        """Freeze (for good) the weights oscillating more often than `threshold`; returns how many were new."""
        if threshold <= 0:
            return 0
        new = (self.freq > threshold) & ~self.frozen
        count = int(new.sum())
        if count:
            self.frozen_int.copy_(torch.where(new, torch.round(self.ema_int), self.frozen_int))
            self.frozen |= new
        return count

    @torch.no_grad()
    def take_window(self) -> tuple[float, float]:
        """(fraction of weights that oscillated since the last call, fraction frozen); resets the window."""
        n = max(1, self.frozen.numel())
        result = float(self.window.sum()) / n, float(self.frozen.sum()) / n
        self.window.zero_()
        return result

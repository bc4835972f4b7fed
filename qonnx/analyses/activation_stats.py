"""Activation statistics over the calibration data: bounded histograms per tensor, per-channel means.

The calibration set is streamed once through ORT with the needed intermediate tensors exposed in memory;
each tensor keeps a bounded histogram (strided samples of large tensors, exact min/max), so memory does
not grow with the number of samples. Both results are cached analyses: calibrate, protect, smooth and
bias correction share one pass over the data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from qonnx.core.ir import Model
from qonnx.data.calibration import CalibrationSet
from qonnx.infra.context import Analysis, PassContext
from qonnx.numerics.stats import TensorHistogram
from qonnx.runtime.ort import stream_tensors

SAMPLES_PER_BATCH = 1 << 17  # histogram samples per tensor per batch: enough for the range methods


def sample_stride(size: int) -> int:
    """An odd prime stride (no aliasing with power-of-two tensor layouts) giving ~SAMPLES_PER_BATCH samples."""
    want = -(-size // SAMPLES_PER_BATCH)
    if want <= 1:
        return 1
    candidate = want | 1
    while any(candidate % p == 0 for p in range(3, int(candidate**0.5) + 1, 2)):
        candidate += 2
    return candidate


@dataclass
class ActivationStats(Analysis):
    """Histograms of activations over the calibration data (its first `samples`, 0 = all)."""

    samples: int
    histograms: dict[str, TensorHistogram]


@dataclass
class ChannelMeans(Analysis):
    """Per-channel (axis 1) means of the named tensors, gathered in the same pass as the histograms."""

    names: tuple[str, ...]
    samples: int
    means: dict[str, np.ndarray]


def stream_statistics(model: Model, names: list[str], data: CalibrationSet, batch_size: int = 8,
                      threads: int | None = None, progress: bool = False, mean_names: list[str] | None = None
                      ) -> tuple[dict[str, TensorHistogram], dict[str, np.ndarray]]:
    """Histograms of `names` and per-channel means of `mean_names` over `data` (no cache involved)."""
    mean_names = sorted(set(mean_names or []))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    stream = stream_tensors(model.to_onnx(), {*names, *mean_names}, data.batches(batch_size), threads)
    stats = {n: TensorHistogram() for n in names}
    strides: dict[str, int] = {}
    with tqdm(total=len(data), desc="calibrating", unit="sample", disable=not progress, leave=False) as bar:
        for feed, values in stream:
            for name in names:
                value = values[name]
                if name not in strides:  # fixed per tensor, so batches keep their relative weight
                    strides[name] = sample_stride(value.size)
                stats[name].update(value, sample_stride=strides[name])
            for name in mean_names:
                value = values[name]
                # Sum over every axis but 1 without materialising a transposed copy.
                axes = tuple(i for i in range(value.ndim) if i != 1)
                sums[name] = sums.get(name, 0.0) + value.sum(axis=axes, dtype=np.float64)
                counts[name] = counts.get(name, 0) + value.size // value.shape[1]
            bar.update(len(next(iter(feed.values()))))
    return stats, {n: sums[n] / counts[n] for n in mean_names}


def collect_activation_stats(model: Model, names: list[str], ctx: PassContext, batch_size: int = 8,
                             samples: int = 0, mean_names: list[str] | None = None) -> dict[str, TensorHistogram]:
    """Histograms of the named tensors, from the cached ActivationStats when they cover them.

    Per-channel means of `mean_names` are gathered in the same pass and cached as ChannelMeans
    (bias correction needs them).
    """
    mean_names = sorted(set(mean_names or []))
    cached = ctx.analyses.get(ActivationStats)
    if cached is not None and cached.samples == samples and set(names) <= set(cached.histograms) and not mean_names:
        return {n: cached.histograms[n] for n in names}
    data = ctx.data() if not samples else ctx.data().head(samples)
    stats, means = stream_statistics(model, names, data, batch_size, ctx.threads, ctx.progress, mean_names)
    ctx.analyses.put(ActivationStats(samples, stats))
    if mean_names or not names:
        ctx.analyses.put(ChannelMeans(tuple(mean_names), samples, means))
    return stats


def channel_means(model: Model, names: list[str], ctx: PassContext, batch_size: int = 8, samples: int = 0
                  ) -> dict[str, np.ndarray]:
    """Per-channel (axis 1) means of layer inputs; reuses calibration's pass over the data when cached."""
    if not names:
        return {}
    cached = ctx.analyses.get(ChannelMeans)
    if cached is not None and (cached.names, cached.samples) == (tuple(sorted(set(names))), samples):
        return cached.means
    collect_activation_stats(model, [], ctx, batch_size, samples, names)
    means = ctx.analyses.get(ChannelMeans)
    assert means is not None  # put by the call above
    return means.means

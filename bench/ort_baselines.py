"""ONNX Runtime quantization baselines: pre-processing, static (QDQ) and dynamic quantization.

Every call here is ORT's own public API (`onnxruntime.quantization`); nothing is tuned beyond the
arguments named in the configurations below, so the rows are what a user of ORT would get.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_dynamic,
    quantize_static,
)

log = logging.getLogger(__name__)

# The configurations, as plain data (JSON-able, so the child process gets them in its spec and the
# report can print them). An empty dict means "call with ORT's defaults".
DEFAULT_CONFIG: dict[str, str | bool] = {}
BEST_METHODS = ("MinMax", "Entropy", "Percentile")


def best_config(method: str) -> dict[str, str | bool]:
    return {
        "quant_format": "QDQ",
        "per_channel": True,
        "activation_type": "QUInt8",
        "weight_type": "QInt8",
        "calibrate_method": method,
    }


DYNAMIC_CONFIG: dict[str, str | bool] = {"per_channel": True}

_ENUMS = {
    "quant_format": QuantFormat,
    "activation_type": QuantType,
    "weight_type": QuantType,
    "calibrate_method": CalibrationMethod,
}


def _kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """Turn the JSON config (enum member names) into keyword arguments for ORT."""
    return {k: (_ENUMS[k][v] if k in _ENUMS else v) for k, v in config.items()}


def static_defaults() -> dict[str, str]:
    """The defaults of `quantize_static` in the installed ORT, for the report."""
    sig = inspect.signature(quantize_static)
    names = ("quant_format", "per_channel", "reduce_range", "activation_type", "weight_type", "calibrate_method")
    return {n: str(sig.parameters[n].default) for n in names}


def with_stride(config: dict[str, Any], samples: int, stride: int = 32) -> dict[str, Any]:
    """`config` plus ORT's `CalibStridedMinMax` extra option: calibrate `stride` samples at a time and
    merge (ORT's documented way to bound calibration memory; despite its name it applies to every
    calibrate method). ORT needs the stride to divide the sample count."""
    stride = max(d for d in range(1, min(stride, samples) + 1) if samples % d == 0)
    return {**config, "extra_options": {"CalibStridedMinMax": stride}}


class NpzReader(CalibrationDataReader):
    """Feeds `calib.npz` (keys = input names, leading axis = samples) to ORT's calibrators in batches.

    `len()` and `set_range()` count samples (what ORT's `CalibStridedMinMax` loop uses).
    """

    def __init__(self, path: str | Path, batch_size: int = 8):
        with np.load(path, allow_pickle=False) as z:
            self.arrays = {k: z[k] for k in z.files}
        self.batch_size = batch_size
        self.set_range(0, len(self))

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def _batches(self, start: int, stop: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(start, stop, self.batch_size):
            yield {k: v[i : min(stop, i + self.batch_size)] for k, v in self.arrays.items()}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._it = self._batches(start_index, min(end_index, len(self)))

    def rewind(self) -> None:
        self.set_range(0, len(self))


def preprocess(src: Path, dst: Path) -> dict[str, Any]:
    """`quant_pre_process` with its default arguments (symbolic shape inference, ORT graph
    optimisation, ONNX shape inference), as ORT's quantization docs recommend before quantizing.

    Symbolic shape inference is an optional step (ORT's docs: "best suited for transformer
    models"); when it fails, the other two steps run alone (`skip_symbolic_shape=True`). When
    that fails too, the input is quantized as is. The result says which happened.
    """
    errors = []
    for skip_symbolic in (False, True):
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip_symbolic)
            return {"preprocessed": True, "skip_symbolic_shape": skip_symbolic, "preprocess_errors": errors}
        except Exception as e:  # noqa: BLE001 - any failure of ORT's tool is a result to report
            errors.append(f"{type(e).__name__}: {e}"[:300])
            log.warning("quant_pre_process(skip_symbolic_shape=%s) failed on %s: %s", skip_symbolic, src, e)
    dst.write_bytes(src.read_bytes())
    return {"preprocessed": False, "preprocess_errors": errors}


def quantize_static_file(src: Path, dst: Path, calib: Path, config: dict[str, Any],
                         batch_size: int = 8) -> dict[str, Any]:
    reader = NpzReader(calib, batch_size)
    log.info("quantize_static %s with %s on %d samples", src.name, config or "ORT defaults", len(reader))
    quantize_static(str(src), str(dst), reader, **_kwargs(config))
    return {"calibration_samples": len(reader), "reader_batch": batch_size}


def quantize_dynamic_file(src: Path, dst: Path, config: dict[str, Any]) -> dict[str, Any]:
    log.info("quantize_dynamic %s with %s", src.name, config)
    quantize_dynamic(str(src), str(dst), **_kwargs(config))
    return {}

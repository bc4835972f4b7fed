"""Per-tensor error attribution: where does the quantized model's output error come from?

For every quantized tensor it reports the tensor's own SQNR (its values versus
their fake-quantized values on real data) and the output KL/SQNR of the model
in which only that tensor is quantized. Sorting by the latter names the
tensors worth a finer scheme, another range method or keeping in float.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from qonnx.core.ir import Model
from qonnx.core.qtable import QuantTable, Role, TensorQuant
from qonnx.data.calibration import CalibrationSet
from qonnx.errors import PreconditionError
from qonnx.export.qdq import export_qdq
from qonnx.numerics.metrics import Fidelity
from qonnx.numerics.quant import fake_quantize, sqnr_db
from qonnx.runtime.ort import make_session, stream_tensors

log = logging.getLogger(__name__)


@dataclass
class TensorError:
    tensor: str
    role: str
    scheme: str
    tensor_sqnr_db: float
    output_kl: float
    output_sqnr_db: float
    top1_agreement: float | None

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _only(table: QuantTable, names: set[str]) -> QuantTable:
    kept = QuantTable()
    for name in names:
        kept.tensors[name] = copy.deepcopy(table.tensors[name])
        kept.tensors[name].tied_to = None  # parameters are already copied from the root
    return kept


def _parameters(name: str, entry: TensorQuant) -> tuple[np.ndarray, np.ndarray]:
    """The entry's scale and zero point: errors are attributed on a calibrated table only."""
    if entry.scale is None or entry.zero_point is None:
        raise PreconditionError(f"attribution needs a calibrated quant table: '{name}' has no parameters")
    return entry.scale, entry.zero_point


def _batches(data: CalibrationSet, batch_size: int) -> list[dict[str, np.ndarray]]:
    return list(data.batches(batch_size))


def attribute_errors(ir: Model, data: CalibrationSet, batch_size: int = 8, progress: bool = False
                     ) -> list[TensorError]:
    """Rank the calibrated quant table's tensors by the output error each causes alone."""
    from tqdm import tqdm

    feeds = _batches(data, batch_size)
    float_bytes = ir.to_bytes()
    reference = make_session(float_bytes)
    ref_outputs = [reference.run(None, f)[0] for f in feeds]
    table = ir.quant
    acts = [n for n, e in table.tensors.items() if e.role is Role.ACTIVATION]
    # Running signal and noise energy per tensor: memory stays bounded whatever the data size.
    energy = {n: np.zeros(2) for n in acts}
    for _, values in stream_tensors(ir.to_onnx(), acts, feeds):
        for n in acts:
            e = table.tensors[n]
            x = values[n].astype(np.float64)
            scale, zero_point = _parameters(n, e)
            error = x - fake_quantize(values[n], scale, zero_point, e.scheme)
            energy[n] += (float(np.sum(x * x)), float(np.sum(error * error)))
    tensors = ir.tensors()
    rows = []
    candidates = [n for n, e in table.tensors.items() if e.role is not Role.BIAS]
    for name in tqdm(candidates, desc="attributing", disable=not progress, leave=False):
        entry = table.tensors[name]
        if entry.role is Role.ACTIVATION:
            signal, noise = energy[name]
            t_sqnr = float("inf") if noise == 0 else 10 * np.log10(max(signal, 1e-300) / noise)
        else:
            w = ir.constant_value(tensors[name])
            assert w is not None  # plan quantizes constant weights only
            scale, zero_point = _parameters(name, entry)
            t_sqnr = sqnr_db(w, fake_quantize(w, scale, zero_point, entry.scheme))
        single = ir.copy()
        single.quant = _only(table, {name})
        session = make_session(export_qdq(single).SerializeToString(deterministic=True))
        fidelity = Fidelity()
        for feed, ref in zip(feeds, ref_outputs):
            fidelity.update(ref, session.run(None, feed)[0])
        stats = fidelity.as_dict()
        rows.append(TensorError(name, entry.role.value, entry.scheme.describe(), round(float(t_sqnr), 2),
                                float(stats.get("kl", float("nan"))), stats["sqnr_db"],
                                stats.get("top1_agreement")))
    rows.sort(key=lambda r: (-(r.output_kl if np.isfinite(r.output_kl) else -1), r.output_sqnr_db))
    return rows


def format_attribution(rows: list[TensorError], limit: int = 20) -> str:
    lines = [f"{'tensor':60s} {'role':10s} {'scheme':24s} {'own SQNR':>9s} {'out KL':>10s} {'out SQNR':>9s}"]
    for r in rows[:limit]:
        lines.append(f"{r.tensor[-60:]:60s} {r.role:10s} {r.scheme:24s} {r.tensor_sqnr_db:9.2f} "
                     f"{r.output_kl:10.3g} {r.output_sqnr_db:9.2f}")
    return "\n".join(lines)

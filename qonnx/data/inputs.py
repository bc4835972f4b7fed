"""The model's inputs as calibration data must match them, and the short messages that say when they do not.

`InputSpec` is one model input: its numpy dtype or, for an ONNX element type numpy has no dtype for
(bfloat16, the float8 types ...), `dtype=None` and the ONNX element type number in `onnx_type`.
`check_names` and `check_array` compare what the data declares (keys; dtype and shape, from an .npy header
or an array in hand) with the specs. Every refusal is one line under 300 characters: names, shapes and paths
are clipped and lists name the first few items and the count (`refuse`, `clip`, `name_list`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np

from qonnx.core.ir import Model
from qonnx.errors import InputError

MESSAGE_LIMIT = 299  # characters in one refusal
LISTED = 4  # names shown in a list before "... (N in all)"

# ONNX element types that numpy cannot represent (the IR keeps them as the ONNX number): names for messages.
ONNX_ONLY_TYPES = {16: "bfloat16", 17: "float8e4m3fn", 18: "float8e4m3fnuz", 19: "float8e5m2", 20: "float8e5m2fnuz",
                   21: "uint4", 22: "int4", 23: "float4e2m1", 24: "float8e8m0", 25: "uint2", 26: "int2"}


# ---------------------------------------------------------------- bounded one-line text
def clip(text: object, limit: int = 80) -> str:
    """`text` on one line (control characters escaped), at most `limit` characters (the middle cut out)."""
    flat = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(text))
    if len(flat) <= limit:
        return flat
    head = (limit - 1) // 2
    return flat[:head] + "…" + flat[len(flat) - (limit - 1 - head):]


def quoted(name: object) -> str:
    return f"'{clip(name, 32)}'"


def path_text(path: object) -> str:
    return clip(path, 80)


def error_text(error: BaseException) -> str:
    """An exception's message for a refusal: its first line, clipped."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return clip(text, 100)


def name_list(names: Iterable[object], limit: int = LISTED) -> str:
    """The first `limit` names quoted, then '... (N in all)' when there are more."""
    items = list(names)
    shown = ", ".join(quoted(n) for n in items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items)} in all)"


def shape_text(shape: Sequence[Any]) -> str:
    return clip("[" + ", ".join(str(d) for d in shape) + "]", 48)


def refuse(message: str) -> InputError:
    """The InputError for a refusal, held to one line under 300 characters."""
    return InputError(clip(message, MESSAGE_LIMIT))


# ---------------------------------------------------------------- the model's inputs
@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype | None  # None: an ONNX element type numpy has no dtype for (see onnx_type)
    shape: tuple[Any, ...]  # ints for static dims, str/None for dynamic ones; () when unknown
    onnx_type: int | None = None  # the ONNX element type number when dtype is None (16 = bfloat16)

    @property
    def type_name(self) -> str:
        if self.dtype is not None:
            return str(self.dtype)
        return ONNX_ONLY_TYPES.get(self.onnx_type or 0, f"ONNX element type {self.onnx_type}")

    @property
    def static_sample(self) -> bool:
        """Every dim of one sample (all axes but the first) is a known size."""
        return bool(self.shape) and all(isinstance(d, int) and d > 0 for d in self.shape[1:])

    @classmethod
    def of_model(cls, model: Model) -> list[InputSpec]:
        specs = []
        for t in model.inputs:
            dtype = Model.dtype_of(t)
            shape = tuple(t.shape) if t.shape is not None else ()
            raw = getattr(t, "dtype", None)  # the IR keeps the ONNX number for types numpy lacks
            if dtype is None and isinstance(raw, (int, np.integer)) and not isinstance(raw, bool) and raw > 0:
                specs.append(cls(t.name, None, shape, int(raw)))
            else:
                specs.append(cls(t.name, dtype if dtype is not None else np.dtype(np.float32), shape))
        return specs


def check_names(origin: str, keys: Iterable[str], specs: list[InputSpec]) -> None:
    """The data's keys must be exactly the model's input names."""
    names = {s.name for s in specs}
    keys = set(keys)
    missing, unknown = sorted(names - keys), sorted(keys - names)
    if not (missing or unknown):
        return
    parts = []
    if missing:
        parts.append(f"lacks model input(s) {name_list(missing)}")
    if unknown:
        parts.append(f"has unknown input(s) {name_list(unknown)}")
    raise refuse(f"{origin} {' and '.join(parts)} (model inputs: {name_list(sorted(names))})")


def check_array(spec: InputSpec, origin: str, dtype: np.dtype, shape: Sequence[int], *, per_sample: bool = False,
                max_row_bytes: int | None = None) -> None:
    """An array's dtype and shape against the model input `spec`.

    `shape` has the sample axis first, or is one sample's shape when `per_sample` (a file of a sample folder).
    With `max_row_bytes`, one sample may not exceed it unless the model fixes every dim of a sample.
    """
    full: tuple[Any, ...] = (None, *shape) if per_sample else tuple(shape)
    shown = f"{shape_text(shape)} per sample" if per_sample else shape_text(shape)
    what = f"{origin}: input {quoted(spec.name)}"
    if spec.dtype is None:
        raise refuse(f"{what} is {spec.type_name} in the model and {clip(dtype, 24)} in the data: numpy has no "
                     f"{spec.type_name}, so qonnx cannot feed it to ONNX Runtime (give the model a float32 or "
                     "float16 input)")
    if dtype != spec.dtype:
        raise refuse(f"{what} has dtype {clip(dtype, 24)}, the model expects {spec.dtype}")
    if spec.shape and len(full) != len(spec.shape):
        raise refuse(f"{what} has shape {shown} (rank {len(shape)}); the model expects rank "
                     f"{len(spec.shape)} {shape_text(spec.shape)}, samples on the first axis")
    for axis, (got, want) in enumerate(zip(full, spec.shape)):
        if axis > 0 and isinstance(want, int) and want > 0 and got != want:
            raise refuse(f"{what} has shape {shown}; the model expects {shape_text(spec.shape)} "
                         f"(axis {axis} differs)")
    if max_row_bytes is not None and not spec.static_sample:
        row_bytes = math.prod(int(d) for d in full[1:]) * dtype.itemsize
        if row_bytes > max_row_bytes:
            raise refuse(f"{what}: one sample of shape {shape_text(full[1:])} is {row_bytes:,} bytes, over the "
                         f"limit of {max_row_bytes:,} for inputs with dynamic dims")

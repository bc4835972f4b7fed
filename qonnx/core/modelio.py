"""Model files on disk: safe reading (external data confined to the model's folder, every tensor's bytes
checked against its dims) and atomic writing."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

from qonnx.errors import InputError

# Bits per element of each ONNX element type whose data is a fixed-size bit pattern (sub-byte types are
# packed: 4-bit two per byte, 2-bit four). Types not listed (STRING, UNDEFINED, ...) are not size-checked.
_ELEMENT_BITS: dict[int, int] = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("FLOAT", 32), ("UINT8", 8), ("INT8", 8), ("UINT16", 16), ("INT16", 16), ("INT32", 32), ("INT64", 64),
        ("BOOL", 8), ("FLOAT16", 16), ("DOUBLE", 64), ("UINT32", 32), ("UINT64", 64), ("COMPLEX64", 64),
        ("COMPLEX128", 128), ("BFLOAT16", 16), ("FLOAT8E4M3FN", 8), ("FLOAT8E4M3FNUZ", 8), ("FLOAT8E5M2", 8),
        ("FLOAT8E5M2FNUZ", 8), ("FLOAT8E8M0", 8), ("UINT4", 4), ("INT4", 4), ("FLOAT4E2M1", 4), ("UINT2", 2),
        ("INT2", 2),
    )
    if hasattr(TensorProto, name)
}
# Values per element in the typed field an element type uses (complex: real and imaginary parts); the
# sub-byte types pack several elements into one int32_data entry (handled by _typed_count).
_TYPED_FIELD: dict[int, str] = {
    getattr(TensorProto, name): field
    for field, names in (
        ("float_data", ("FLOAT", "COMPLEX64")),
        ("int32_data", ("INT32", "INT16", "INT8", "UINT16", "UINT8", "BOOL", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN",
                        "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "UINT4", "INT4", "FLOAT4E2M1",
                        "UINT2", "INT2")),
        ("int64_data", ("INT64",)),
        ("double_data", ("DOUBLE", "COMPLEX128")),
        ("uint64_data", ("UINT32", "UINT64")),
    )
    for name in names
    if hasattr(TensorProto, name)
}
_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")


def one_line(text: object, limit: int = 120) -> str:
    """`text` on one line of at most `limit` characters (messages from onnx can span lines or run long)."""
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _all_tensors(proto: onnx.ModelProto) -> Iterable[TensorProto]:
    """Every TensorProto of the model: initializers and node attributes, subgraphs and functions included."""
    return external_data_helper._get_all_tensors(proto)


def _elements(tensor: TensorProto) -> int | None:
    """prod(dims), or None when a dim is negative (itself a refusal, reported by the caller)."""
    if any(d < 0 for d in tensor.dims):
        return None
    return math.prod(tensor.dims)


def expected_bytes(tensor: TensorProto) -> int | None:
    """The byte length `raw_data` (or external data) must have for the tensor's dims and type; None when the
    type has no fixed size (strings) or is unknown."""
    bits = _ELEMENT_BITS.get(tensor.data_type)
    n = _elements(tensor)
    if bits is None or n is None:
        return None
    return (n * bits + 7) // 8


def _typed_count(tensor: TensorProto, n: int) -> int | None:
    field = _TYPED_FIELD.get(tensor.data_type)
    if field is None:
        return None
    bits = _ELEMENT_BITS[tensor.data_type]
    if bits < 8:  # packed into int32_data, one byte each
        return (n * bits + 7) // 8
    return 2 * n if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128) else n


def _tensor_label(tensor: TensorProto) -> str:
    return f"tensor '{one_line(tensor.name, 80)}'"


def check_tensor_sizes(proto: onnx.ModelProto) -> None:
    """Refuse any tensor whose data does not have exactly the length its dims and element type call for.

    Inline data only: external data is checked against its declared length before it is read (in
    `read_model_proto`), and after reading it is inline. A short or long buffer would otherwise be
    reinterpreted by numpy later (a reshape error deep in a pass, or silently wrong weights).
    """
    for tensor in _all_tensors(proto):
        if tensor.data_location == TensorProto.EXTERNAL:
            continue
        label = _tensor_label(tensor)
        n = _elements(tensor)
        if n is None:
            raise InputError(f"{label} has a negative dimension {list(tensor.dims)[:8]}")
        if tensor.HasField("raw_data"):
            want = expected_bytes(tensor)
            got = len(tensor.raw_data)
            if want is not None and got != want:
                raise InputError(f"{label} holds {got} bytes of data but its dims {one_line(list(tensor.dims), 60)} "
                                 f"and type need {want}")
            continue
        fields = [f for f in _TYPED_FIELDS if len(getattr(tensor, f))]
        if not fields:
            if n and tensor.data_type != TensorProto.STRING:
                raise InputError(f"{label} has dims {one_line(list(tensor.dims), 60)} but no data")
            continue
        want_count = _typed_count(tensor, n) if fields == [_TYPED_FIELD.get(tensor.data_type)] else None
        got_count = len(getattr(tensor, fields[0]))
        if tensor.data_type == TensorProto.STRING and fields == ["string_data"]:
            want_count = n
        if want_count is not None and got_count != want_count:
            raise InputError(f"{label} holds {got_count} values but its dims {one_line(list(tensor.dims), 60)} "
                             f"need {want_count}")


def _external_targets(proto: onnx.ModelProto, model_dir: Path) -> list[tuple[TensorProto, Path]]:
    """Each external-data tensor with the resolved file it reads, refusing anything unsafe or inconsistent:
    a path leaving the model's folder (absolute, `..`, symlinks), a NUL byte, a missing or non-regular file,
    a hard-linked file, a declared length or offset that disagrees with the tensor or the file."""
    root = model_dir.resolve()
    found = []
    for tensor in _all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        label = _tensor_label(tensor)
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        shown = one_line(repr(location), 80)
        if not location or "\x00" in location:
            raise InputError(f"refusing external data location {shown} of {label}: empty or contains a NUL byte")
        try:
            target = (root / location).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: a symlink loop on older Pythons
            raise InputError(f"refusing external data location {shown} of {label}: {one_line(e, 80)}") from e
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise InputError(f"refusing external data path {shown} of {label}: it leaves the model's folder")
        try:
            stat = target.stat()
        except OSError:
            raise InputError(f"external data file {shown} of {label} is missing") from None
        if not target.is_file():
            raise InputError(f"external data file {shown} of {label} is not a regular file")
        if stat.st_nlink > 1:
            raise InputError(f"refusing external data file {shown} of {label}: it is a hard link "
                             f"({stat.st_nlink} names for one file)")
        try:
            offset = int(info.get("offset", "0"))
            length = int(info["length"]) if "length" in info else None
        except ValueError:
            raise InputError(f"external data of {label} has a non-integer offset or length") from None
        if offset < 0 or (length is not None and length < 0):
            raise InputError(f"external data of {label} has a negative offset or length")
        available = stat.st_size - offset
        if available < 0 or (length is not None and length > available):
            raise InputError(f"external data of {label} reaches past the end of {shown} "
                             f"(offset {offset}, length {length}, file size {stat.st_size})")
        want = expected_bytes(tensor)
        got = length if length is not None else available
        if want is not None and got != want:
            source = "declares" if length is not None else "has"
            raise InputError(f"external data of {label} {source} {got} bytes but its dims "
                             f"{one_line(list(tensor.dims), 60)} and type need {want}")
        found.append((tensor, target))
    return found


def _parse(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise InputError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise InputError(f"model path '{path}' is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except OSError as e:
        raise InputError(f"cannot read '{path}': {e.strerror or one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - DecodeError, ValueError, RuntimeError ...: one line, no traceback
        raise InputError(f"'{path}' is not a readable ONNX model (truncated or not ONNX): {one_line(e)}") from e
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"'{path}' is not an ONNX model with a graph (empty, truncated or another format)")
    return proto


def external_data_files(model_path: str | os.PathLike[str]) -> list[Path]:
    """The resolved paths of the external-data files the model file reads, each once, in order of first use.

    The same checks as `read_model_proto` apply (an unsafe or inconsistent reference raises InputError);
    no tensor data is read. The CLI uses it to refuse outputs that would overwrite an input.
    """
    path = Path(model_path)
    files: dict[Path, None] = {}
    for _tensor, target in _external_targets(_parse(path), path.parent):
        files.setdefault(target, None)
    return list(files)


def read_model_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file, refusing unsafe external data and tensors whose bytes disagree with their dims;
    raises InputError with a one-line message."""
    path = Path(path)
    proto = _parse(path)
    _external_targets(proto, path.parent)
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except Exception as e:  # noqa: BLE001 - onnx raises ValidationError, ValueError, OSError, ...: all one line
        raise InputError(f"could not read the external data of '{path}': {one_line(e)}") from e
    check_tensor_sizes(proto)
    return proto


# -------------------------------------------------------------------- preparing a proto for import
def reparse(proto: onnx.ModelProto) -> onnx.ModelProto:
    """An independent copy of a proto, through its serialization."""
    fresh = onnx.ModelProto()
    fresh.ParseFromString(proto.SerializeToString())
    return fresh


def min_ir_version(opset: int) -> int:
    """The IR version a model of this default-domain opset needs at least."""
    # From onnx/helper.py VERSION_TABLE: the IR version that introduced each opset.
    if opset >= 23:
        return 11
    if opset >= 21:
        return 10
    if opset >= 19:
        return 9
    if opset >= 15:
        return 8
    return 7


def lift_constant_nodes(proto: onnx.ModelProto) -> int:
    """Turn top-level `Constant` nodes into initializers (PP-OCR keeps every weight that way)."""
    keep, lifted = [], 0
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = numpy_helper.to_array(attr.t)
            elif attr.name in ("value_float", "value_int"):
                value = np.array(attr.f if attr.name == "value_float" else attr.i,
                                 dtype=np.float32 if attr.name == "value_float" else np.int64)
            elif attr.name in ("value_floats", "value_ints"):
                value = np.array(list(attr.floats if attr.name == "value_floats" else attr.ints),
                                 dtype=np.float32 if attr.name == "value_floats" else np.int64)
            if value is not None:
                proto.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                lifted += 1
                continue
        keep.append(node)
    if lifted:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return lifted


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes stable, unique names: the quant table and reports refer to them."""
    all_names = {n.name for n in graph.node if n.name}
    seen: set[str] = set()
    for index, node in enumerate(graph.node):
        if not node.name or node.name in seen:
            name = f"{node.op_type}_{index}"
            while name in all_names or name in seen:
                name += "_"
            node.name = name
        seen.add(node.name)


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half a file.

    The temporary file is removed on any exception, KeyboardInterrupt and SystemExit (a SIGTERM handler)
    included; those are re-raised as they are, OSError becomes InputError.
    """
    path = Path(path)
    if path.is_dir():
        raise InputError(f"output path '{path}' is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory '{parent}' does not exist")
    tmp = parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise InputError(f"cannot write '{path}': {e.strerror or e}") from e
        raise


def save_model(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Serialize deterministically and write atomically; returns the byte size."""
    data = proto.SerializeToString(deterministic=True)
    if len(data) >= 2**31:
        raise InputError("models over 2 GiB need external data, which qonnx does not write yet")
    write_bytes_atomic(data, path)
    return len(data)

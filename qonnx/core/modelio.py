"""Model files on disk: safe reading (external data confined to the model's folder) and atomic writing."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from qonnx.errors import InputError


def _check_external_data(proto: onnx.ModelProto, model_dir: Path) -> None:
    root = model_dir.resolve()
    for tensor in external_data_helper._get_all_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or (target != root and root not in target.parents):
            raise InputError(
                f"refusing external data path '{location}' of tensor '{tensor.name}': it leaves the model's folder"
            )
        if not target.is_file():
            raise InputError(f"external data file '{location}' of tensor '{tensor.name}' is missing")


def read_model_proto(path: str | os.PathLike[str]) -> onnx.ModelProto:
    """Parse an ONNX file, refusing unsafe external data; raises InputError with a clear message."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"model file '{path}' does not exist")
    if not path.is_file():
        raise InputError(f"model path '{path}' is not a file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(f"'{path}' is not a readable ONNX model (truncated or not ONNX): {e}") from e
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InputError(f"'{path}' is not an ONNX model with a graph (empty, truncated or another format)")
    _check_external_data(proto, path.parent)
    try:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as e:
        raise InputError(f"could not read the external data of '{path}': {e}") from e
    return proto


def write_bytes_atomic(data: bytes, path: str | os.PathLike[str]) -> None:
    """Write a file via a temporary sibling and rename, so readers never see half a file."""
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
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write '{path}': {e.strerror or e}") from e


def save_model(proto: onnx.ModelProto, path: str | os.PathLike[str]) -> int:
    """Serialize deterministically and write atomically; returns the byte size."""
    data = proto.SerializeToString(deterministic=True)
    if len(data) >= 2**31:
        raise InputError("models over 2 GiB need external data, which qonnx does not write yet")
    write_bytes_atomic(data, path)
    return len(data)

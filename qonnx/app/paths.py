"""What a run reads and writes, and the one rule between them: qonnx never writes over a file it reads.

Every path qonnx writes (the output model, a report, the reproducer folder) is checked before any work starts
against every file it reads (the model, each of its external-data files, the calibration data: the file, or the
folder and each file in it). A write may not be such a file, resolve to it (symlinks, `..`) or be a hard link
to it (same device and inode). Writes may not name each other either, and a file write may not name a folder.

Only existing paths can collide, so when no write target exists yet (the usual case) the reads are not listed
at all and the model is not parsed here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from qonnx.core.modelio import external_data_files
from qonnx.errors import InputError

_SHOWN = 80  # characters of a path shown in a message (the tail: the file name matters most)


class Read(NamedTuple):
    """A file (or folder) a run reads: its resolved path, what it is, and its (st_dev, st_ino)."""

    path: Path
    what: str
    key: tuple[int, int] | None


class Target(NamedTuple):
    """A path a run writes: a file, or a folder whose files it writes (the reproducer)."""

    path: Path
    label: str
    folder: bool = False


def shown(path: str | os.PathLike[str]) -> str:
    text = str(path)
    return text if len(text) <= _SHOWN else "..." + text[-(_SHOWN - 3):]


def _key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolve(path: str | os.PathLike[str], label: str = "path") -> Path:
    try:
        return Path(os.path.abspath(path)).resolve()
    except (OSError, ValueError, RuntimeError) as e:  # NUL bytes, symlink loops
        raise InputError(f"{label} '{shown(path)}' is not a usable path: {e}") from e


def _read(path: Path, what: str) -> Read | None:
    try:
        resolved = _resolve(path)
    except InputError:
        return None  # the reader itself refuses such a path, in its own words
    return Read(resolved, what, _key(resolved))


def run_reads(model: Any, calibration: Any = None) -> list[Read]:
    """The files a run reads: the model file and its external data, the calibration file or folder and its files.

    Models and calibration data given as objects (protos, arrays, iterables) read no file and add nothing.
    A model whose external data is unsafe is refused here as its load would refuse it (InputError).
    """
    reads: list[Read | None] = []
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        path = Path(model)
        reads.append(_read(path, "the input model"))
        reads.extend(_read(f, f"the external data file '{shown(f.name)}' of the input model")
                     for f in external_data_files(path))
    if isinstance(calibration, (str, os.PathLike)):
        path = Path(calibration)
        if path.is_dir():
            reads.append(_read(path, "the calibration folder"))
            try:
                files = sorted(f for f in path.iterdir() if f.is_file())
            except OSError:
                files = []  # an unreadable folder is refused by the calibration reader
            reads.extend(_read(f, f"the calibration file '{shown(f.name)}'") for f in files)
        elif path.exists():
            reads.append(_read(path, "the calibration data"))
    return [r for r in reads if r is not None]


def check_outputs(reads: Sequence[Read], writes: Sequence[Target]) -> None:
    """Refuse (InputError, one line) any write that is, resolves to or hard-links to a read, or names another write."""
    resolved = [(t, _resolve(t.path, t.label)) for t in writes]
    for i, (target, path) in enumerate(resolved):
        for other, other_path in resolved[:i]:
            if path == other_path:
                raise InputError(f"{target.label} '{shown(target.path)}' is also the {other.label}: "
                                 "choose another path")
    by_path = {r.path: r for r in reads}
    by_key = {r.key: r for r in reads if r.key is not None}
    for target, path in resolved:
        verb = "is" if Path(os.path.abspath(target.path)) == path else "resolves to"
        read = by_path.get(path)
        if read is not None:
            raise InputError(f"{target.label} '{shown(target.path)}' {verb} {read.what}: choose another path "
                             "(qonnx never writes over a file it reads)")
        key = _key(path)
        read = by_key.get(key) if key is not None else None
        if read is not None:
            raise InputError(f"{target.label} '{shown(target.path)}' is a hard link to {read.what} "
                             f"('{shown(read.path)}'): choose another path")
        if target.folder:
            _check_folder(target, path, reads, by_key)
        else:
            _check_file_target(target, path)


def _check_folder(target: Target, path: Path, reads: Sequence[Read], by_key: dict[tuple[int, int], Read]) -> None:
    inside = next((r for r in reads if path in r.path.parents), None)
    if inside is None and path.is_dir():
        try:
            keys = [_key(f) for f in path.iterdir()]
        except OSError:
            keys = []  # an unreadable folder holds nothing qonnx could overwrite either
        inside = next((by_key[k] for k in keys if k is not None and k in by_key), None)
    if inside is not None:
        raise InputError(f"{target.label} '{shown(target.path)}' holds {inside.what} ('{shown(inside.path)}'), "
                         "which a failure would overwrite: choose another output path")


def _check_file_target(target: Target, path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{target.label} '{shown(target.path)}' is a folder: give the path of a file")
    parent = Path(target.path).parent if str(Path(target.path).parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(f"{target.label} directory '{shown(parent)}' is not a directory")
    if not parent.exists():
        raise InputError(f"{target.label} directory '{shown(parent)}' does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(f"{target.label} directory '{shown(parent)}' is not writable")


def check_run(model: Any, calibration: Any, writes: Sequence[Target]) -> None:
    """`check_outputs` for a run on `model` and `calibration`; lists the reads only when some write exists."""
    exists = any(os.path.lexists(t.path) for t in writes)
    check_outputs(run_reads(model, calibration) if exists else [], writes)

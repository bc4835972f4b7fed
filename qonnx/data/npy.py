""".npy arrays from files and zip archives (.npz), read without trusting them.

- Only regular files are read: a FIFO, device or socket is refused in one line (reading one can block forever
  or never end). `open_regular` opens without blocking and checks the opened file itself.
- An archive's member list and each array's .npy header are compared with the model's inputs before any row
  is read: names, dtype, the shape of one sample, and the size the header declares against the member's.
  One sample may hold at most MAX_ROW_BYTES (256 MiB) when the model leaves some of its dims dynamic; with
  static dims the shape check bounds it already.
- Rows are read in chunks of at most READ_CHUNK bytes (16 MiB) straight into the batch's array.
- A damaged archive (bad CRC, truncated, a member that is not .npy, a broken header) is one InputError line.
Nothing is ever unpickled.
"""

from __future__ import annotations

import math
import os
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Callable, Iterator

import numpy as np

from qonnx.data.inputs import (
    InputSpec,
    check_array,
    check_names,
    error_text,
    name_list,
    path_text,
    quoted,
    refuse,
)
from qonnx.errors import InputError

MAX_ROW_BYTES = 256 << 20  # one sample of an input with dynamic dims, read from a file
READ_CHUNK = 1 << 24  # bytes asked of an archive member at once

# What reading a damaged archive or .npy file raises (the caller turns it into one line).
ARCHIVE_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, struct.error, EOFError, OSError, ValueError,
                  RuntimeError, NotImplementedError, OverflowError)

_KINDS = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


# ---------------------------------------------------------------- regular files only
def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular(what: str, mode: int) -> InputError:
    return refuse(f"{what} is not a regular file ({_kind(mode)}): calibration data is an .npz archive or a folder "
                  "of regular .npy/.npz files")


def open_regular(path: Path, what: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file (never blocks on a FIFO); `what` names it in errors."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except (OSError, ValueError) as e:
        raise refuse(f"cannot open {what}: {error_text(e)}") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(what, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def is_zip_archive(path: Path, what: str) -> bool:
    with open_regular(path, what) as f:
        return zipfile.is_zipfile(f)


def regular_files(folder: Path, accept: Callable[[str], bool]) -> list[Path]:
    """The files of `folder` whose names `accept` takes, sorted; refuses if one is not a regular file."""
    try:
        with os.scandir(folder) as entries:
            chosen = [(e.name, e.is_file()) for e in entries if accept(e.name)]
    except OSError as e:
        raise refuse(f"cannot list '{path_text(folder)}': {error_text(e)}") from e
    bad = sorted(name for name, regular in chosen if not regular)
    if bad:
        try:
            kind = _kind(os.stat(folder / bad[0]).st_mode)
        except OSError:
            kind = "a broken link"
        more = f"; {len(bad)} such files" if len(bad) > 1 else ""
        raise refuse(f"'{path_text(folder)}': {quoted(bad[0])} is not a regular file ({kind}{more}): a sample "
                     "folder holds regular files only")
    return sorted(folder / name for name, _ in chosen)


# ---------------------------------------------------------------- .npy headers
@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # bytes before the data

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(f: IO[bytes], where: str) -> NpyHeader:
    """The .npy header at the start of `f` (never its data; never unpickles). `where` names the array."""
    try:
        version = np.lib.format.read_magic(f)
        shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                 else np.lib.format.read_array_header_2_0(f))
        offset = f.tell()
    except ValueError as e:
        raise refuse(f"{where} is not a valid .npy array: {error_text(e)}") from e
    except ARCHIVE_ERRORS as e:
        raise refuse(f"{where} cannot be read: {error_text(e)}") from e
    if dtype.hasobject:
        raise refuse(f"{where} holds pickled Python objects; qonnx never unpickles calibration data "
                     "(save plain numeric arrays)")
    if any(d < 0 for d in shape):
        raise refuse(f"{where} is not a valid .npy array: negative dimension in its shape")
    return NpyHeader(tuple(shape), dtype, bool(fortran), offset)


def check_size(header: NpyHeader, available: int, where: str) -> None:
    if header.offset + header.nbytes > available:
        raise refuse(f"{where} is truncated: its header declares {header.nbytes:,} bytes of data, the file holds "
                     f"{max(available - header.offset, 0):,}")


def _npy_members(archive: zipfile.ZipFile, where: str) -> dict[str, zipfile.ZipInfo]:
    infos = archive.infolist()
    other = [i.filename for i in infos if not i.filename.endswith(".npy")]
    if other:
        raise refuse(f"{where}: member {name_list(other, 1)} is not a .npy array (an .npz holds only .npy members)")
    return {i.filename[:-4]: i for i in infos}


# ---------------------------------------------------------------- .npz archives
class _NpyMember:
    """Sequential row reader for one array stored in a zip archive (header checked on opening; no full load)."""

    def __init__(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, origin: str, spec: InputSpec | None):
        self.archive, self.info, self.origin = archive, info, origin
        self.key = info.filename[:-4]
        where = f"{origin}: array {quoted(info.filename)}"
        try:
            with archive.open(info) as f:
                self.header = read_header(f, where)
        except ARCHIVE_ERRORS as e:
            raise refuse(f"{where} cannot be read: {error_text(e)}") from e
        self.shape, self.dtype = self.header.shape, self.header.dtype
        if not self.shape:
            raise refuse(f"{where} is a scalar; a leading sample axis is needed")
        if self.header.fortran and len(self.shape) > 1:
            raise refuse(f"{where} is Fortran-ordered; save it C-contiguous")
        if spec is not None:
            check_array(spec, origin, self.dtype, self.shape, max_row_bytes=MAX_ROW_BYTES)
        check_size(self.header, info.file_size, where)

    def rows(self, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
        row_shape = self.shape[1:]
        row_bytes = math.prod(row_shape) * self.dtype.itemsize
        try:
            with self.archive.open(self.info) as f:
                _skip(f, self.header.offset + start * row_bytes)
                for pos in range(start, stop, batch):
                    out = np.empty((min(batch, stop - pos), *row_shape), self.dtype)
                    if not _fill(f, out):
                        raise refuse(f"{self.origin}: array {quoted(self.key)} is truncated")
                    yield out
        except ARCHIVE_ERRORS as e:
            raise refuse(f"{self.origin}: array {quoted(self.key)} cannot be read: {error_text(e)}") from e


def _skip(f: IO[bytes], count: int) -> None:
    while count > 0:
        chunk = f.read(min(count, READ_CHUNK))
        if not chunk:
            return
        count -= len(chunk)


def _fill(f: IO[bytes], out: np.ndarray) -> bool:
    """Reads out.nbytes bytes into `out` in bounded chunks; False if the stream ends first."""
    if out.nbytes == 0:
        return True
    view = out.reshape(-1).view(np.uint8)
    filled = 0
    while filled < out.nbytes:
        chunk = f.read(min(READ_CHUNK, out.nbytes - filled))
        if not chunk:
            return False
        view[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        filled += len(chunk)
    return True


class NpzSource:
    """An .npz whose keys are input names and whose leading axis is the sample; with `specs`, checked against
    the model from its headers on opening."""

    def __init__(self, path: str | Path, specs: list[InputSpec] | None = None):
        self.path = Path(path)
        origin = self.origin = path_text(self.path)
        self.file = open_regular(self.path, f"calibration data '{origin}'")
        try:
            self.archive = zipfile.ZipFile(self.file)
            infos = _npy_members(self.archive, f"'{origin}'")
        except ARCHIVE_ERRORS as e:
            self.file.close()
            raise refuse(f"'{origin}' is not a readable .npz archive: {error_text(e)}") from e
        if not infos:
            raise refuse(f"'{origin}' holds no arrays")
        by_name = {s.name: s for s in specs or []}
        if specs is not None:
            check_names(origin, infos, specs)
        self.members = {k: _NpyMember(self.archive, info, origin, by_name.get(k)) for k, info in infos.items()}
        counts = {k: m.shape[0] for k, m in self.members.items()}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"{quoted(k)}: {n}" for k, n in list(counts.items())[:3])
            more = f", ... ({len(counts)} arrays)" if len(counts) > 3 else ""
            raise refuse(f"'{origin}': arrays disagree on the number of samples (leading axis): {listed}{more}")
        self.count = next(iter(counts.values()))

    def __len__(self) -> int:
        return self.count

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        streams = {k: m.rows(start, stop, batch_size) for k, m in self.members.items()}
        while True:
            feed = {}
            for k, s in streams.items():
                row = next(s, None)
                if row is None:
                    return
                feed[k] = row
            yield feed


# ---------------------------------------------------------------- one sample per file (folders)
def load_sample(path: Path, specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """One sample from an .npy (the first input's) or an .npz (keyed by input name), headers checked first."""
    where = f"'{path_text(path)}'"
    with open_regular(path, where) as f:
        try:
            if path.suffix == ".npy":
                header = read_header(f, where)
                check_array(specs[0], where, header.dtype, header.shape, per_sample=True,
                            max_row_bytes=MAX_ROW_BYTES)
                check_size(header, os.fstat(f.fileno()).st_size, where)
                f.seek(0)
                return {specs[0].name: np.load(f, allow_pickle=False)}
            with zipfile.ZipFile(f) as archive:
                infos = _npy_members(archive, where)
                check_names(where, infos, specs)
                for spec in specs:
                    with archive.open(infos[spec.name]) as member:
                        header = read_header(member, f"{where}: array {quoted(spec.name)}")
                    check_array(spec, where, header.dtype, header.shape, per_sample=True,
                                max_row_bytes=MAX_ROW_BYTES)
                    check_size(header, infos[spec.name].file_size, f"{where}: array {quoted(spec.name)}")
            f.seek(0)
            with np.load(f, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ARCHIVE_ERRORS as e:
            raise refuse(f"{where} is not a readable numpy file: {error_text(e)}") from e

"""Calibration data: readers that stream samples in batches, validated against the model.

Sources: an `.npz` (keys = input names, leading axis = samples, read row by row
from the archive so memory does not grow with its size), a folder of per-sample
`.npy`/`.npz` files, an image folder with a preprocessing spec, or any Python
iterable of feed dicts (an ORT CalibrationDataReader works too). Nothing is ever
unpickled.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, cast

import numpy as np

from qonnx.core.ir import Model
from qonnx.data.images import ImageFolderSource, is_image_folder
from qonnx.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[Any, ...]  # ints for static dims, str/None for dynamic ones

    @classmethod
    def of_model(cls, model: Model) -> list[InputSpec]:
        specs = []
        for t in model.inputs:
            dtype = Model.dtype_of(t)
            specs.append(cls(t.name, np.dtype(dtype) if dtype is not None else np.dtype(np.float32),
                             tuple(t.shape) if t.shape is not None else ()))
        return specs


class SampleSource(Protocol):
    """Yields batches (dicts of arrays with a leading sample axis) for samples [start, stop)."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...


# ---------------------------------------------------------------- .npz archives
class _NpyMember:
    """Sequential row reader for one array stored in a zip archive (no full load, no pickle)."""

    def __init__(self, archive: zipfile.ZipFile, member: str, origin: str):
        self.archive, self.member, self.origin = archive, member, origin
        with archive.open(member) as f:
            self.shape, self.dtype, self.fortran = self._header(f)

    def _header(self, f) -> tuple[tuple[int, ...], np.dtype, bool]:
        try:
            version = np.lib.format.read_magic(f)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
            raise InputError(f"{self.origin}: '{self.member}' is not a valid .npy array: {e}") from e
        if dtype.hasobject:
            raise InputError(f"{self.origin}: array '{self.member}' holds pickled Python objects; "
                             "qonnx never unpickles calibration data (save plain numeric arrays)")
        if not shape:
            raise InputError(f"{self.origin}: array '{self.member}' is a scalar; a leading sample axis is needed")
        return shape, dtype, fortran

    def rows(self, start: int, stop: int, batch: int) -> Iterator[np.ndarray]:
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        if self.fortran and len(self.shape) > 1:
            raise InputError(f"{self.origin}: array '{self.member}' is Fortran-ordered; save it C-contiguous")
        with self.archive.open(self.member) as f:
            self._header(f)
            skip = start * row_bytes
            while skip > 0:
                chunk = f.read(min(skip, 1 << 24))
                if not chunk:
                    break
                skip -= len(chunk)
            pos = start
            while pos < stop:
                n = min(batch, stop - pos)
                data = f.read(n * row_bytes)
                if len(data) != n * row_bytes:
                    raise InputError(f"{self.origin}: array '{self.member}' is truncated")
                yield np.frombuffer(data, dtype=self.dtype).reshape((n, *row_shape))
                pos += n


class NpzSource:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.archive = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise InputError(f"'{path}' is not a readable .npz archive: {e}") from e
        self.members = {}
        for info in self.archive.infolist():
            if info.filename.endswith(".npy"):
                self.members[info.filename[:-4]] = _NpyMember(self.archive, info.filename, str(self.path))
        if not self.members:
            raise InputError(f"'{path}' holds no arrays")
        counts = {k: m.shape[0] for k, m in self.members.items()}
        if len(set(counts.values())) > 1:
            raise InputError(f"'{path}': arrays disagree on the number of samples (leading axis): {counts}")
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


# ---------------------------------------------------------------- folders
class FolderSource:
    """One `.npy` (single-input models) or `.npz` file per sample, in sorted order."""

    def __init__(self, path: str | Path, input_names: list[str]):
        self.path = Path(path)
        self.files = sorted(p for p in self.path.iterdir() if p.suffix in (".npy", ".npz"))
        self.input_names = input_names
        if any(p.suffix == ".npy" for p in self.files) and len(input_names) != 1:
            raise InputError(f"'{path}': .npy samples only work for single-input models; "
                             f"this model has inputs {', '.join(input_names)}: use one .npz per sample")

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, file: Path) -> dict[str, np.ndarray]:
        try:
            if file.suffix == ".npy":
                return {self.input_names[0]: np.load(file, allow_pickle=False)}
            with np.load(file, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise InputError(f"'{file}' holds pickled Python objects; qonnx never unpickles calibration data") from e
            raise InputError(f"'{file}' is not a readable numpy file: {e}") from e
        except (OSError, zipfile.BadZipFile) as e:
            raise InputError(f"'{file}' is not a readable numpy file: {e}") from e

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(start, stop, batch_size):
            files = self.files[i:min(stop, i + batch_size)]
            samples = [self._load(f) for f in files]
            batch = {}
            for key in samples[0]:
                if not all(key in s for s in samples):
                    raise InputError(f"'{self.path}': not every sample file has the array '{key}'")
                shapes = {s[key].shape for s in samples}
                if len(shapes) > 1:
                    raise InputError(f"'{self.path}': samples of '{key}' have different shapes "
                                     f"{sorted(shapes)} (files {files[0].name}..{files[-1].name})")
                batch[key] = np.stack([s[key] for s in samples])
            yield batch


# ---------------------------------------------------------------- iterables
class IterableSource:
    """Feed dicts (each a batch) from a Python iterable or an ORT CalibrationDataReader.

    One-shot iterators are read once and kept in memory (they cannot be replayed);
    re-iterable containers are streamed on every pass.
    """

    def __init__(self, data: Any):
        if hasattr(data, "get_next"):
            batches = []
            while (item := data.get_next()) is not None:
                batches.append(item)
            data = batches
        elif iter(data) is data:
            data = list(data)
        self.data = data
        self.sizes = [self._batch_len(b) for b in self.data]

    @staticmethod
    def _batch_len(feed: Any) -> int:
        """Samples in a feed: its common leading size, or 1 for a feed that cannot be sliced
        (scalars, or inputs whose batch is not on axis 0, like an RNN state)."""
        if not isinstance(feed, dict) or not feed:
            raise InputError("calibration iterable must yield non-empty dicts of input name -> array")
        sizes = {np.asarray(v).shape[0] if np.ndim(v) else None for v in feed.values()}
        return cast(int, sizes.pop()) if len(sizes) == 1 and None not in sizes else 1  # None excluded just before

    @staticmethod
    def _sliceable(feed: dict, n: int) -> bool:
        return all(np.ndim(v) and np.asarray(v).shape[0] == n for v in feed.values())

    def __len__(self) -> int:
        return sum(self.sizes)

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        pos = 0
        for feed, n in zip(self.data, self.sizes):
            lo, hi = max(start - pos, 0), min(stop - pos, n)
            if lo < hi and not self._sliceable(feed, n):
                yield {k: np.asarray(v) for k, v in feed.items()}  # one opaque feed
            elif lo < hi:
                for i in range(lo, hi, batch_size):
                    yield {k: np.asarray(v)[i:min(hi, i + batch_size)] for k, v in feed.items()}
            pos += n
            if pos >= stop:
                return


# ---------------------------------------------------------------- the validated set
class CalibrationSet:
    """Validated, streamed calibration samples: a view [start, stop) of a source."""

    def __init__(self, source: SampleSource, specs: list[InputSpec], start: int = 0, stop: int | None = None,
                 origin: str = "calibration data"):
        self.source, self.specs, self.origin = source, specs, origin
        self.start, self.stop = start, len(source) if stop is None else stop
        if self.stop - self.start <= 0:
            raise InputError(f"{origin} is empty: no samples to calibrate on")

    def __len__(self) -> int:
        return self.stop - self.start

    def split(self, holdout: int) -> tuple[CalibrationSet, CalibrationSet | None]:
        """Calibration part and a held-out tail (for fidelity checks); no holdout if too few samples."""
        if holdout <= 0 or len(self) - holdout < 1:
            return self, None
        cut = self.stop - holdout
        return (CalibrationSet(self.source, self.specs, self.start, cut, self.origin),
                CalibrationSet(self.source, self.specs, cut, self.stop, self.origin + " (held out)"))

    def head(self, n: int) -> CalibrationSet:
        return CalibrationSet(self.source, self.specs, self.start, min(self.stop, self.start + n), self.origin)

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's inputs force (a static leading dimension), if any."""
        for spec in self.specs:
            if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0:
                return spec.shape[0]
        return None

    def batches(self, batch_size: int = 16) -> Iterator[dict[str, np.ndarray]]:
        batch_size = self.fixed_batch or batch_size
        index = self.start
        for feed in self.source.read(self.start, self.stop, batch_size):
            self._validate(feed, index)
            index += IterableSource._batch_len(feed)
            yield feed

    def first_batch(self, n: int = 2) -> dict[str, np.ndarray]:
        n = self.fixed_batch or n
        return next(self.head(n).batches(n))

    def _validate(self, feed: dict[str, np.ndarray], index: int) -> None:
        names = {s.name for s in self.specs}
        missing = sorted(names - feed.keys())
        unknown = sorted(feed.keys() - names)
        if missing or unknown:
            parts = []
            if missing:
                parts.append(f"lacks model input(s) {', '.join(map(repr, missing))}")
            if unknown:
                parts.append(f"has unknown input(s) {', '.join(map(repr, unknown))}")
            raise InputError(f"{self.origin} {' and '.join(parts)} (model inputs: {', '.join(sorted(names))})")
        for spec in self.specs:
            value = feed[spec.name]
            if value.dtype != spec.dtype:
                raise InputError(f"{self.origin}: input '{spec.name}' has dtype {value.dtype}, "
                                 f"the model expects {spec.dtype}")
            if spec.shape and value.ndim != len(spec.shape):
                raise InputError(f"{self.origin}: input '{spec.name}' has shape {list(value.shape)} "
                                 f"(rank {value.ndim}); the model expects rank {len(spec.shape)} {list(spec.shape)}")
            for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
                if axis > 0 and isinstance(want, int) and want > 0 and got != want:
                    raise InputError(f"{self.origin}: input '{spec.name}' has shape {list(value.shape)}; "
                                     f"the model expects {list(spec.shape)} (axis {axis} differs)")
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                bad = int(np.argwhere((~np.isfinite(value.reshape(len(value), -1))).any(axis=1))[0, 0])
                raise InputError(f"{self.origin}: input '{spec.name}' has NaN or Inf values "
                                 f"(sample {index + bad})")


def open_calibration(data: Any, model: Model, preprocess: str | None = None) -> CalibrationSet:
    """Build a validated CalibrationSet from a path, folder, image folder or iterable."""
    specs = InputSpec.of_model(model)
    if isinstance(data, CalibrationSet):
        return data
    if isinstance(data, (str, Path)):
        path = Path(data)
        if not path.exists():
            raise InputError(f"calibration data '{path}' does not exist")
        if path.is_dir():
            if preprocess or is_image_folder(path):
                if len(specs) != 1:
                    raise InputError("image-folder calibration needs a single-input model")
                return CalibrationSet(ImageFolderSource(path, preprocess, specs[0]), specs, origin=str(path))
            return CalibrationSet(FolderSource(path, [s.name for s in specs]), specs, origin=str(path))
        if path.suffix == ".npz" or zipfile.is_zipfile(path):
            return CalibrationSet(NpzSource(path), specs, origin=str(path))
        raise InputError(f"calibration data '{path}' is neither an .npz archive nor a folder")
    if isinstance(data, dict):
        return CalibrationSet(IterableSource([data]), specs, origin="calibration arrays")
    if isinstance(data, Iterable) or hasattr(data, "get_next"):
        return CalibrationSet(IterableSource(data), specs, origin="calibration iterable")
    raise InputError(f"unsupported calibration data of type {type(data).__name__}")

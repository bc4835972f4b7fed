"""Calibration data: readers that stream samples in batches, validated against the model.

Sources: an `.npz` (keys = input names, leading axis = samples, read row by row
from the archive so memory does not grow with its size), a folder of per-sample
`.npy`/`.npz` files, an image folder with a preprocessing spec, or any Python
iterable of feed dicts (an ORT CalibrationDataReader works too). Nothing is ever
unpickled; only regular files are read.

Files are checked from their headers before any row is read (qonnx/data/npy.py: names, dtype,
shape per sample, at most MAX_ROW_BYTES a sample for inputs with dynamic dims). At most
`max_samples` samples are used (DEFAULT_MAX_SAMPLES = 1024; the first ones, one warning when
the data holds more; None = no cap). A folder of samples of different shapes (a model with
dynamic height and width) is read in batches of equal shapes.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol, cast

import numpy as np

from qonnx.core.ir import Model
from qonnx.data.images import ImageFolderSource, image_files
from qonnx.data.inputs import InputSpec, check_array, check_names, error_text, name_list, path_text, refuse
from qonnx.data.npy import NpzSource, is_zip_archive, load_sample, not_regular, regular_files

__all__ = ["DEFAULT_MAX_SAMPLES", "CalibrationSet", "FolderSource", "InputSpec", "IterableSource", "NpzSource",
           "SampleSource", "open_calibration"]

log = logging.getLogger(__name__)

DEFAULT_MAX_SAMPLES = 1024  # samples used at most unless the caller says otherwise (None = all)


class SampleSource(Protocol):
    """Yields batches (dicts of arrays with a leading sample axis) for samples [start, stop)."""

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]: ...


# ---------------------------------------------------------------- folders
class FolderSource:
    """One `.npy` (single-input models) or `.npz` file per sample, in sorted order.

    Samples are stacked into batches of equal shapes: where the shapes change (a model with dynamic
    height and width), a batch ends early.
    """

    def __init__(self, path: str | Path, specs: list[InputSpec]):
        self.path = Path(path)
        self.specs = specs
        self.input_names = [s.name for s in specs]
        self.files = regular_files(self.path, lambda name: Path(name).suffix in (".npy", ".npz"))
        if any(p.suffix == ".npy" for p in self.files) and len(specs) != 1:
            raise refuse(f"'{path_text(path)}': .npy samples only work for single-input models; this model has "
                         f"inputs {name_list(self.input_names)}: use one .npz per sample")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        group: list[dict[str, np.ndarray]] = []
        shapes: dict[str, tuple[int, ...]] = {}
        for file in self.files[start:stop]:
            sample = load_sample(file, self.specs)
            sample_shapes = {k: v.shape for k, v in sample.items()}
            if group and (len(group) == batch_size or sample_shapes != shapes):
                yield self._stack(group)
                group = []
            shapes = sample_shapes
            group.append(sample)
        if group:
            yield self._stack(group)

    @staticmethod
    def _stack(samples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}


# ---------------------------------------------------------------- iterables
class IterableSource:
    """Feed dicts (each a batch) from a Python iterable or an ORT CalibrationDataReader.

    One-shot iterators are read once and kept in memory (they cannot be replayed), no further
    than the item that reaches `max_samples`; re-iterable containers are streamed on every pass.
    """

    def __init__(self, data: Any, max_samples: int | None = None):
        self.more = 0  # samples in the first item of a one-shot iterator left unread (past max_samples)
        if hasattr(data, "get_next"):
            data = self._take(_pull(data), max_samples)
        elif iter(data) is data:
            data = self._take(data, max_samples)
        self.data = data
        self.sizes = [self._batch_len(b) for b in self.data]

    def _take(self, items: Iterable[Any], max_samples: int | None) -> list[Any]:
        """The items of a one-shot iterator, up to the first that reaches max_samples."""
        batches: list[Any] = []
        count = 0
        for item in items:
            if max_samples is not None and count >= max_samples:
                self.more = self._batch_len(item)
                break
            batches.append(item)
            count += self._batch_len(item)
        return batches

    @staticmethod
    def _batch_len(feed: Any) -> int:
        """Samples in a feed: its common leading size, or 1 for a feed that cannot be sliced
        (scalars, or inputs whose batch is not on axis 0, like an RNN state)."""
        if not isinstance(feed, dict) or not feed:
            raise refuse("calibration iterable must yield non-empty dicts of input name -> array")
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
            raise refuse(f"{origin} is empty: no samples to calibrate on")

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
        check_names(self.origin, feed.keys(), self.specs)
        for spec in self.specs:
            value = feed[spec.name]
            check_array(spec, self.origin, value.dtype, value.shape)
            if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
                bad = int(np.argwhere((~np.isfinite(value.reshape(len(value), -1))).any(axis=1))[0, 0])
                raise refuse(f"{self.origin}: input '{spec.name}' has NaN or Inf values (sample {index + bad})")


def _pull(reader: Any) -> Iterator[Any]:
    while (item := reader.get_next()) is not None:
        yield item


def open_calibration(data: Any, model: Model, preprocess: str | None = None,
                     max_samples: int | None = DEFAULT_MAX_SAMPLES) -> CalibrationSet:
    """Build a validated CalibrationSet from a path, folder, image folder or iterable.

    At most `max_samples` samples are used, the first ones (default DEFAULT_MAX_SAMPLES = 1024; None = no
    cap); when the data holds more, one warning gives both counts. A CalibrationSet is returned as it is.
    Files are checked from their headers here, before any sample is read.
    """
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise refuse(f"max_samples must be a positive whole number or None, got {max_samples!r}")
    if isinstance(data, CalibrationSet):
        return data
    specs = InputSpec.of_model(model)
    if isinstance(data, (str, os.PathLike)):
        calibration = _open_path(Path(data), specs, preprocess)
    elif isinstance(data, dict):
        calibration = CalibrationSet(IterableSource([data]), specs, origin="calibration arrays")
    elif isinstance(data, Iterable) or hasattr(data, "get_next"):
        calibration = CalibrationSet(IterableSource(data, max_samples), specs, origin="calibration iterable")
    else:
        raise refuse(f"unsupported calibration data of type {type(data).__name__}")
    more = calibration.source.more if isinstance(calibration.source, IterableSource) else 0
    if max_samples is not None and (more or len(calibration) > max_samples):
        held = f"at least {len(calibration) + more}" if more else str(len(calibration))
        log.warning("%s holds %s samples: using the first %d (max_samples=%d; None uses all)",
                    calibration.origin, held, max_samples, max_samples)
        calibration = calibration.head(max_samples)
    return calibration


def _open_path(path: Path, specs: list[InputSpec], preprocess: str | None) -> CalibrationSet:
    origin = path_text(path)
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        raise refuse(f"calibration data '{origin}' does not exist") from None
    except (OSError, ValueError) as e:
        raise refuse(f"calibration data '{origin}' cannot be read: {error_text(e)}") from e
    if stat.S_ISDIR(mode):
        if preprocess or image_files(path):
            if len(specs) != 1:
                raise refuse("image-folder calibration needs a single-input model")
            return CalibrationSet(ImageFolderSource(path, preprocess, specs[0]), specs, origin=origin)
        return CalibrationSet(FolderSource(path, specs), specs, origin=origin)
    if not stat.S_ISREG(mode):
        raise not_regular(f"calibration data '{origin}'", mode)
    if path.suffix == ".npz" or is_zip_archive(path, f"calibration data '{origin}'"):
        return CalibrationSet(NpzSource(path, specs), specs, origin=origin)
    raise refuse(f"calibration data '{origin}' is neither an .npz archive nor a folder")

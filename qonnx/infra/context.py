"""What passes may use besides the model: the typed PassContext and its Analysis cache.

An analysis is a cached fact about the model (activation statistics, propagated moments, mixed-precision
costs...). Its class is its cache key: `ctx.analyses.get(ActivationStats)` gives the cached instance or
None. After a pass that modified the model, the manager drops every analysis the pass does not name in
`preserves` (MLIR's pessimistic default). This module knows no concrete analysis.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from qonnx.data.calibration import CalibrationSet


class Analysis:
    """Base of cached analyses; subclasses are dataclasses holding the result and what it was computed for."""


AnalysisT = TypeVar("AnalysisT", bound=Analysis)


class AnalysisCache:
    """At most one instance per analysis class."""

    def __init__(self) -> None:
        self._entries: dict[type[Analysis], Analysis] = {}

    def get(self, kind: type[AnalysisT]) -> AnalysisT | None:
        entry = self._entries.get(kind)
        return entry if isinstance(entry, kind) else None

    def put(self, value: Analysis) -> None:
        self._entries[type(value)] = value

    def keep_only(self, preserved: frozenset[type[Analysis]]) -> None:
        """Drop every analysis not in `preserved` (after a pass that modified the model)."""
        for kind in [k for k in self._entries if k not in preserved]:
            del self._entries[kind]

    def __contains__(self, kind: object) -> bool:
        return kind in self._entries

    def __iter__(self) -> Iterator[type[Analysis]]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass
class PassContext:
    """Data, settings and cached analyses for a pipeline run."""

    calibration: CalibrationSet | None = None
    seed: int = 0
    threads: int | None = None  # ORT intra-op threads for sessions the passes make (None: ORT's default)
    progress: bool = False  # progress bars on long work
    analyses: AnalysisCache = field(default_factory=AnalysisCache)

    def available(self) -> frozenset[str]:
        return frozenset({"calibration-data"} if self.calibration is not None else set())

    def data(self) -> CalibrationSet:
        """The calibration set; validation guarantees it to passes that require calibration-data."""
        if self.calibration is None:
            raise RuntimeError("no calibration data in the pass context (the pipeline validator should have said so)")
        return self.calibration

    def rng(self, salt: str = "") -> np.random.Generator:
        """A generator seeded from the run seed and a per-use salt (stable across runs)."""
        return np.random.default_rng([self.seed, zlib.crc32(salt.encode())])

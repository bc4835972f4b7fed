"""Reading a prepared task's inputs as ready-to-run ONNX Runtime feeds.

Most tasks store `{input_name: array}` with samples on the leading axis, fed in slices. A few
robustness models cannot be fed that way (Silero VAD's state has its batch on axis 1 and `sr` is a
scalar; ddddocr's batch is fixed to 1), so their `calib_meta.json` says how:
`{"feed": "single"}`: `{k: v[i]}` is one complete feed; `{"feed": "batched", "max_batch": 1}`:
slices of at most one sample.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._common import load_npz


def feed_spec(task_dir: Path) -> dict[str, object]:
    """`{"feed": "batched" | "single", "max_batch": int | None}` (defaults: batched, unbounded)."""
    meta_path = task_dir / "calib_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return {"feed": meta.get("feed", "batched"), "max_batch": meta.get("max_batch")}


def iter_feeds(
    task_dir: Path, split: str = "calib", batch_size: int = 32, max_samples: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
    """Yield feeds for `task_dir/{split}.npz` honouring the task's feed mode."""
    arrays = load_npz(task_dir / f"{split}.npz")
    spec = feed_spec(task_dir)
    n = len(next(iter(arrays.values())))
    n = n if max_samples is None else min(n, max_samples)
    if spec["feed"] == "single":
        for i in range(n):
            yield {k: np.asarray(v[i]) for k, v in arrays.items()}  # 0-d arrays, not numpy scalars
        return
    step = min(batch_size, int(spec["max_batch"])) if spec["max_batch"] else batch_size
    for start in range(0, n, step):
        yield {k: v[start : min(n, start + step)] for k, v in arrays.items()}

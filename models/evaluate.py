"""Score a model on prepared tasks: `python -m models.evaluate NAME [NAME ...] [--all] [--model PATH]`.

Without --model each task's own FP32 `model.onnx` is scored (a sanity check: fidelity metrics must
be perfect). Prints one JSON object per task.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ._common import cache_dir
from .tasks import TASKS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME")
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help=f"prepared root (default {cache_dir()})")
    parser.add_argument(
        "--model", type=Path, default=None, help="model to score (default: the task's model.onnx)"
    )
    parser.add_argument("--max-samples", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = list(TASKS) if args.all else args.names
    if not names or any(n not in TASKS for n in names):
        parser.error(f"choose NAME(s) from {', '.join(TASKS)} or --all")
    if args.model and len(names) != 1:
        parser.error("--model needs exactly one task")
    root = (args.out or cache_dir()).resolve()
    for name in names:
        task_dir = root / name
        t0 = time.perf_counter()
        metrics = TASKS[name].evaluate(
            args.model or task_dir / "model.onnx", task_dir, max_samples=args.max_samples
        )
        metrics["seconds"] = round(time.perf_counter() - t0, 2)
        print(json.dumps({"task": name, "primary": TASKS[name].primary_metric, **metrics}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prepare real-model tasks: `python -m models.prepare NAME [NAME ...] [--all] [--out DIR] [--force]`.

Each NAME becomes `DIR/NAME/` (DIR defaults to `$QONNX_MODELS_DIR` or `<repo>/models/.cache`).
Re-running skips outputs that exist; `--force` rebuilds them. A `manifest.json` with the sha256 of
every file is written last, so two runs can be compared for determinism.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from ._common import cache_dir, save_json_atomic, sha256_file
from .tasks import TASKS

log = logging.getLogger("models.prepare")


def prepare_task(name: str, root: Path, force: bool = False) -> Path:
    """Prepare one task under `root/name` and return that directory."""
    task = TASKS[name]
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    if force:
        (out / "fp32_eval_outputs.npz").unlink(missing_ok=True)
        (out / "manifest.json").unlink(missing_ok=True)
    task.prepare(out, force=force)
    files = sorted(
        p
        for p in out.iterdir()
        if p.is_file()
        and p.name not in {"manifest.json", "fp32_eval_outputs.npz"}
        and not p.name.startswith(".")
    )
    save_json_atomic(out / "manifest.json", {p.name: sha256_file(p) for p in files})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"tasks: {', '.join(TASKS)}")
    parser.add_argument("--all", action="store_true", help="prepare every task")
    parser.add_argument("--out", type=Path, default=None, help=f"output root (default {cache_dir()})")
    parser.add_argument("--force", action="store_true", help="rebuild even if outputs exist")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    names = list(TASKS) if args.all else args.names
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        parser.error(
            f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}"
            if unknown
            else "give NAME(s) or --all"
        )
    root = (args.out or cache_dir()).resolve()
    os.environ["QONNX_MODELS_DIR"] = str(root)  # Debian downloads are cached under the same root
    failed = []
    for name in names:
        t0 = time.perf_counter()
        try:
            out = prepare_task(name, root, force=args.force)
        except Exception:
            log.exception("%s: failed", name)
            failed.append(name)
            continue
        print(f"{name}: ready in {out} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

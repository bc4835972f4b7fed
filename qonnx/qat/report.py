"""The oscillation report: per layer and logging step, the fraction of weights that oscillated in the window
since the previous log and the fraction frozen, as JSON and as a two-panel PNG (Pillow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qonnx.core.modelio import write_bytes_atomic

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def write_report(report: dict[str, Any], directory: str | Path) -> list[Path]:
    """oscillations.json and oscillations.png in `directory` (created); returns the paths written."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out / "oscillations.json", out / "oscillations.png"
    write_bytes_atomic(json.dumps(report, indent=1, sort_keys=True).encode(), json_path)
    plot_oscillations(report, png_path)
    return [json_path, png_path]


def _series(report: dict[str, Any], key: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for row in report.get("log", []):
        for layer, values in row["layers"].items():
            series.setdefault(layer, []).append((row["step"], values[key]))
    return series


def plot_oscillations(report: dict[str, Any], path: str | Path, width: int = 1000, height: int = 420) -> None:
    """Left: oscillating fraction per layer over steps (the mean in black); right: frozen fraction."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    half = width // 2
    for box, key, title in (((0, 0, half, height), "oscillating", "fraction of weights oscillating"),
                            ((half, 0, width, height), "frozen", "fraction of weights frozen")):
        series = _series(report, key)
        mean = [(row["step"], row[f"mean_{key}"]) for row in report.get("log", [])]
        _panel(draw, box, series, mean, title)
    image.save(path, format="PNG")


def _panel(draw, box, series: dict[str, list[tuple[int, float]]], mean: list[tuple[int, float]],
           title: str) -> None:
    left, top, right, bottom = box
    x0, y0, x1, y1 = left + 60, top + 40, right - 20, bottom - 50
    draw.text((x0, top + 12), title, fill="black")
    draw.rectangle((x0, y0, x1, y1), outline="black")
    points = [p for s in series.values() for p in s] + mean
    if not points:
        draw.text((x0 + 10, y0 + 10), "no tracked weights", fill="black")
        return
    xmax = max(1, max(p[0] for p in points))
    ymax = max(1e-6, max(p[1] for p in points))

    def px(v: float) -> float:
        return x0 + v / xmax * (x1 - x0)

    def py(v: float) -> float:
        return y1 - v / ymax * (y1 - y0)

    for i in range(5):
        t = ymax * i / 4
        draw.line((x0, py(t), x1, py(t)), fill=(230, 230, 230))
        draw.text((left + 6, py(t) - 6), f"{t:.3g}", fill="black")
        draw.text((px(xmax * i / 4) - 10, y1 + 8), str(int(xmax * i / 4)), fill="black")
    draw.text(((x0 + x1) / 2 - 15, y1 + 28), "step", fill="black")
    for i, pts in enumerate(series.values()):
        line = [(px(a), py(b)) for a, b in pts]
        if len(line) > 1:
            draw.line(line, fill=PALETTE[i % len(PALETTE)], width=1)
    line = [(px(a), py(b)) for a, b in mean]
    if len(line) > 1:
        draw.line(line, fill="black", width=3)

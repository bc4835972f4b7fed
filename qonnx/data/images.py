"""Image folders as calibration data, with a small preprocessing spec.

Spec text: `resize=256,crop=224,mean=127,std=128,layout=nchw,color=rgb`
(`mean`/`std` take one value or three separated by ';'; `scale` multiplies the
0..255 pixels first, e.g. scale=0.00392156862745098 for /255).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

from qonnx.data.inputs import clip, error_text, path_text, refuse
from qonnx.data.npy import open_regular, regular_files

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def image_files(path: Path) -> list[Path]:
    """The images of a folder, sorted (only regular files: a FIFO named like an image is refused)."""
    return regular_files(path, lambda name: Path(name).suffix.lower() in IMAGE_SUFFIXES)


@dataclass(frozen=True)
class ImagePreprocess:
    resize: int = 0  # shorter side after resizing; 0 = crop / 0.875
    crop: int = 0  # centre crop size; 0 = the model's input size
    scale: float = 1.0
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str = "nchw"
    color: str = "rgb"
    interpolation: str = "bicubic"

    @classmethod
    def parse(cls, text: str | None) -> ImagePreprocess:
        if not text:
            return cls()
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        for part in text.split(","):
            if "=" not in part:
                raise refuse(f"preprocessing spec: '{clip(part, 40)}' needs the form key=value")
            key, raw = (s.strip() for s in part.split("=", 1))
            if key not in known:
                raise refuse(f"preprocessing spec: unknown key '{clip(key, 40)}' (known: {', '.join(sorted(known))})")
            try:
                if key in ("resize", "crop"):
                    values[key] = int(raw)
                elif key == "scale":
                    values[key] = float(eval_fraction(raw))
                elif key in ("mean", "std"):
                    values[key] = tuple(float(v) for v in raw.split(";"))
                else:
                    values[key] = raw.lower()
            except ValueError:
                raise refuse(f"preprocessing spec: bad value '{clip(raw, 40)}' for '{key}'") from None
        spec = cls(**values)  # type: ignore[arg-type]
        if spec.layout not in ("nchw", "nhwc") or spec.color not in ("rgb", "bgr"):
            raise refuse("preprocessing spec: layout must be nchw or nhwc and color rgb or bgr")
        if spec.interpolation not in ("bicubic", "bilinear", "nearest"):
            raise refuse("preprocessing spec: interpolation must be bicubic, bilinear or nearest")
        return spec


def eval_fraction(raw: str) -> float:
    if "/" in raw:
        num, den = raw.split("/", 1)
        return float(num) / float(den)
    return float(raw)


def load_image(path: Path, spec: ImagePreprocess, size: int) -> np.ndarray:
    from PIL import Image

    resample = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                "nearest": Image.Resampling.NEAREST}
    try:
        with open_regular(path, f"image '{path_text(path)}'") as file, Image.open(file) as opened:
            img = opened.convert("RGB")
            crop = spec.crop or size
            short = spec.resize or int(round(crop / 0.875))
            w, h = img.size
            ratio = short / min(w, h)
            img = img.resize((max(crop, round(w * ratio)), max(crop, round(h * ratio))),
                             resample[spec.interpolation])
            w, h = img.size
            left, top = (w - crop) // 2, (h - crop) // 2
            img = img.crop((left, top, left + crop, top + crop))
            # Plain ndarray: numpy's stubs wrongly type the float division below as complex128.
            pixels: np.ndarray = np.asarray(img, dtype=np.float32)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise refuse(f"cannot read image '{path_text(path)}': {error_text(e)}") from e
    if spec.color == "bgr":
        pixels = pixels[..., ::-1]
    pixels = (pixels * spec.scale - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    if spec.layout == "nchw":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


class ImageFolderSource:
    def __init__(self, path: Path, spec_text: str | None, input_spec) -> None:
        self.spec = ImagePreprocess.parse(spec_text)
        self.files = image_files(path)
        self.name = input_spec.name
        shape = list(input_spec.shape)
        spatial = shape[2:4] if self.spec.layout == "nchw" else shape[1:3]
        self.size = next((d for d in spatial if isinstance(d, int) and d > 0), 0) or self.spec.crop
        if not self.size:
            raise refuse("the model's input has no static spatial size: give crop=N in the preprocessing spec")

    def __len__(self) -> int:
        return len(self.files)

    def read(self, start: int, stop: int, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for i in range(start, stop, batch_size):
            chunk = self.files[i:min(stop, i + batch_size)]
            yield {self.name: np.stack([load_image(f, self.spec, self.size) for f in chunk])}

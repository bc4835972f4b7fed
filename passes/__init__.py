"""Built-in passes; importing this package registers them."""

from passes import bias_correction, calibrate, canonicalize, cle, fold_bn, keep_fast, plan, protect, relu6  # noqa: F401

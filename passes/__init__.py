"""Built-in passes; importing this package registers them."""

from passes import bias_correction, calibrate, canonicalize, fold_bn, keep_fast, plan, protect  # noqa: F401

"""IR + quant table -> ONNX: QDQ, QOperator and integer-only exporters (EXPORTERS), lowering, low-bit weights, the integer reference."""

"""The IR boundary: the model (the only importer of onnx-graphsurgeon), safe model I/O, the quant table and the op-category table."""

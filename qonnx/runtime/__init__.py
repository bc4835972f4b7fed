"""ONNX Runtime: sessions, streaming intermediate tensors, latency, float-model comparison, the fusion read-back."""

"""Tests of qonnx.qat and the qat pass."""

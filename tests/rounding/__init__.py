"""Tests of qonnx.rounding."""

"""Tests of qonnx.core."""

"""Tests of qonnx.export."""

"""Tests of qonnx.passes."""

"""Tests of qonnx.numerics."""

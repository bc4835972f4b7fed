"""Tests of qonnx.data."""

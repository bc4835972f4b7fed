"""Tests of qonnx.analyses."""

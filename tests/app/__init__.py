"""Tests of qonnx.app."""

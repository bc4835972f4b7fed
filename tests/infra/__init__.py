"""Tests of qonnx.infra."""

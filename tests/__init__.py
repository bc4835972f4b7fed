"""Tests of qonnx, one folder per package layer (tests/passes/test_cle.py tests qonnx/passes/cle.py)."""

"""The op-category table (qonnx/core/ops.py): every backend that must handle a category handles all its ops.

A new op type is added to OP_CATEGORIES with its category; this test then names each backend that
lacks a handler for it, so the failure points at the file to change:
- plan (QDQ): the planner's rule for the category (qonnx/quantize/planning.py, Planner.RULES); the QDQ
  exporter writes Q/DQ for whatever the plan decided, so for QDQ this is what handling an op means;
- qop: QOpLowering.HANDLERS (qonnx/export/qop.py);
- int-only: IntLowering.HANDLERS (qonnx/export/int_only.py), lookup functions in LUT_FUNCTIONS;
- int-ref: the integer reference's OPS (qonnx/export/intref.py), for ops the integer-only graph keeps;
- qat: the torch interpreter's OPS (qonnx/qat/ops.py).
"""

from __future__ import annotations

import pytest

from qonnx.core.ops import (
    ABSORBED_ACTIVATIONS,
    INT_PASS_THROUGH_OPS,
    LOOKUP_OPS,
    OP_CATEGORIES,
    PASS_THROUGH_OPS,
    SAME_PARAMS_OPS,
    Category,
    ops_in,
)
from qonnx.export import intref
from qonnx.export.int_only import LUT_FUNCTIONS, IntLowering
from qonnx.export.qop import QOpLowering
from qonnx.quantize.planning import Planner

BACKENDS: dict[Category, tuple[str, ...]] = {
    Category.LAYER: ("plan", "qop", "int-only", "qat"),
    Category.REQUANT: ("plan", "qop", "int-only", "qat"),
    Category.MOVEMENT: ("plan", "qop", "int-only", "int-ref", "qat"),
    Category.MOVEMENT_QDQ: ("plan", "qop"),
    Category.NO_OP: ("qop", "int-only", "int-ref", "qat"),
    Category.ACTIVATION: ("plan", "qop", "int-only", "qat"),
    Category.BOUND: ("plan", "qat"),
    Category.LOOKUP: ("int-only", "qat"),
}


def handled(backend: str, op: str) -> bool:
    if backend == "plan":
        return OP_CATEGORIES[op] in Planner.RULES and callable(getattr(Planner, Planner.RULES[OP_CATEGORIES[op]]))
    if backend == "qop":
        return op in QOpLowering.HANDLERS and callable(getattr(QOpLowering, QOpLowering.HANDLERS[op]))
    if backend == "int-only":
        return op in IntLowering.HANDLERS and callable(getattr(IntLowering, IntLowering.HANDLERS[op]))
    if backend == "int-ref":
        return op in intref.OPS
    if backend == "qat":
        pytest.importorskip("torch")
        from qonnx.qat.ops import OPS

        return op in OPS
    raise AssertionError(f"unknown backend {backend}")


def test_every_category_lists_its_backends():
    assert set(BACKENDS) == set(Category)
    assert set(OP_CATEGORIES.values()) == set(Category)  # no category without an op


@pytest.mark.parametrize("category", list(Category), ids=lambda c: c.value)
def test_every_backend_handles_every_op_of_its_categories(category):
    missing = [(backend, op) for op in sorted(ops_in(category)) for backend in BACKENDS[category]
               if not handled(backend, op)]
    assert not missing, f"{category.value}: no handler for {missing}"


def test_derived_op_sets():
    assert ops_in(Category.LAYER) == {"Conv", "Gemm", "MatMul"}
    assert PASS_THROUGH_OPS == SAME_PARAMS_OPS | {"Identity"}
    assert INT_PASS_THROUGH_OPS < PASS_THROUGH_OPS
    assert ABSORBED_ACTIVATIONS == {"Relu", "Clip"}
    assert LOOKUP_OPS == set(LUT_FUNCTIONS)  # every lookup op has its function, and no function goes unused


def test_a_handler_test_fails_for_an_op_without_handlers(monkeypatch):
    monkeypatch.setitem(OP_CATEGORIES, "Erf", Category.REQUANT)  # pretend a new op joined a category
    assert not handled("qop", "Erf") and not handled("int-only", "Erf")
    with pytest.raises(AssertionError, match="no handler for"):
        test_every_backend_handles_every_op_of_its_categories(Category.REQUANT)

"""Fidelity metrics reported by `optimize` and `qonnx bench` (top-1 agreement, KL, SQNR, cosine)."""

from __future__ import annotations

import numpy as np
import pytest

from qonnx.numerics.metrics import Fidelity
from tests.helpers import rng


def test_identical_outputs():
    logits = rng(90).standard_normal((6, 10)).astype(np.float32)
    f = Fidelity()
    f.update(logits, logits.copy())
    d = f.as_dict()
    assert d["samples"] == 6
    assert d["sqnr_db"] == float("inf")
    assert d["top1_agreement"] == 1.0
    assert d["kl"] == pytest.approx(0.0, abs=1e-12)
    assert d["cosine"] == pytest.approx(1.0, abs=1e-6)


def test_sqnr_matches_its_definition_across_batches():
    g = rng(91)
    ref = g.standard_normal((8, 10))
    cand = ref + 0.01 * g.standard_normal((8, 10))
    f = Fidelity()
    f.update(ref[:3], cand[:3])
    f.update(ref[3:], cand[3:])
    want = 10 * np.log10(np.sum(ref**2) / np.sum((ref - cand) ** 2))
    assert f.as_dict()["sqnr_db"] == pytest.approx(want, abs=0.01)
    assert f.samples == 8


def test_top1_agreement_counts_samples():
    ref = np.eye(4)[[0, 1, 2, 3]]
    cand = np.eye(4)[[0, 1, 3, 3]]
    f = Fidelity()
    f.update(ref, cand)
    assert f.as_dict()["top1_agreement"] == 0.75


def test_kl_of_a_known_pair():
    ref = np.log(np.array([[0.5, 0.5]]))
    cand = np.log(np.array([[0.9, 0.1]]))
    f = Fidelity()
    f.update(ref, cand)
    want = 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1)
    assert f.as_dict()["kl"] == pytest.approx(want, rel=1e-3)


def test_top1_agreement_of_per_position_classifiers_is_a_fraction():
    # One sample, 3 positions (e.g. tokens or pixels), 2 classes: 2 of 3 positions agree.
    ref = np.array([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])
    cand = np.array([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
    f = Fidelity()
    for _ in range(3):
        f.update(ref, cand)
    assert f.as_dict()["top1_agreement"] == pytest.approx(2 / 3, abs=1e-3)


def test_non_classifier_outputs_report_no_top1():
    f = Fidelity()
    f.update(np.ones((4, 1)), np.ones((4, 1)) * 1.01)
    d = f.as_dict()
    assert "top1_agreement" not in d and "kl" not in d
    assert d["sqnr_db"] == pytest.approx(40.0, abs=0.1)

"""Fidelity of a model's outputs to a reference (the float model)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class Fidelity:
    """Running agreement statistics between reference and candidate outputs (first output)."""

    samples: int = 0
    agree: float = 0.0
    kl_sum: float = 0.0
    signal: float = 0.0
    noise: float = 0.0
    cos_sum: float = 0.0
    classifier: bool = True
    extra: dict = field(default_factory=dict)

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        ref = np.asarray(reference, np.float64)
        cand = np.asarray(candidate, np.float64)
        n = ref.shape[0] if ref.ndim else 1
        self.samples += n
        self.signal += float(np.sum(ref**2))
        self.noise += float(np.sum((ref - cand) ** 2))
        flat_r, flat_c = ref.reshape(n, -1), cand.reshape(n, -1)
        denom = np.linalg.norm(flat_r, axis=1) * np.linalg.norm(flat_c, axis=1)
        self.cos_sum += float(np.sum(np.sum(flat_r * flat_c, axis=1) / np.where(denom > 0, denom, 1.0)))
        if ref.ndim < 2 or ref.shape[-1] < 2:
            self.classifier = False
            return
        # Per-position outputs (sequences): each sample counts the fraction of positions that agree.
        self.agree += float(np.sum(np.argmax(ref, -1) == np.argmax(cand, -1))) / max(1, int(np.prod(ref.shape[1:-1])))
        lp, lq = _log_softmax(ref), _log_softmax(cand)
        kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
        self.kl_sum += float(np.mean(kl.reshape(n, -1), axis=1).sum())

    def as_dict(self) -> dict[str, float]:
        sqnr = float("inf") if self.noise == 0 else 10 * np.log10(max(self.signal, 1e-300) / self.noise)
        out = {"samples": self.samples, "sqnr_db": round(float(sqnr), 2),
               "cosine": round(self.cos_sum / max(self.samples, 1), 5)}
        if self.classifier and self.samples:
            out["top1_agreement"] = round(self.agree / self.samples, 4)
            out["kl"] = float(f"{self.kl_sum / self.samples:.4g}")
        return out

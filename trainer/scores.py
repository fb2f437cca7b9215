"""Classification scores for fine-tuning reports: accuracy, macro-F1, MCC, and mean +- std over seeds."""

from __future__ import annotations

import math

import numpy as np


def confusion(gold: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """counts[i, j] = examples of gold class i predicted as j."""
    gold, pred = np.asarray(gold, np.int64), np.asarray(pred, np.int64)
    return np.bincount(gold * n_classes + pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(gold, pred) -> float:
    gold, pred = np.asarray(gold), np.asarray(pred)
    return float((gold == pred).mean()) if len(gold) else float("nan")


def macro_f1(gold, pred, n_classes: int) -> float:
    """Mean F1 over the classes that occur in gold or predictions (as scikit-learn's 'macro')."""
    c = confusion(gold, pred, n_classes)
    tp = np.diag(c).astype(float)
    support, predicted = c.sum(1), c.sum(0)
    present = (support + predicted) > 0
    if not present.any():
        return float("nan")
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    return float(f1[present].mean())


def mcc(gold, pred) -> float:
    """Matthews correlation for a binary task (classes 0/1); 0 when a margin is empty."""
    c = confusion(gold, pred, 2).astype(float)
    tn, fp, fn, tp = c[0, 0], c[0, 1], c[1, 0], c[1, 1]
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / den) if den > 0 else 0.0


def scores(gold, pred, n_classes: int) -> dict[str, float]:
    out = {"accuracy": accuracy(gold, pred), "macro_f1": macro_f1(gold, pred, n_classes)}
    if n_classes == 2:
        out["mcc"] = mcc(gold, pred)
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0

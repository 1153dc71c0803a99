"""GLUE metrics, as in the paper's Table 2: accuracy, F1 (positive class 1),
Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B); and macro-F1 (the mean
of each class's F1, for ``--task classify``'s classes).
Written out in numpy so no scikit-learn/scipy is needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["compute_metrics", "accuracy", "f1", "macro_f1", "matthews", "pearson", "spearman"]


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float((pred == gold).mean())


def f1(pred: np.ndarray, gold: np.ndarray) -> float:
    tp = float(((pred == 1) & (gold == 1)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The unweighted mean over classes of ``2 tp / (2 tp + fp + fn)``, over the classes that
    occur in ``gold`` or ``pred`` (scikit-learn's ``f1_score(average="macro")``)."""
    scores = []
    for c in np.union1d(pred, gold):
        tp = float(((pred == c) & (gold == c)).sum())
        wrong = float(((pred == c) != (gold == c)).sum())  # fp + fn
        scores.append(2 * tp / (2 * tp + wrong))
    return float(np.mean(scores))


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation for binary labels; 0 when a marginal is empty."""
    tp = float(((pred == 1) & (gold == 1)).sum())
    tn = float(((pred == 0) & (gold == 0)).sum())
    fp = float(((pred == 1) & (gold == 0)).sum())
    fn = float(((pred == 0) & (gold == 1)).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    denom = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / denom) if denom else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    return pearson(_ranks(x), _ranks(y))


_METRICS = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}


def compute_metrics(names: Sequence[str], predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """``{name: value}`` for each metric name; values in [0, 1] (or [-1, 1]), not percent."""
    pred, gold = np.asarray(predictions, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if pred.shape != gold.shape or not len(pred):
        raise ValueError(f"predictions and labels must be non-empty and of equal length, got {pred.shape} and {gold.shape}")
    return {name: _METRICS[name](pred, gold) for name in names}

import numpy as np
import pytest

from lorakit.metrics import compute_metrics


def test_classification_metrics_by_hand():
    pred, gold = [1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0]
    # tp=2 fp=1 fn=1 tn=2
    m = compute_metrics(["accuracy", "f1", "matthews"], pred, gold)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["matthews"] == pytest.approx((2 * 2 - 1 * 1) / np.sqrt(3 * 3 * 3 * 3))
    assert compute_metrics(["matthews"], [1, 1, 1], [0, 1, 1])["matthews"] == 0.0  # empty marginal


def test_correlations_by_hand_and_ties():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0, 8.5]
    assert compute_metrics(["spearman"], x, y)["spearman"] == pytest.approx(1.0)
    assert compute_metrics(["pearson"], x, [-v for v in y])["pearson"] < -0.99
    # ties: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    got = compute_metrics(["spearman"], [1.0, 2.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0])["spearman"]
    r = np.array([1, 2.5, 2.5, 4.0]) - 2.5
    s = np.array([1, 2, 3, 4.0]) - 2.5
    assert got == pytest.approx((r * s).sum() / np.sqrt((r * r).sum() * (s * s).sum()))


def test_against_scipy_when_present():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    m = compute_metrics(["pearson", "spearman"], x, y)
    assert m["pearson"] == pytest.approx(stats.pearsonr(x, y)[0])
    assert m["spearman"] == pytest.approx(stats.spearmanr(x, y)[0])


def test_bad_lengths_are_refused():
    with pytest.raises(ValueError, match="non-empty and of equal length"):
        compute_metrics(["accuracy"], [1, 0], [1])

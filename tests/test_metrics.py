"""Metrics against hand-computed values and NumPy's corrcoef."""

import numpy as np
import pytest

from latadj_jax.core import metrics

PREDS = np.array([1, 1, 0, 1, 0, 0, 1, 0])
LABELS = np.array([1, 0, 0, 1, 1, 0, 1, 0])  # tp=3 fp=1 fn=1 tn=3


def test_accuracy_f1_mcc_by_hand():
  assert metrics.accuracy(PREDS, LABELS) == pytest.approx(6 / 8)
  assert metrics.f1(PREDS, LABELS) == pytest.approx(2 * 3 / (2 * 3 + 1 + 1))
  assert metrics.matthews_corrcoef(PREDS, LABELS) == pytest.approx((9 - 1) / 16)


def test_f1_is_of_class_one_and_degenerate_cases():
  assert metrics.f1([0, 0, 1], [0, 1, 1]) == pytest.approx(2 / 3)
  assert metrics.f1([1, 1, 0], [1, 0, 0]) == pytest.approx(2 / 3)  # precision 1/2, recall 1
  assert metrics.f1([0, 0], [0, 0]) == 0.0
  assert metrics.matthews_corrcoef([1, 1, 1], [0, 1, 1]) == 0.0
  assert metrics.matthews_corrcoef([0, 1, 1], [1, 0, 0]) == pytest.approx(-1.0)


def test_pearson_matches_corrcoef():
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=50), rng.normal(size=50)
  y = x + y
  assert metrics.pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-12)
  assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
  assert metrics.pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_spearman_average_ranks_for_ties():
  assert metrics.rankdata([10, 20, 20, 5]).tolist() == [2.0, 3.5, 3.5, 1.0]
  # Monotone but nonlinear: Spearman 1 while Pearson is below 1.
  x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
  assert metrics.spearman(x, x ** 3) == pytest.approx(1.0)
  assert metrics.pearson(x, x ** 3) < 0.99
  # With ties: ranks a=[1,2.5,2.5,4], b=[1,2,3,4] -> Pearson of ranks by hand.
  a, b = np.array([1.0, 2.5, 2.5, 4.0]), np.array([1.0, 2.0, 3.0, 4.0])
  expected = np.sum((a - 2.5) * (b - 2.5)) / np.sqrt(np.sum((a - 2.5) ** 2) * np.sum((b - 2.5) ** 2))
  assert metrics.spearman([3, 7, 7, 9], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(expected)
  assert expected == pytest.approx(4.5 / np.sqrt(4.5 * 5.0))


def test_compute_metrics_ignores_zero_weight_rows():
  preds = np.array([1, 0, 1, 1])
  labels = np.array([1, 0, 0, 0])
  weights = np.array([1.0, 1.0, 0.0, 0.0])
  out = metrics.compute_metrics(("accuracy", "f1"), preds, labels, weights)
  assert out == {"accuracy": 1.0, "f1": 1.0}
  assert metrics.compute_metrics(["accuracy"], preds, labels) == {"accuracy": 0.5}
  scores = metrics.compute_metrics(("pearson", "spearman"), [0.1, 0.5, 0.9], [1.0, 2.0, 3.0])
  assert scores["pearson"] == pytest.approx(1.0) and scores["spearman"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="bleu"):
    metrics.compute_metrics(["bleu"], preds, labels)

"""GLUE metrics in plain NumPy: accuracy, F1, Matthews correlation, Pearson and Spearman."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def accuracy(preds, labels) -> float:
  """Returns the fraction of predictions equal to their label."""
  return float(np.mean(np.asarray(preds) == np.asarray(labels)))


def f1(preds, labels) -> float:
  """Returns the binary F1 score of the positive class 1 (0.0 when it is never predicted or true)."""
  p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
  tp = np.sum(p & y)
  denom = np.sum(p) + np.sum(y)
  return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(preds, labels) -> float:
  """Returns the binary Matthews correlation (0.0 when undefined, as sklearn does)."""
  p, y = np.asarray(preds) == 1, np.asarray(labels) == 1
  tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
  fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
  denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
  return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson(preds, labels) -> float:
  """Returns the Pearson correlation (0.0 when either side is constant, where it is undefined)."""
  x = np.asarray(preds, np.float64) - np.mean(preds)
  y = np.asarray(labels, np.float64) - np.mean(labels)
  denom = np.sqrt(np.sum(x * x) * np.sum(y * y))
  return float(np.sum(x * y) / denom) if denom else 0.0


def rankdata(x) -> np.ndarray:
  """Returns 1-based ranks of ``x``, tied values sharing their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind="mergesort")
  sorted_x = x[order]
  # Each run of equal values gets the mean of the positions it spans.
  starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
  ends = np.r_[starts[1:], len(x)]
  avg = (starts + ends + 1) / 2.0  # mean of 1-based positions start+1 .. end
  ranks = np.empty(len(x), np.float64)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def spearman(preds, labels) -> float:
  """Returns the Spearman rank correlation (Pearson on average ranks)."""
  return pearson(rankdata(preds), rankdata(labels))


METRICS: dict[str, Callable[..., float]] = {
    "accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef,
    "matthews_corrcoef": matthews_corrcoef, "pearson": pearson, "spearman": spearman,
}


def compute_metrics(names: Sequence[str], preds, labels, weights=None) -> dict[str, float]:
  """Returns ``{name: value}`` over the rows whose weight is nonzero (all rows without weights)."""
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
  preds, labels = np.asarray(preds), np.asarray(labels)
  if weights is not None:
    keep = np.asarray(weights) != 0
    preds, labels = preds[keep], labels[keep]
  return {n: METRICS[n](preds, labels) for n in names}

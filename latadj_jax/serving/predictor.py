"""Serving API: a trained workdir that takes raw texts and a k, a speedup or a latency budget.

The predictor reuses the evaluation path (tokenizer, length buckets, the
compiled-executable cache), so its outputs are eval.py's on the same inputs
and schedules. Each bucket compiles on first use, or all at once in ``warmup()``.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence, Union

import numpy as np

from latadj_jax.data import pipeline, sources
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tasks import classify
from latadj_jax.tuning import offline, targets

Inputs = Union[Sequence[str], Sequence[tuple[str, str]]]


@dataclasses.dataclass(frozen=True)
class Prediction:
  """Model outputs in input order: labels and probabilities, or scores for a regression task."""
  logits: np.ndarray                        # [n, num_labels]
  labels: np.ndarray | None = None          # [n] class ids (classification)
  probabilities: np.ndarray | None = None   # [n, num_labels] softmax (classification)
  scores: np.ndarray | None = None          # [n] (regression)


def to_examples(inputs: Inputs, num_columns: int) -> sources.Examples:
  """Returns unlabeled Examples for texts (one text column) or pairs (two), or raises ValueError."""
  if isinstance(inputs, (str, bytes)):
    raise ValueError("predict takes a list of texts; wrap a single text in a list: predict([text])")
  inputs = list(inputs)
  if num_columns == 1:
    bad = [x for x in inputs if not isinstance(x, str)]
    if bad:
      raise ValueError(f"this model reads one text per example; got {type(bad[0]).__name__} {bad[0]!r}")
    columns = (inputs,)
  else:
    bad = [x for x in inputs if isinstance(x, str) or len(x) != 2
           or not all(isinstance(t, str) for t in x)]
    if bad:
      raise ValueError(f"this model reads text pairs; pass (text_a, text_b) tuples, got {bad[0]!r}")
    columns = ([a for a, _ in inputs], [b for _, b in inputs])
  return sources.Examples(columns, np.full(len(inputs), -1, np.int64))


def softmax(logits: np.ndarray) -> np.ndarray:
  """Returns the row-wise softmax of ``logits`` (float64 internally, for stability)."""
  z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def to_prediction(logits: np.ndarray, is_regression: bool) -> Prediction:
  """Returns the Prediction for logits: scores (regression) or labels and probabilities."""
  if is_regression:
    return Prediction(logits, scores=classify.predictions(logits, True))
  return Prediction(logits, labels=classify.predictions(logits, False),
                    probabilities=softmax(logits))


class Predictor:
  """Predicts labels and probabilities (or regression scores) for raw texts at a chosen speedup.

  Give at most one of ``coeff`` (k, default 1.0 as in eval.py), ``speedup``
  (the expected speedup, eq. 7: each bucket gets the largest k reaching it) or
  ``latency_ms`` (a per-batch budget, from the workdir's calibration table for
  this device and batch size; run ``eval.py --calibrate`` first). An unreachable
  target raises ``targets.TargetError``. Over-long texts are truncated to the
  run's ``max_len``, as in training and evaluation, with a warning.

  >>> predictor = Predictor.from_workdir(workdir, speedup=1.5).warmup()
  >>> out = predictor.predict(["a truly great film", "dull , boring and weak", "we loved it"])
  >>> out.labels.shape, out.probabilities.shape
  ((3,), (3, 2))
  >>> all(c.expected_speedup >= 1.5 for c in predictor.choices.values())
  True
  """

  def __init__(self, restored: offline.Restored, profile: Sequence[float],
               choices: dict[int, targets.Choice], cache: ExecutableCache | None = None):
    self.restored = restored
    self.profile = tuple(profile)
    self.choices = dict(choices)
    self._clf = offline.classifier(restored, cache=cache)

  @classmethod
  def from_workdir(cls, workdir: str | Path, coeff: float | None = None,
                   speedup: float | None = None, latency_ms: float | None = None, *,
                   batch_size: int = 0, profile: str = "",
                   cache: ExecutableCache | None = None) -> "Predictor":
    """Returns a predictor for a trained workdir at k, a speedup target or a latency budget."""
    # Choose first: it needs no weights, so a bad target fails before the model loads.
    choices = offline.choose(workdir, coeff=coeff, speedup=speedup, latency_ms=latency_ms,
                             batch_size=batch_size, profile=profile)
    r, ep = offline.prepare(workdir, batch_size, profile)
    return cls(r, ep, choices, cache)

  @property
  def schedules(self) -> dict[int, tuple[int, ...]]:
    """Returns the keep counts of every bucket."""
    return {b: c.counts for b, c in self.choices.items()}

  @property
  def cache(self) -> ExecutableCache:
    return self._clf.cache

  @property
  def batch_size(self) -> int:
    return self._clf.batch_size

  def describe(self) -> str:
    """Returns the k, keep counts and expected speedup of every bucket, one line each."""
    return targets.format_choices(self.choices, f"{self.restored.run.workdir}: per-bucket schedules")

  def warmup(self) -> "Predictor":
    """Returns self after compiling every bucket's executable (no compile on later calls)."""
    for b, counts in sorted(self.schedules.items()):
      self._clf.executable(b, counts)
    return self

  def encode(self, inputs: Inputs) -> pipeline.Encoded:
    """Returns the tokenized inputs, warning when some were truncated to ``max_len``."""
    task, max_len = self.restored.task, self.restored.run.config.max_len
    enc = pipeline.encode(to_examples(inputs, len(task.text_keys)), self.restored.tokenizer, max_len)
    if enc.num_truncated:
      warnings.warn(f"{enc.num_truncated} of {len(enc)} inputs are longer than max_len = {max_len} "
                    f"tokens and were truncated, as in training and evaluation", stacklevel=3)
    return enc

  def logits(self, inputs: Inputs) -> np.ndarray:
    """Returns the logits of every input, in input order, [n, num_labels]."""
    enc = self.encode(inputs)
    if not len(enc):
      return np.zeros((0, self.restored.task.num_labels), np.float32)
    return dataclasses.replace(self._clf, encoded=enc).predict(self.schedules)

  def predict(self, inputs: Inputs) -> Prediction:
    """Returns labels and probabilities (or regression scores) for texts or (text_a, text_b) pairs."""
    return to_prediction(self.logits(inputs), self.restored.task.is_regression)

"""Sequence classification at any keep counts: per-bucket compiled forwards and the task's metrics.

``Classifier`` runs a classifier over bucketed data at per-bucket schedules
(static shapes: one executable per bucket, batch and keep counts, cached), and
is the classification task's ``Evaluation`` for ``tuning.sweep``. Training
(the dev metric), offline tuning, calibration and serving all predict through it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax import models
from latadj_jax.core import metrics
from latadj_jax.data import pipeline
from latadj_jax.runtime import multihost, timing
from latadj_jax.runtime.executables import ExecutableCache


def _logits_fn(model: models.Model, keep_counts: tuple[int, ...]):
  def logits(params, input_ids, attention_mask, token_type_ids):
    return model.apply(params, models.Batch(input_ids, attention_mask, token_type_ids),
                       keep_counts).logits
  return logits


@dataclasses.dataclass
class Classifier:
  """A sequence classifier ready to evaluate: model, weights, data and the cache.

  It is the classification task's ``Evaluation`` for ``tuning.sweep``: the
  task's metrics at any per-bucket schedules, and one real batch to time.
  """
  model: models.Model
  params: Any
  encoded: pipeline.Encoded
  buckets: tuple[int, ...]
  batch_size: int
  model_id: str
  dtype: str = "float32"
  cache: ExecutableCache = dataclasses.field(default_factory=ExecutableCache)
  metric_names: tuple[str, ...] = ()   # the task's metrics (data.splits), for ``score``
  is_regression: bool = False

  @property
  def num_layers(self) -> int:
    return self.model.num_layers

  @property
  def metrics(self) -> dict[str, str]:
    return {m: "%" for m in self.metric_names}

  def bucket_sizes(self) -> dict[int, int]:
    return self.bucket_counts()

  def score(self, schedules: dict[int, tuple[int, ...]]) -> dict[str, float]:
    """Returns the task's metrics on the data at per-bucket ``schedules`` (none without labels)."""
    preds = predictions(self.predict(schedules), self.is_regression)
    labels = self.encoded.labels
    has_labels = labels is not None and (np.asarray(labels) >= 0).any() or self.is_regression
    return metrics.compute_metrics(self.metric_names, preds, labels) if has_labels else {}

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, timing.Timed]:
    """Returns the compiled forward of the first real batch of ``bucket``, to time."""
    exe = self.executable(bucket, counts)
    batch = next(b for b in self.batches() if b["input_ids"].shape[1] == bucket)
    args = (self.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    return {"latency": timing.Timed(lambda: exe(*args), timing.compiled_flops(exe),
                                    self.batch_size, "examples")}

  def executable(self, bucket: int, counts: tuple[int, ...]) -> jax.stages.Compiled:
    """Returns the compiled forward pass for one bucket and keep-count schedule."""
    key = (self.model_id, bucket, self.batch_size, counts, self.dtype)
    spec = jax.ShapeDtypeStruct((self.batch_size, bucket), jnp.int32)
    lower = lambda: jax.jit(_logits_fn(self.model, counts), **self.model.jit_options()).lower(
        self.params, spec, spec, spec)
    return self.cache.get(key, lower)

  def batches(self, pad_id: int = 0):
    return pipeline.batch_iterator(self.encoded, self.batch_size, self.buckets,
                                   shuffle=False, pad_id=pad_id)

  def predict(self, schedules: dict[int, tuple[int, ...]],
              across_processes: bool = False) -> np.ndarray:
    """Returns the logits of every example, in input order.

    With ``across_processes`` every process must call it (``self.params``
    local to each): each computes every n-th batch and all get every row.
    """
    out, owned = None, np.zeros(len(self.encoded.labels), bool)
    i, n = multihost.part() if across_processes else (0, 1)
    for j, batch in enumerate(self.batches()):
      if j % n != i:
        continue
      exe = self.executable(batch["input_ids"].shape[1], schedules[batch["input_ids"].shape[1]])
      logits = np.asarray(exe(self.params, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"]))
      if out is None:
        out = np.zeros((len(self.encoded.labels), logits.shape[-1]), np.float32)
      real = batch["index"] >= 0
      out[batch["index"][real]] = logits[real]
      owned[batch["index"][real]] = True
    if not across_processes:
      return out
    if out is None:  # this process had no batch: its share is empty, of the same shape
      b = next(iter(schedules))
      spec = jax.ShapeDtypeStruct((self.batch_size, b), jnp.int32)
      width = jax.eval_shape(_logits_fn(self.model, schedules[b]), self.params, spec, spec,
                             spec).shape[-1]
      out = np.zeros((len(self.encoded.labels), width), np.float32)
    return multihost.gather_rows(out, owned)

  def bucket_counts(self) -> dict[int, int]:
    """Returns how many examples fall in each bucket."""
    lengths = [len(ids) for ids in self.encoded.input_ids]
    counts: dict[int, int] = {}
    for n in lengths:
      b = pipeline.bucket_of(n, self.buckets)
      counts[b] = counts.get(b, 0) + 1
    return counts


def predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
  """Returns class ids (argmax), or the regression score."""
  return logits[:, 0] if is_regression else logits.argmax(-1)

"""Elimination profiles: flat, given, or fitted to ACC measured on the data (docs/method.md section 2).

Every run resolves its profile here: training before it starts (stored with
the workdir), and training-free evaluations on their own prompts.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.runtime import multihost


def measure_acc(model: models.Model, params: Any, batches: Sequence[dict]) -> np.ndarray:
  """Returns the mean ACC per layer over the real examples of ``batches`` (no elimination).

  With several processes each measures its share of the batches and all get
  the sum of every batch, added in batch order: the result is bit for bit the
  single-process one, and no example is counted twice.
  """

  @functools.partial(jax.jit, **model.jit_options())
  def layer_acc(params, batch):
    return model.apply(params, batch, options=models.Options(scores=True)).acc

  if not batches:
    raise ValueError("no examples to profile ACC on")
  args = lambda b: (models.Batch.of(b),)
  params = multihost.host_local(params)
  acc_spec = jax.eval_shape(layer_acc, params, *args(batches[0]))
  sums = np.zeros((len(batches), acc_spec.shape[-1]), acc_spec.dtype)
  counts = np.zeros(len(batches), np.int64)
  done = np.zeros(len(batches), bool)
  i, n = multihost.part()
  for j in range(i, len(batches), n):
    acc_BxL = np.asarray(layer_acc(params, *args(batches[j])))
    real = batches[j]["weights"] > 0
    sums[j], counts[j], done[j] = acc_BxL[real].sum(0), int(real.sum()), True
  sums, counts = multihost.gather_rows(sums, done), multihost.gather_rows(counts, done)
  total = 0.0
  for s in sums:
    total = total + s
  if not counts.sum():
    raise ValueError("no examples to profile ACC on")
  return total / int(counts.sum())


def resolve(spec: Any, model: models.Model, params: Any, batches: Callable[[], Sequence[dict]],
            degree: int = 2) -> tuple[tuple[float, ...], schedule.Profile | None]:
  """Returns ``(EP, the measured Profile or None)``: 'flat', 'step<l>@<keep>' or 'v1,...' as
  given; 'acc' (or '') measured with no elimination on ``batches()`` and fitted.

  ``batches`` is called only to measure; each batch holds ``input_ids``, the
  model's other inputs, and ``weights`` (0 for filler rows).
  """
  ep = schedule.parse_profile(spec, model.num_layers)
  if ep is not None:
    return ep, None
  prof = schedule.profile_from_acc(measure_acc(model, params, list(batches())), degree)
  return prof.ep, prof

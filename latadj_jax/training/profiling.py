"""ACC profiling before training (the fitted profile of METHOD.md section 2), and loading the model to train."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import pipeline, splits
from latadj_jax.runtime import multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import plots


def load_model_and_task(config: ml_collections.ConfigDict):
  """Returns ``(Pretrained, tokenizer, task)`` for a run config (hub id or local dir)."""
  import transformers
  task = splits.task_of(config)
  pre = models.from_pretrained(
      config.model, head="classification", seed=config.seed, num_labels=task.num_labels,
      hidden_dropout_prob=config.dropout, attention_probs_dropout_prob=config.dropout,
      dtype=config.dtype, **models.survivor_overrides(config, causal=False))
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(pre.model_dir))
  return pre, tokenizer, task


def measure_acc(module: Any, params: Any, batches: Sequence[dict]) -> np.ndarray:
  """Returns the mean ACC per layer over the real examples of ``batches`` (no elimination).

  With several processes each measures its share of the batches and all get
  the sum of every batch, added in batch order: the result is bit for bit the
  single-process one, and no example is counted twice.
  """

  @jax.jit
  def layer_acc(params, ids, mask, types):
    return module.apply({"params": params}, ids, mask, types, output_scores=True)["acc"]

  if not batches:
    raise ValueError("no examples to profile ACC on")
  args = lambda b: (b["input_ids"], b["attention_mask"], b["token_type_ids"])
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


def resolve_profile(config, workdir: Path, pre, train_enc, buckets, num_layers: int,
                    write: bool) -> tuple[float, ...]:
  """Returns EP: stored (on resume), given in the config, ``init_from``'s, or measured from ACC now.

  ``config.profile``: ``"acc"`` measures, ``"flat"`` or ``"v1,...,vL"`` gives it,
  ``""`` (the default) takes the ``init_from`` workdir's profile, or measures
  when there is none.
  The measurement runs the starting model with no elimination on the first
  ``profile_batches`` shuffled training batches, then fits METHOD.md's curve.
  """
  # Process 0's workdir decides, so every process takes the same branch (measuring is collective).
  stored = multihost.from_main(wd.load_profile(workdir) if multihost.is_main() else None,
                               num_layers)
  if stored is not None:
    return stored
  ep = schedule.parse_profile(config.profile, num_layers)
  if ep is None and not config.profile and config.get("init_from"):
    ep = wd.load_profile(config.init_from)  # stage 2 keeps stage 1's profile unless one is given
  prof = None
  if ep is None:
    batches = []
    for batch in pipeline.batch_iterator(train_enc, config.batch_size, buckets, shuffle=True,
                                         seed=config.seed + 1):
      batches.append(batch)
      if len(batches) >= config.profile_batches:
        break
    acc = measure_acc(pre.module, pre.params, batches)
    prof = schedule.profile_from_acc(acc, config.profile_degree)
    ep = prof.ep
  if write:
    scheds = {b: schedule.keep_counts(b, config.coeff, ep) for b in buckets}
    wd.save_profile(workdir, prof, ep, scheds, config.coeff)
    if prof is not None:
      plots.plot_profile(prof, workdir / "profile.png", title=f"{config.task}: {config.model}")
    print(f"profile EP = {[round(e, 3) for e in ep]}")
    for b, c in scheds.items():
      print(f"  bucket {b}: keep counts {list(c)} (expected speedup "
            f"{schedule.expected_speedup(b, c):.2f}x at coeff {config.coeff:g})")
    if config.coeff < 1 and all(e == 1.0 for e in ep):
      print(f"note: a flat profile still eliminates below coeff 1: coeff {config.coeff:g} keeps "
            f"{config.coeff:g} of the word-vectors in every layer. For no elimination pass "
            f"--config.coeff=1")
  return ep

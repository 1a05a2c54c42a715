"""ACC profiling before training (the fitted profile of docs/method.md section 2), and loading the model to train."""

from __future__ import annotations

import itertools
from pathlib import Path

import ml_collections

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import pipeline, splits
from latadj_jax.runtime import multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import plots, profiles


def load_model_and_task(config: ml_collections.ConfigDict):
  """Returns ``(Pretrained, tokenizer, task)`` for a run config (hub id or local dir)."""
  import transformers
  task = splits.task_of(config)
  pre = models.from_pretrained(config.model, head="classification", seed=config.seed,
                               run_config=config, num_labels=task.num_labels, dtype=config.dtype)
  pre.model = pre.model.with_dropout(config.dropout)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(pre.model_dir))
  return pre, tokenizer, task


def resolve_profile(config, workdir: Path, pre: models.Pretrained, train_enc, buckets,
                    write: bool) -> tuple[float, ...]:
  """Returns EP: stored (on resume), given in the config, ``init_from``'s, or measured from ACC now.

  ``config.profile``: ``"acc"`` measures, ``"flat"`` or ``"v1,...,vL"`` gives it,
  ``""`` (the default) takes the ``init_from`` workdir's profile, or measures
  when there is none.
  The measurement runs the starting model with no elimination on the first
  ``profile_batches`` shuffled training batches, then fits the curve of
  docs/method.md section 2.
  """
  num_layers = pre.model.num_layers
  # Process 0's workdir decides, so every process takes the same branch (measuring is collective).
  stored = multihost.from_main(wd.load_profile(workdir) if multihost.is_main() else None,
                               num_layers)
  if stored is not None:
    return stored
  prof, ep = None, None
  if not config.profile and config.get("init_from"):
    ep = wd.load_profile(config.init_from)  # stage 2 keeps stage 1's profile unless one is given
  if ep is None:
    batches = lambda: itertools.islice(pipeline.batch_iterator(
        train_enc, config.batch_size, buckets, shuffle=True, seed=config.seed + 1),
        config.profile_batches)
    ep, prof = profiles.resolve(config.profile, pre.model, pre.params, batches,
                                config.profile_degree)
  if write:
    scheds = {b: schedule.keep_counts(b, config.coeff, ep) for b in buckets}
    wd.save_profile(workdir, prof, ep, scheds, config.coeff)
    if prof is not None:
      plots.plot_profile(prof, workdir / "profile.png", title=f"{config.get('task', config.run)}: {config.model}")
    print(f"profile EP = {[round(e, 3) for e in ep]}")
    for b, c in scheds.items():
      print(f"  bucket {b}: keep counts {list(c)} (expected speedup "
            f"{schedule.expected_speedup(b, c):.2f}x at coeff {config.coeff:g})")
    if config.coeff < 1 and all(e == 1.0 for e in ep):
      print(f"note: a flat profile still eliminates below coeff 1: coeff {config.coeff:g} keeps "
            f"{config.coeff:g} of the word-vectors in every layer. For no elimination pass "
            f"--config.coeff=1")
  return ep

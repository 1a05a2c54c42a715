"""Offline tuning of a trained workdir: restore once, evaluate at any coefficient."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from latadj_jax import evaluate, models, profiling, report, workdir as wd
from latadj_jax.data import pipeline


@dataclasses.dataclass
class Restored:
  """A trained classifier restored from its workdir, with what evaluating it needs."""
  run: wd.Run
  pre: models.Pretrained
  tokenizer: object
  task: object
  step: int

  @property
  def buckets(self) -> tuple[int, ...]:
    c = self.run.config
    return pipeline.make_buckets(c.max_len, base=tuple(c.buckets))


def restore(workdir: str | Path) -> Restored:
  """Returns the latest checkpoint of a workdir with its model, tokenizer, task and profile."""
  import transformers
  run = wd.load_run(workdir)
  task = profiling.task_of(run.config)
  module, cfg, dummy = models.build(run.hf_config, "classification", num_labels=task.num_labels,
                                    dtype=run.config.dtype)
  abstract = jax.eval_shape(lambda: models.init_params(module, dummy))
  params, step = wd.restore_params(run.workdir, abstract)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.workdir / wd.TOKENIZER))
  pre = models.Pretrained(module, params, cfg, run.hf_config, None, None)
  return Restored(run, pre, tokenizer, task, step)


def parse_coeffs(text: str) -> list[float]:
  """Returns the coefficients of ``"0.8,0.9"``, or raises ValueError naming the bad one."""
  from latadj_jax import schedule
  items = [t for t in text.split(",") if t.strip()]
  if not items:
    raise ValueError("--coeff needs at least one value, e.g. --coeff 0.9 or --coeff 0.8,0.9,1.0")
  return [schedule.validate_coeff(t.strip()) for t in items]


def evaluate_workdir(workdir: str | Path, coeffs: Sequence[float], *, split: str = "validation",
                     batch_size: int = 0, max_examples: int = 0, profile: str = "",
                     time_repeats: int = 10, cache: evaluate.ExecutableCache | None = None) -> list[dict]:
  """Returns the sweep rows for a trained workdir, printing and saving the report."""
  r = restore(workdir)
  config = r.run.config
  with config.unlocked():
    if batch_size:
      config.eval_batch_size = batch_size
  ep = (profiling.parse_profile(profile, r.pre.config.num_hidden_layers) if profile
        else r.run.profile)
  (enc,) = profiling.load_encoded_split(config, r.task, r.tokenizer, split, max_examples)
  print(f"evaluating {r.run.workdir} (step {r.step}) on {split}: {len(enc.labels)} examples")
  return report.sweep_and_report(config, r.pre, r.pre.params, enc, r.buckets, ep, r.task,
                                 r.run.workdir, coeffs=coeffs, cache=cache,
                                 time_repeats=time_repeats)

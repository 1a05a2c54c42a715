"""Offline tuning of a trained workdir: restore once, evaluate at any coefficient."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import pipeline, splits, text
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tasks import classify, lm_eval
from latadj_jax.tuning import report, sweep, targets


def buckets_of(config) -> tuple[int, ...]:
  """Returns a run config's length buckets."""
  return pipeline.make_buckets(config.max_len, base=tuple(config.buckets))


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
    return buckets_of(self.run.config)


def restore(workdir: str | Path, dtype: str = "") -> Restored:
  """Returns the latest checkpoint of a workdir with its model, tokenizer, task and profile.

  ``dtype`` ("float32" or "bfloat16") overrides the run's activation dtype, and
  the parameters are cast to it; results then go to ``eval_results_<dtype>.json``.
  """
  import transformers
  run = wd.load_run(workdir)
  if dtype:
    with run.config.unlocked():
      run.config.dtype = dtype
      run.config.results_suffix = "" if dtype == "float32" else f"_{dtype}"
  task = splits.task_of(run.config)
  model = models.build(run.hf_config, "classification", run_config=run.config,
                       num_labels=task.num_labels, dtype=run.config.dtype)
  params, step = wd.restore_params(run.workdir, model.abstract_params())
  if dtype:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(run.workdir / wd.TOKENIZER))
  pre = models.Pretrained(model, params, run.hf_config)
  return Restored(run, pre, tokenizer, task, step)


def parse_coeffs(text: str) -> list[float]:
  """Returns the coefficients of ``"0.8,0.9"``, or raises ValueError naming the bad one."""
  items = [t for t in text.split(",") if t.strip()]
  if not items:
    raise ValueError("--coeff needs at least one value, e.g. --coeff 0.9 or --coeff 0.8,0.9,1.0")
  return [schedule.validate_coeff(t.strip()) for t in items]


def evaluate_workdir(workdir: str | Path, coeffs: Sequence[float], *, split: str = "validation",
                     batch_size: int = 0, max_examples: int = 0, profile: str = "",
                     time_repeats: int = 10, cache: ExecutableCache | None = None,
                     dtype: str = "") -> list[dict]:
  """Returns the sweep rows for a trained workdir, printing and saving the report."""
  r, ep = prepare(workdir, batch_size, profile, dtype)
  config = r.run.config
  (enc,) = splits.load_encoded_split(config, r.task, r.tokenizer, split, max_examples)
  print(f"evaluating {r.run.workdir} (step {r.step}) on {split}: {len(enc.labels)} examples")
  return report.classifier_sweep(config, r.pre, r.pre.params, enc, r.buckets, ep, r.task,
                                 r.run.workdir, coeffs=coeffs, cache=cache,
                                 time_repeats=time_repeats)


def evaluate_lm_workdir(workdir: str | Path, coeffs: Sequence[float], *, split: str = "validation",
                        batch_size: int = 0, max_examples: int = 0, profile: str = "",
                        time_repeats: int = 10, lambada: str = "",
                        cache: ExecutableCache | None = None) -> list[dict]:
  """Returns the sweep rows of a trained LM workdir (``eval.py``'s LM path), printing and saving them.

  ``max_examples`` caps both the held-out blocks and the last-word passages;
  ``lambada`` defaults to the run config's.
  """
  r = lm_eval.restore(workdir)
  config = r.run.config
  with config.unlocked():
    if batch_size:
      config.eval_batch_size = batch_size
  ep = profile_of(r.run, profile)
  enc = text.load_blocks(config, r.tokenizer, split, max_examples)
  print(f"evaluating {r.run.workdir} (step {r.step}) on {split}: {enc.num_targets:,} target tokens")
  return report.lm_sweep(config, r.model, r.params, enc, ep, r.run.workdir, coeffs=coeffs,
                         model_id=str(r.run.workdir), time_repeats=time_repeats,
                         lambada=lambada or config.get("lambada", ""), tokenizer=r.tokenizer,
                         max_lambada=max_examples, cache=cache)


# --- targets: a speedup or a latency budget instead of k (see targets.py) ---------------------

def profile_of(run: wd.Run, override: str = "") -> tuple[float, ...]:
  """Returns the run's stored profile, or ``override`` ('flat' or 'v1,v2,...') when given."""
  return schedule.parse_profile(override, len(run.profile)) if override else run.profile


def prepare(workdir: str | Path, batch_size: int, profile: str,
            dtype: str = "") -> tuple[Restored, tuple[float, ...]]:
  """Returns the restored workdir (with ``batch_size`` as its eval batch size, if set) and its profile."""
  r = restore(workdir, dtype)
  with r.run.config.unlocked():
    if batch_size:
      r.run.config.eval_batch_size = batch_size
  return r, profile_of(r.run, profile)


def classifier(r: Restored, enc: pipeline.Encoded | None = None,
               cache: ExecutableCache | None = None) -> classify.Classifier:
  """Returns a Classifier over ``enc`` (none: for compiling and timing only) at the run's eval batch size."""
  c = r.run.config
  if enc is None:
    enc = pipeline.Encoded([], [], np.zeros(0, np.int64), 0, c.max_len)
  return classify.Classifier(r.pre.model, r.pre.params, enc, r.buckets, c.eval_batch_size,
                             model_id=str(c.model), dtype=c.dtype,
                             cache=ExecutableCache() if cache is None else cache,
                             metric_names=tuple(r.task.metrics), is_regression=r.task.is_regression)


def choose(workdir: str | Path, *, coeff: float | None = None, speedup: float | None = None,
           latency_ms: float | None = None, batch_size: int = 0,
           profile: str = "") -> dict[int, targets.Choice]:
  """Returns each bucket's schedule for a workdir, from k, a speedup or a latency budget.

  Needs no weights, so an unreachable target fails before the model loads.
  """
  if latency_ms is not None:
    latency_ms = targets.validate_latency_ms(latency_ms)
  run = wd.load_run(workdir)
  ep = profile_of(run, profile)
  table = None
  if latency_ms is not None and speedup is None and coeff is None:
    table = targets.load_calibration(run.workdir, batch_size or run.config.eval_batch_size, ep)
  return targets.choose(buckets_of(run.config), ep, coeff=coeff, speedup=speedup,
                        latency_ms=latency_ms, table=table)


def calibrate_workdir(workdir: str | Path, *, batch_size: int = 0, profile: str = "",
                      points: int = 12, repeats: int = 10,
                      cache: ExecutableCache | None = None) -> Path:
  """Returns the path of the calibration table it measured and wrote into the workdir."""
  if points < 2:
    raise ValueError(f"calibration needs at least 2 schedules per bucket, got {points}")
  r, ep = prepare(workdir, batch_size, profile)
  clf = classifier(r, cache=cache)
  print(f"calibrating {r.run.workdir} on {timing.device_name()}, batch size {clf.batch_size}: "
        f"about {points} schedules per bucket {list(r.buckets)}")
  table = targets.calibrate(clf, ep, int(r.run.hf_config["vocab_size"]), points, repeats)
  path = targets.save_calibration(r.run.workdir, table)
  print(targets.format_calibration(table))
  print(f"wrote {path}")
  return path


def target_title(speedup: float | None, latency_ms: float | None, batch_size: int) -> str:
  if speedup is not None:
    return f"expected speedup target {speedup:g}x (eq. 7): the largest k that reaches it, per bucket"
  return (f"latency budget {latency_ms:g} ms per batch of {batch_size}: the least elimination "
          f"whose calibrated latency fits, per bucket")


def evaluate_choices(r: Restored, choices: dict[int, targets.Choice], enc: pipeline.Encoded,
                     *, time_repeats: int = 10, cache: ExecutableCache | None = None
                     ) -> dict:
  """Returns the sweep row (metrics, expected and measured speedup) of per-bucket schedules."""
  clf = classifier(r, enc, cache)
  main = sweep.main_bucket(clf.bucket_sizes())
  plan = (choices[main].k, {b: c.counts for b, c in choices.items()})
  (row,) = sweep.sweep(clf, [plan], repeats=time_repeats, progress=False)
  row["calibrated_latency_ms"] = choices[main].latency_ms
  row["choices"] = {str(b): c.to_json() for b, c in sorted(choices.items())}
  return row


def evaluate_target(workdir: str | Path, *, speedup: float | None = None,
                    latency_ms: float | None = None, split: str = "validation", batch_size: int = 0,
                    max_examples: int = 0, profile: str = "", time_repeats: int = 10,
                    cache: ExecutableCache | None = None) -> list[dict]:
  """Returns the report row for a speedup target or a latency budget, printing and saving it."""
  if (speedup is None) == (latency_ms is None):
    raise ValueError("give exactly one of speedup and latency_ms")
  choices = choose(workdir, speedup=speedup, latency_ms=latency_ms, batch_size=batch_size,
                   profile=profile)
  r, ep = prepare(workdir, batch_size, profile)
  batch = r.run.config.eval_batch_size
  print(targets.format_choices(choices, target_title(speedup, latency_ms, batch)))
  (enc,) = splits.load_encoded_split(r.run.config, r.task, r.tokenizer, split, max_examples)
  print(f"evaluating {r.run.workdir} (step {r.step}) on {split}: {len(enc.labels)} examples")
  cache = ExecutableCache() if cache is None else cache
  row = evaluate_choices(r, choices, enc, time_repeats=time_repeats, cache=cache)
  row["target"] = {"speedup": speedup} if speedup is not None else {"latency_ms": latency_ms,
                                                                    "batch_size": batch}
  print(sweep.format_table([row], {m: "%" for m in r.task.metrics}))
  print(cache.stats)
  report.write_results([row], r.run.workdir, {
      "device": timing.device_name(), "task": r.task.name, "model": str(r.run.config.model),
      "profile": list(ep), "cache": vars(cache.stats)})
  return [row]

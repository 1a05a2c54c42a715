"""Fine-tuning a classifier with Sort+Eliminate layers: ``train_and_evaluate(config, workdir)``.

One keep-count schedule per bucket at ``config.coeff``, or anytime training
over ``config.train_coeffs`` (``training.anytime``), optionally from a stage-1
workdir (``config.init_from``), with the checkpoint chosen by the mean dev
metric over ``config.select_coeffs``. The loop itself is ``training.loop``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from latadj_jax import models
from latadj_jax.core import metrics, schedule
from latadj_jax.data import pipeline, splits
from latadj_jax.runtime import multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.training import anytime, profiling
from latadj_jax.training.loop import (
  SELECT_KEY,
  Loop,
  check_batch_size,
  jit_step,
  maybe_initialize_distributed,
  run_loop,
  shard_batch,
)
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tasks import classify
from latadj_jax.tuning import report, sweep


def loss_sums(params, batch, rng, *, model, keep_counts, is_regression) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted per-example losses, sum of weights) for one (local) batch."""
  logits = model.apply(params, models.Batch.of(batch), keep_counts, options=models.Options(train=True),
                       rng=rng).logits
  per_example = anytime.label_loss(logits, batch["labels"], is_regression)
  return jnp.sum(per_example * batch["weights"]), jnp.sum(batch["weights"])


def single_terms(params, batch, rng, frozen=None, *, model, keep_counts,
                 is_regression) -> dict[str, jax.Array]:
  """Returns the one loss term of training at a single coefficient."""
  return {"label": loss_sums(params, batch, rng, model=model, keep_counts=keep_counts,
                             is_regression=is_regression)[0]}


def compiled_step(mesh, model, keep_counts, is_regression):
  """Returns the jitted, data-parallel train step for one keep-count schedule (state donated)."""
  return jit_step(mesh, functools.partial(single_terms, model=model, keep_counts=keep_counts,
                                           is_regression=is_regression))


def compiled_anytime_step(mesh, model, spec: anytime.AnytimeSpec,
                          schedules: dict[float, tuple[int, ...]], sampled: tuple[float, ...],
                          is_regression):
  """Returns the jitted anytime train step of one bucket and one draw of middle coefficients."""
  return jit_step(mesh, functools.partial(anytime.loss_terms, model=model, spec=spec,
                                           schedules=schedules, sampled=sampled,
                                           is_regression=is_regression))


def make_anytime_step(mesh, *, model, spec: anytime.AnytimeSpec, profile, buckets,
                      is_regression, seed: int) -> Callable:
  """Returns step(state, host batch, rng) for anytime training (see ``latadj_jax.training.anytime``).

  One executable per (bucket, draw of middle coefficients), compiled on first
  use (``anytime.dispatcher``).
  """
  schedules = {b: {k: schedule.keep_counts(b, k, profile) for k in spec.coeffs} for b in buckets}
  return anytime.dispatcher(
      spec, seed, lambda bucket, sampled: compiled_anytime_step(mesh, model, spec, schedules[bucket],
                                                               sampled, is_regression),
      lambda batch: shard_batch(batch, mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains with elimination at ``config.coeff``, checkpointing to ``workdir``; returns final metrics.

  Rerunning with the same workdir resumes from the latest checkpoint.
  """
  maybe_initialize_distributed()
  workdir = Path(workdir)
  schedule.validate_coeff(config.coeff)
  pre, tokenizer, task = profiling.load_model_and_task(config)
  if config.get("init_from"):  # stage 2 starts from a fine-tuned (stage-1) workdir
    pre.params = load_init(config.init_from, pre, task)
  train_enc, eval_enc = splits.load_encoded(config, task, tokenizer)
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  is_main = jax.process_index() == 0
  if is_main:
    wd.save_metadata(workdir, config, pre.hf_config, tokenizer)
  ep = profiling.resolve_profile(config, workdir, pre, train_enc, buckets, is_main)
  schedules = sweep.schedules_for(config.coeff, ep, buckets)
  check_batch_size(config.batch_size)

  spec = anytime.spec_from_config(config)
  frozen = None
  if spec is not None and spec.teacher == "frozen":
    if not config.get("init_from"):
      raise ValueError("--config.teacher=frozen distils from the stage-1 model: set "
                       "--config.init_from=STAGE1_WORKDIR (or use --config.teacher=full)")
    frozen = jax.tree.map(jnp.copy, pre.params)  # its own buffers: the live params are donated
  if spec is not None:
    make_step = functools.partial(make_anytime_step, model=pre.model, spec=spec, profile=ep,
                                  buckets=buckets, is_regression=task.is_regression,
                                  seed=config.seed)
  else:
    def make_step(mesh):
      steps = {b: compiled_step(mesh, pre.model, schedules[b], task.is_regression)
               for b in buckets}
      return lambda state, batch, rng: steps[batch["input_ids"].shape[1]](
          state, shard_batch(batch, mesh), rng)

  loop = Loop(
      batches=lambda epoch, start: pipeline.batch_iterator(
          train_enc, config.batch_size, buckets, shuffle=True, seed=config.seed, epoch=epoch,
          start_batch=start, pad_id=tokenizer.pad_token_id or 0),
      make_step=make_step,
      count=lambda batch: int(batch["weights"].sum()),
      unit="examples",
      evaluate=functools.partial(evaluate_with_selection, config, pre, eval_enc, buckets, ep,
                                 task, ExecutableCache()),
      extra_log=lambda out, batch: {k: float(v) for k, v in out.items() if k != "loss"})
  steps_per_epoch = pipeline.num_batches(train_enc, config.batch_size, buckets)
  state, eval_metrics = run_loop(config, workdir, pre.params, steps_per_epoch, loop, is_main,
                                 frozen=frozen)
  if config.eval_coeffs and is_main:  # timed on process 0's device alone
    report.classifier_sweep(config, pre, multihost.host_local(state.params), eval_enc, buckets,
                            ep, task, workdir)
  multihost.wait_for_all("train_and_evaluate: done")
  return eval_metrics


def load_init(init_from: str, pre, task) -> Any:
  """Returns the parameters of ``init_from``'s chosen checkpoint, checked against the model ``pre``."""
  run = wd.load_run(init_from)
  shape_keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size")
  differ = {k: (run.hf_config.get(k), pre.hf_config.get(k)) for k in shape_keys
            if run.hf_config.get(k) != pre.hf_config.get(k)}
  stage1_labels = splits.task_of(run.config).num_labels
  if stage1_labels != task.num_labels:
    differ["num_labels"] = (stage1_labels, task.num_labels)
  if differ:
    raise wd.WorkdirError(f"--config.init_from={init_from} holds another model: "
                          + ", ".join(f"{k} {a} there, {b} here" for k, (a, b) in differ.items())
                          + f". Set --config.model to that run's model ({run.config.model})")
  params, step = wd.restore_params(run.workdir, pre.params)
  print(f"init_from {run.workdir} (step {step})")
  return params


def evaluate_at(config, pre, params, eval_enc, buckets, ep, task, coeff: float | None = None,
                cache: ExecutableCache | None = None) -> dict[str, float]:
  """Returns the task metrics on the eval set at ``coeff`` (default: the training one); all processes call it."""
  clf = classify.Classifier(pre.model, multihost.host_local(params), eval_enc, buckets,
                            config.eval_batch_size, model_id=str(config.model), dtype=config.dtype,
                            **({"cache": cache} if cache is not None else {}))
  coeff = config.coeff if coeff is None else coeff
  logits = clf.predict(sweep.schedules_for(coeff, ep, buckets), across_processes=True)
  preds = classify.predictions(logits, task.is_regression)
  return metrics.compute_metrics(task.metrics, preds, eval_enc.labels)


def evaluate_with_selection(config, pre, eval_enc, buckets, ep, task, cache,
                            params) -> dict[str, float]:
  """Returns the metrics at the training coefficient and, with ``select_coeffs``, the k-grid mean.

  The first task metric at each k of ``config.select_coeffs`` is added as
  ``<metric>@<k>`` and their mean as ``SELECT_KEY``, which picks the kept
  checkpoint (DynaBERT and once-for-all choose by the mean over sub-models).
  """
  out = evaluate_at(config, pre, params, eval_enc, buckets, ep, task, cache=cache)
  grid = [schedule.validate_coeff(v) for v in str(config.get("select_coeffs", "")).split(",")
          if v.strip()]
  if grid:
    name = task.metrics[0]
    per_k = {f"{name}@{k:g}": evaluate_at(config, pre, params, eval_enc, buckets, ep, task, k,
                                          cache)[name] for k in grid}
    out.update(per_k)
    out[SELECT_KEY] = sum(per_k.values()) / len(per_k)
  return out

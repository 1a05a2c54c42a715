"""Causal language-model training with Sort+Eliminate: ``train_and_evaluate`` for ``run = "lm"``.

With elimination, a decoder returns hidden states only for the positions that
survive every layer, with their original positions. A survivor at original
position ``p`` predicts the token at ``p + 1``, so the loss is the mean
next-token cross-entropy over the survivors that have a real target. The
eliminated positions get no loss of their own; they still feed the survivors
as keys in the layers before they go.

The loop reuses the classifier's machinery rather than a copy of it: the
optimizer and its schedule, the ``'data'`` mesh, orbax checkpoints in the
workdir (resume by rerunning), the metric logger, the NaN guard, and ACC
profiling with the profile fit (``profiling.resolve_profile``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from latadj_jax import models
from latadj_jax.core import schedule
from latadj_jax.data import pipeline, text
from latadj_jax.runtime import multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import lm_eval
from latadj_jax.training import anytime, loop, profiling
from latadj_jax.tuning import report

BATCH_KEYS = ("input_ids", "attention_mask", "targets", "target_weights")


# --- the loss -----------------------------------------------------------------------------------
def loss_sums(params, batch: dict, rng, *, model, keep_counts,
              deterministic: bool = False) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of survivor NLLs, number of scored survivors) for one (local) batch."""
  out = model.apply(params, models.Batch.of(batch), keep_counts,
                    options=models.Options(train=not deterministic),
                    rng=None if deterministic else rng)
  nll_BxK, w_BxK = lm_eval.survivor_nll(out.logits, out.positions, out.mask,
                                        batch["targets"], batch["target_weights"])
  return jnp.sum(nll_BxK), jnp.sum(w_BxK)


def train_step(state: loop.TrainState, batch: dict, rng: jax.Array, *, model, keep_counts,
               axis: str = "data") -> tuple[loop.TrainState, dict]:
  """Returns the updated state and the global mean survivor loss; runs per device in ``shard_map``.

  Each device divides its NLL sum by the global count of scored survivors, so
  the (implicitly summed) gradient is that of the global mean, as in
  ``loop.train_step``.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(axis))

  def loss_fn(params):
    total, count = loss_sums(params, batch, rng, model=model, keep_counts=keep_counts)
    # Which positions survive is discrete: the count carries no gradient.
    count = jax.lax.psum(jax.lax.stop_gradient(count), axis)
    return total / jnp.maximum(count, 1.0), count

  (loss, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return state.apply_gradients(grads=grads), {"loss": jax.lax.psum(loss, axis), "scored": count}


def anytime_loss_sums(params, batch: dict, rng, *, model, spec: anytime.AnytimeSpec,
                      schedules: dict[float, tuple[int, ...]], sampled: tuple[float, ...]
                      ) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Returns {term: (loss sum, scored count)} of one (local) batch for anytime LM training.

  The teacher is the live model with no elimination, on the next-token labels
  (``teacher="full"``). Each student (``spec.students``) learns the teacher's
  next-token distribution at its own survivors, ``T^2 KL``, plus
  ``student_label_weight`` times its survivor NLL; each term is a mean over
  the positions it scores.
  """
  def run(counts, i: int, dropout: bool):
    return model.apply(params, models.Batch.of(batch), counts,
                       options=models.Options(train=dropout),
                       rng=jax.random.fold_in(rng, i) if dropout else None)

  full = run(None, 0, dropout=True)
  nll, w = lm_eval.survivor_nll(full.logits, full.positions, full.mask,
                                batch["targets"], batch["target_weights"])
  terms = {"label": (jnp.sum(nll), jnp.sum(w))}
  teacher_BxNxV = jax.lax.stop_gradient(full.logits)  # every position: nothing eliminated
  for i, (name, k) in enumerate(spec.students(sampled), start=1):
    out = run(schedules[k], i, dropout=spec.student_dropout)
    nll_BxK, w_BxK = lm_eval.survivor_nll(out.logits, out.positions, out.mask,
                                          batch["targets"], batch["target_weights"])
    at_BxKxV = jnp.take_along_axis(teacher_BxNxV, out.positions[..., None], axis=1)
    per = spec.distill_weight * anytime.distill_loss(at_BxKxV, out.logits, False,
                                                     spec.temperature)
    if spec.student_label_weight:
      per = per + spec.student_label_weight * nll_BxK
    terms[name] = (jnp.sum(per * w_BxK), jnp.sum(w_BxK))
  return terms


def anytime_train_step(state: loop.TrainState, batch: dict, rng: jax.Array, *, model, spec,
                       schedules, sampled, axis: str = "data") -> tuple[loop.TrainState, dict]:
  """Returns the updated state and each term's global mean; runs per device in ``shard_map``."""
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(axis))

  def loss_fn(params):
    terms = anytime_loss_sums(params, batch, rng, model=model, spec=spec, schedules=schedules,
                              sampled=sampled)
    means = {name: total / jnp.maximum(jax.lax.psum(jax.lax.stop_gradient(count), axis), 1.0)
             for name, (total, count) in terms.items()}
    return sum(means.values()), means

  (loss, means), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  logs = {f"loss_{name}": jax.lax.psum(v, axis) for name, v in means.items()}
  return state.apply_gradients(grads=grads), {"loss": jax.lax.psum(loss, axis), **logs}


def make_anytime_step(mesh, model, spec: anytime.AnytimeSpec, profile, block: int, seed: int):
  """Returns step(state, host batch, rng): one executable per draw of middle coefficients."""
  if spec.teacher != "full":
    raise ValueError(f"anytime LM training takes --config.teacher=full (the model with no "
                     f"elimination, on the labels), got {spec.teacher!r}")
  schedules = {k: schedule.keep_counts(block, k, profile) for k in spec.coeffs}
  build = lambda bucket, sampled: loop.jit_data_parallel(mesh, functools.partial(
      anytime_train_step, model=model, spec=spec, schedules=schedules, sampled=sampled))
  return anytime.dispatcher(spec, seed, build, lambda batch: shard_batch(batch, mesh))


def compiled_step(mesh, model, keep_counts):
  """Returns the jitted, data-parallel LM train step for one keep-count schedule (state donated)."""
  return loop.jit_data_parallel(mesh, functools.partial(train_step, model=model,
                                                         keep_counts=keep_counts))


def shard_batch(batch: dict, mesh) -> dict:
  """Returns the LM batch's arrays sharded over ``'data'``; each process feeds only its rows."""
  return multihost.feed(batch, mesh, BATCH_KEYS)


def perplexity_at(config, model, params, eval_enc: text.LMEncoded,
                  counts: tuple[int, ...]) -> dict[str, float]:
  """Returns ``lm_eval.perplexity_at``'s metrics, each process scoring every n-th batch (all call it).

  The per-batch sums are added in batch order, so the result is the
  single-process one exactly, and no block is scored twice.
  """
  ev = lm_eval.LMEvaluator(model, multihost.host_local(params), eval_enc, config.eval_batch_size,
                           "train", config.dtype)
  exe = ev.executable(counts)
  num = pipeline.num_batches(eval_enc, ev.batch_size, (ev.block_size,))
  sums, done = np.zeros((num, 2), np.float64), np.zeros(num, bool)
  i, n = multihost.part()
  for j, batch in enumerate(ev.batches()):
    if j % n == i:
      s, c = exe(ev.params, *ev.args(batch))
      sums[j], done[j] = (float(s), float(c)), True
  nll, scored = 0.0, 0.0
  for s, c in multihost.gather_rows(sums, done):
    nll, scored = nll + s, scored + c
  mean = nll / max(scored, 1.0)
  return {"perplexity": math.exp(mean), "fraction_scored": scored / eval_enc.num_targets}


# --- model, data and profile --------------------------------------------------------------------
def scratch_hf_config(shape: Any, vocab_size: int, eos_id: int | None) -> dict:
  """Returns an HF-style config dict for a randomly initialised model of ``shape`` (default GPT-2)."""
  return {"model_type": "gpt2", **dict(shape), "vocab_size": int(vocab_size),
          "bos_token_id": eos_id, "eos_token_id": eos_id}


def load_model(config: ml_collections.ConfigDict) -> tuple[models.Pretrained, Any]:
  """Returns ``(Pretrained, tokenizer)``: HF or GGUF weights (GPT-2, Llama family), or
  (``model=""``) a random GPT-2 of ``config.gpt2``."""
  if config.model:
    pre = models.from_pretrained(config.model, head="lm", seed=config.seed, run_config=config,
                                 dtype=config.dtype)
    tokenizer = lm_eval.load_tokenizer(pre, config.tokenizer)
  else:
    tokenizer = text.load_tokenizer(config.tokenizer, None)
    hf_config = scratch_hf_config(config.gpt2, len(tokenizer), tokenizer.eos_token_id)
    model = models.build(hf_config, "lm", run_config=config, dtype=config.dtype)
    pre = models.Pretrained(model, model.init(config.seed), hf_config)
  pre.model = pre.model.with_dropout(config.dropout)
  if len(tokenizer) > pre.model.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                     f"{pre.model.vocab_size}; use the model's own (--config.tokenizer=model)")
  if config.block_size > pre.model.max_positions:
    raise ValueError(f"block_size {config.block_size} exceeds the model's "
                     f"{pre.model.max_positions} positions; lower --config.block_size")
  return pre, tokenizer


def resolve_profile(config, workdir: Path, pre: models.Pretrained, train_enc: text.LMEncoded,
                    write: bool) -> tuple[float, ...]:
  """Returns EP (stored, given, or measured from causal ACC on training blocks) via the classifier's code."""
  return profiling.resolve_profile(config, workdir, pre, train_enc, (config.block_size,), write)


# --- the loop -----------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains the LM with elimination at ``config.coeff``, checkpointing to ``workdir``; returns eval metrics.

  Rerunning with the same workdir resumes from the latest checkpoint.
  """
  loop.maybe_initialize_distributed()
  workdir = Path(workdir)
  schedule.validate_coeff(config.coeff)
  pre, tokenizer = load_model(config)
  train_enc = text.load_blocks(config, tokenizer, "train", config.max_train_examples)
  eval_enc = text.load_blocks(config, tokenizer, "validation", config.max_eval_examples)
  is_main = jax.process_index() == 0
  if is_main:
    wd.save_metadata(workdir, config, pre.hf_config, tokenizer)
  ep = resolve_profile(config, workdir, pre, train_enc, is_main)
  block = config.block_size
  counts = schedule.keep_counts(block, config.coeff, ep)
  loop.check_batch_size(config.batch_size)
  pad_id = tokenizer.pad_token_id or 0

  spec = anytime.spec_from_config(config)

  def make_step(mesh):
    if spec is not None:
      return make_anytime_step(mesh, pre.model, spec, ep, block, config.seed)
    step_fn = compiled_step(mesh, pre.model, counts)
    return lambda state, batch, rng: step_fn(state, shard_batch(batch, mesh), rng)

  def step_log(out, batch):
    # The last step's share of target positions that survived to be scored.
    if "scored" not in out:  # anytime: each term's loss instead (its schedule's own share)
      return {k: float(v) for k, v in out.items() if k.startswith("loss_")}
    return {"scored_fraction": float(out["scored"]) / max(float(batch["target_weights"].sum()), 1.0)}

  lm_loop = loop.Loop(
      batches=lambda epoch, start: text.lm_batches(
          train_enc, config.batch_size, shuffle=True, seed=config.seed, epoch=epoch,
          start_batch=start, pad_id=pad_id),
      make_step=make_step,
      count=lambda batch: int(batch["target_weights"].sum()),
      unit="tokens",
      evaluate=lambda params: perplexity_at(config, pre.model, params, eval_enc, counts),
      extra_log=step_log)
  steps_per_epoch = pipeline.num_batches(train_enc, config.batch_size, (block,))
  state, eval_metrics = loop.run_loop(config, workdir, pre.params, steps_per_epoch, lm_loop,
                                       is_main)
  if config.eval_coeffs and is_main:  # timed on process 0's device alone
    report.lm_sweep(config, pre.model, multihost.host_local(state.params), eval_enc, ep, workdir,
                    model_id=str(config.model or "scratch"), lambada=config.get("lambada", ""),
                    tokenizer=tokenizer)
  multihost.wait_for_all("lm.train_and_evaluate: done")
  return eval_metrics

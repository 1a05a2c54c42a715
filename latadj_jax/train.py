"""Fine-tuning with Sort+Eliminate layers: ``train_and_evaluate(config, workdir)``.

Data parallel over every device of every host: a ``'data'`` mesh axis and
``jax.shard_map``; each device takes a slice of the global batch and the
gradients are summed across the axis. Keep counts are static per bucket, so
each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state
from jax.sharding import NamedSharding, PartitionSpec as P

from latadj_jax import anytime, evaluate, multihost, profiling, report, schedule, workdir as wd
from latadj_jax.data import pipeline


class TrainState(train_state.TrainState):
  # A frozen teacher's parameters (anytime ``teacher="frozen"``): read by the loss, never
  # differentiated, no optimizer state, not checkpointed (reloaded from ``init_from``).
  frozen: Any = None


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Returns AdamW with linear warmup then linear decay; no weight decay on biases and LayerNorm.

  With ``config.max_grad_norm > 0`` the gradient is first clipped to that
  global norm, as HF's ``Trainer`` does (its default is 1.0).
  """
  warmup = int(config.warmup_ratio * total_steps)
  lr = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
                             optax.linear_schedule(config.learning_rate, 0.0,
                                                   max(total_steps - warmup, 1))], [warmup])
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key not in ("bias", "scale"), params)
  adamw = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay,
                      mask=decay_mask)
  clip = config.get("max_grad_norm", 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


def loss_sums(params, batch, rng, *, module, keep_counts, is_regression) -> tuple[jax.Array, jax.Array]:
  """Returns (sum of weighted per-example losses, sum of weights) for one (local) batch."""
  logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], keep_counts=keep_counts, deterministic=False,
                        rngs={"dropout": rng})["logits"]
  per_example = anytime.label_loss(logits, batch["labels"], is_regression)
  return jnp.sum(per_example * batch["weights"]), jnp.sum(batch["weights"])


def single_terms(params, batch, rng, frozen=None, *, module, keep_counts,
                 is_regression) -> dict[str, jax.Array]:
  """Returns the one loss term of training at a single coefficient."""
  return {"label": loss_sums(params, batch, rng, module=module, keep_counts=keep_counts,
                             is_regression=is_regression)[0]}


def train_step(state: TrainState, batch: dict, rng: jax.Array, *, terms: Callable,
               axis: str = "data") -> tuple[TrainState, dict]:
  """Returns the updated state and the global losses; runs per device inside ``shard_map``.

  ``terms(params, batch, rng, frozen)`` returns named sums of weighted
  per-example losses; the step minimises their total. ``frozen`` (the state's
  frozen teacher, or None) is a constant of the loss: it gets no gradient. Dividing each device's sums by the
  global weight (rather than averaging per-device means) keeps the result exact
  when padded rows (weight 0) are spread unevenly across devices: it equals the
  single-device step.
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), jax.lax.axis_index(axis))
  total_weight = jnp.maximum(jax.lax.psum(jnp.sum(batch["weights"]), axis), 1.0)

  def loss_fn(params):
    parts = {name: v / total_weight
             for name, v in terms(params, batch, rng, state.frozen).items()}
    return sum(parts.values()), parts

  (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # No explicit psum of grads: the params are replicated (unvarying over ``axis``),
  # so under shard_map's varying-type checks their gradient is already summed over
  # the axis (the transpose of the implicit pvary is a psum). Summing again would
  # scale it by the device count.
  out = {"loss": jax.lax.psum(loss, axis)}
  if len(parts) > 1:
    out.update({f"loss_{name}": jax.lax.psum(v, axis) for name, v in parts.items()})
  return state.apply_gradients(grads=grads), out


def _jit_step(mesh, terms: Callable):
  return jit_data_parallel(mesh, functools.partial(train_step, terms=terms))


def jit_data_parallel(mesh, fn: Callable):
  """Returns ``fn(state, batch, rng)`` jitted over the ``'data'`` axis (state donated).

  The state and outputs are replicated, the batch is split over ``'data'``.
  """
  # Outputs replicated exactly as ``_replicate`` places the inputs (``P()``): left to
  # itself, jit returns ``P(None, ...)``, an equal placement with another cache key,
  # and the second step would compile again.
  replicated = NamedSharding(mesh, P())
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("data"), P()),
                               out_specs=(P(), P()), check_vma=True), donate_argnums=0,
                 out_shardings=(replicated, replicated))


def compiled_step(mesh, module, keep_counts, is_regression):
  """Returns the jitted, data-parallel train step for one keep-count schedule (state donated)."""
  return _jit_step(mesh, functools.partial(single_terms, module=module, keep_counts=keep_counts,
                                           is_regression=is_regression))


def compiled_anytime_step(mesh, module, spec: anytime.AnytimeSpec,
                          schedules: dict[float, tuple[int, ...]], sampled: tuple[float, ...],
                          is_regression):
  """Returns the jitted anytime train step of one bucket and one draw of middle coefficients."""
  return _jit_step(mesh, functools.partial(anytime.loss_terms, module=module, spec=spec,
                                           schedules=schedules, sampled=sampled,
                                           is_regression=is_regression))


def make_mesh() -> jax.sharding.Mesh:
  """Returns a 1-D ``'data'`` mesh over every device of every host."""
  return jax.make_mesh((jax.device_count(),), ("data",))


def shard_batch(batch: dict, mesh) -> dict:
  """Returns the global batch as arrays sharded over ``'data'``; each process feeds only its rows."""
  return multihost.feed(batch, mesh, ("input_ids", "attention_mask", "token_type_ids", "labels",
                                      "weights"))


def maybe_initialize_distributed() -> None:
  """Starts JAX's distributed runtime when launched as one of several processes.

  It reads ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (``LATADJ_MULTIHOST=1``: JAX's cluster auto-detection);
  see ``latadj_jax.multihost`` and ``python -m latadj_jax.launch``.
  """
  multihost.initialize_from_env()


def _replicate(tree, mesh):
  return multihost.replicate(tree, mesh)


# The eval metric that chooses the kept checkpoint: the mean dev metric over ``select_coeffs``.
SELECT_KEY = "mean_over_k"


@dataclasses.dataclass(frozen=True)
class Loop:
  """What differs between the classifier's and the LM's training loops; ``run_loop`` does the rest."""
  batches: Callable[[int, int], Iterable[dict]]  # (epoch, start batch) -> host batches
  make_step: Callable[[Any], Callable]           # mesh -> step(state, host batch, rng) -> (state, out)
  count: Callable[[dict], int]                   # units a batch holds, for the rate
  unit: str                                      # "examples" or "tokens": logged as <unit>_per_s
  evaluate: Callable[[Any], dict]                # params -> eval metrics at config.coeff
  extra_log: Callable[[dict, dict], dict] = lambda out, batch: {}  # (step output, batch) -> metrics


def check_batch_size(batch_size: int) -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over every device."""
  if batch_size % jax.device_count():
    raise ValueError(f"batch_size {batch_size} must be a multiple of the {jax.device_count()} "
                     f"devices; set --config.batch_size")


def run_loop(config: ml_collections.ConfigDict, workdir: Path, apply_fn, params,
             steps_per_epoch: int, loop: Loop, is_main: bool,
             frozen: Any = None) -> tuple[TrainState, dict]:
  """Trains data-parallel with logging, atomic checkpoints, resume and per-epoch eval.

  Returns the final state and the last eval metrics. Rerunning with the same
  workdir resumes from the latest checkpoint. Evaluates each epoch, every
  ``config.eval_every`` steps when set, and at the end. When the eval metrics
  hold ``SELECT_KEY`` (the mean dev metric over a k grid), the best-scoring
  parameters are kept apart (``workdir.save_best``) and ``eval.py`` takes them.
  """
  total_steps = steps_per_epoch * config.num_epochs
  if config.max_steps > 0:
    total_steps = min(total_steps, config.max_steps)
  mesh = make_mesh()
  state = TrainState.create(apply_fn=apply_fn, params=params,
                            tx=make_optimizer(config, total_steps), frozen=frozen)
  manager = wd.checkpoint_manager(workdir, config.keep_checkpoints)
  best_manager, best = None, wd.load_best(workdir)
  # Replicate first: orbax then restores straight onto every process's devices,
  # whatever the process count of the run that saved it.
  state = _replicate(state, mesh)
  if manager.latest_step() is not None:
    state = _replicate(wd.restore_state(manager, state), mesh)
    print(f"resumed from step {int(state.step)} in {workdir}")
  step_fn = loop.make_step(mesh)
  rng = jax.random.PRNGKey(config.seed)
  logger = report.MetricLogger(workdir, enabled=is_main)
  step = int(state.step)
  last_good = manager.latest_step()
  bar = report.progress(total_steps, step, "train", enabled=config.progress and is_main)
  t_log, done = time.perf_counter(), 0
  eval_metrics: dict[str, Any] = {}
  pending = None
  try:
    while step < total_steps:
      epoch, start = divmod(step, steps_per_epoch)
      for batch in loop.batches(epoch, start):
        state, out = step_fn(state, batch, rng)
        pending, step = out, step + 1
        done += loop.count(batch)
        bar.update(1)
        if step % config.log_every == 0 or step == total_steps:
          loss = _check_finite(pending["loss"], step, last_good, workdir)
          rate = done / (time.perf_counter() - t_log)
          bar.set_postfix(loss=f"{loss:.4f}", **{f"{loop.unit}_s": f"{rate:.1f}"})
          logger.write(step, {"loss": loss, f"{loop.unit}_per_s": rate,
                              **loop.extra_log(pending, batch)})
          t_log, done = time.perf_counter(), 0
        if step % config.checkpoint_every == 0 or step == total_steps or step % steps_per_epoch == 0:
          _check_finite(pending["loss"], step, last_good, workdir)
          wd.save_checkpoint(manager, step, state)
          last_good = step
        eval_every = config.get("eval_every", 0)
        if (step % steps_per_epoch == 0 and config.eval_every_epoch or step == total_steps
            or eval_every and step % eval_every == 0):
          eval_metrics = loop.evaluate(state.params)
          logger.write(step, {f"eval_{k}": v for k, v in eval_metrics.items()})
          score = eval_metrics.get(SELECT_KEY)
          if score is not None and (best is None or score > best["score"]):
            best = {"step": step, "score": score, "metrics": eval_metrics}
            best_manager = best_manager or wd.checkpoint_manager(workdir, 1, wd.BEST)
            wd.save_best(best_manager, workdir, state.params, best, write=is_main)
          if is_main:
            scores = json.dumps({k: round(v, 4) for k, v in eval_metrics.items()})
            bar.write(f"step {step} (epoch {step / steps_per_epoch:.2f}) eval at coeff "
                      f"{config.coeff:g}: {scores}")
        if step >= total_steps:
          break
  finally:
    # A pending async save must land even when the run is interrupted.
    manager.wait_until_finished()
    if best_manager is not None:
      best_manager.wait_until_finished()
  bar.close()
  logger.close()
  return state, eval_metrics


def make_anytime_step(mesh, *, module, spec: anytime.AnytimeSpec, profile, buckets,
                      is_regression, seed: int) -> Callable:
  """Returns step(state, host batch, rng) for anytime training (see ``latadj_jax.anytime``).

  One executable per (bucket, draw of middle coefficients), compiled on first
  use: at most ``len(buckets) * len(spec.draws())`` across a run. The draw is
  a function of the step number, which is read from the state once and then
  counted here, so dispatch stays asynchronous.
  """
  schedules = {b: {k: schedule.keep_counts(b, k, profile) for k in spec.coeffs} for b in buckets}
  steps: dict[tuple[int, tuple[float, ...]], Callable] = {}
  counter = {"step": None}

  def step(state, batch, rng):
    if counter["step"] is None:
      counter["step"] = int(state.step)
    sampled = spec.draw(seed, counter["step"])
    counter["step"] += 1
    key = (batch["input_ids"].shape[1], sampled)
    if key not in steps:
      steps[key] = compiled_anytime_step(mesh, module, spec, schedules[key[0]], sampled,
                                         is_regression)
    return steps[key](state, shard_batch(batch, mesh), rng)

  step.compiled = steps  # exposed for tests: the executables built so far
  return step


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains with elimination at ``config.coeff``, checkpointing to ``workdir``; returns final metrics.

  Rerunning with the same workdir resumes from the latest checkpoint.
  """
  if config.get("task") == "lm":  # causal LMs: loss on the survivors (``latadj_jax.lm``)
    from latadj_jax import lm
    return lm.train_and_evaluate(config, workdir)
  maybe_initialize_distributed()
  workdir = Path(workdir)
  schedule.validate_coeff(config.coeff)
  pre, tokenizer, task = profiling.load_model_and_task(config)
  if config.get("init_from"):  # stage 2 starts from a fine-tuned (stage-1) workdir
    pre.params = load_init(config.init_from, pre, task)
  train_enc, eval_enc = profiling.load_encoded(config, task, tokenizer)
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  is_main = jax.process_index() == 0
  if is_main:
    wd.save_metadata(workdir, config, pre.hf_config, tokenizer)
  num_layers = pre.config.num_hidden_layers
  ep = profiling.resolve_profile(config, workdir, pre, train_enc, buckets, num_layers, is_main)
  schedules = evaluate.schedules_for(config.coeff, ep, buckets)
  check_batch_size(config.batch_size)

  spec = anytime.spec_from_config(config)
  frozen = None
  if spec is not None and spec.teacher == "frozen":
    if not config.get("init_from"):
      raise ValueError("--config.teacher=frozen distils from the stage-1 model: set "
                       "--config.init_from=STAGE1_WORKDIR (or use --config.teacher=full)")
    frozen = jax.tree.map(jnp.copy, pre.params)  # its own buffers: the live params are donated
  if spec is not None:
    make_step = functools.partial(make_anytime_step, module=pre.module, spec=spec, profile=ep,
                                  buckets=buckets, is_regression=task.is_regression,
                                  seed=config.seed)
  else:
    def make_step(mesh):
      steps = {b: compiled_step(mesh, pre.module, schedules[b], task.is_regression)
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
                                 task, evaluate.ExecutableCache()),
      extra_log=lambda out, batch: {k: float(v) for k, v in out.items() if k != "loss"})
  steps_per_epoch = pipeline.num_batches(train_enc, config.batch_size, buckets)
  state, eval_metrics = run_loop(config, workdir, pre.module.apply, pre.params, steps_per_epoch,
                                 loop, is_main, frozen=frozen)
  if config.eval_coeffs and is_main:  # timed on process 0's device alone
    report.sweep_and_report(config, pre, multihost.host_local(state.params), eval_enc, buckets,
                            ep, task, workdir)
  multihost.wait_for_all("train_and_evaluate: done")
  return eval_metrics


def _check_finite(loss: jax.Array, step: int, last_good: int | None, workdir: Path) -> float:
  """Returns the loss as a float, or raises FloatingPointError naming the last good checkpoint."""
  value = float(loss)
  if not math.isfinite(value):
    kept = (f"the last good checkpoint (step {last_good}) is kept in {workdir}"
            if last_good is not None else "no checkpoint had been written yet")
    raise FloatingPointError(f"loss became {value} at step {step}; {kept}. Lower "
                             f"--config.learning_rate or check the data, then rerun to resume")
  return value


def load_init(init_from: str, pre, task) -> Any:
  """Returns the parameters of ``init_from``'s chosen checkpoint, checked against the model ``pre``."""
  run = wd.load_run(init_from)
  shape_keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers",
                "num_attention_heads", "intermediate_size")
  differ = {k: (run.hf_config.get(k), pre.hf_config.get(k)) for k in shape_keys
            if run.hf_config.get(k) != pre.hf_config.get(k)}
  stage1_labels = profiling.task_of(run.config).num_labels
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
                cache: evaluate.ExecutableCache | None = None) -> dict[str, float]:
  """Returns the task metrics on the eval set at ``coeff`` (default: the training one); all processes call it."""
  clf = evaluate.Classifier(pre.module, multihost.host_local(params), eval_enc, buckets,
                            config.eval_batch_size, pre.config.num_hidden_layers,
                            model_id=str(config.model), dtype=config.dtype,
                            **({"cache": cache} if cache is not None else {}))
  coeff = config.coeff if coeff is None else coeff
  logits = clf.predict(evaluate.schedules_for(coeff, ep, buckets), across_processes=True)
  preds = evaluate.predictions(logits, task.is_regression)
  from latadj_jax import metrics
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

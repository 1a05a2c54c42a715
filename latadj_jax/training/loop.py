"""The data-parallel training loop as a library: optimizer, step, jit, checkpoints, resume.

Data parallel over every device of every host: a ``'data'`` mesh axis and
``jax.shard_map``; each device takes a slice of the global batch and the
gradients are summed across the axis. Keep counts are static per bucket, so
each bucket compiles once. The classifier and the LM objectives
(``training.classifier``, ``training.lm``) plug into ``run_loop`` with a ``Loop``.
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
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from latadj_jax.runtime import multihost
from latadj_jax.runtime import workdir as wd
from latadj_jax.tuning import report


class TrainState(train_state.TrainState):
  # A frozen teacher's parameters (anytime ``teacher="frozen"``): read by the loss, never
  # differentiated, no optimizer state, not checkpointed (reloaded from ``init_from``).
  frozen: Any = None


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Returns AdamW with linear warmup then linear decay; no weight decay on biases and LayerNorm.

  The warm-up is ``config.warmup_steps`` steps when >= 0 (0: none, the lr starts at its
  peak, as stage 2 of DynaBERT and ToP does), else ``warmup_ratio`` of the run.

  With ``config.max_grad_norm > 0`` the gradient is first clipped to that
  global norm, as HF's ``Trainer`` does (its default is 1.0).
  """
  steps = config.get("warmup_steps", -1)
  warmup = steps if steps >= 0 else int(config.warmup_ratio * total_steps)
  lr = optax.join_schedules([optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
                             optax.linear_schedule(config.learning_rate, 0.0,
                                                   max(total_steps - warmup, 1))], [warmup])
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: path[-1].key not in ("bias", "scale"), params)
  adamw = optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=config.weight_decay,
                      mask=decay_mask)
  clip = config.get("max_grad_norm", 0.0)
  return optax.chain(optax.clip_by_global_norm(clip), adamw) if clip > 0 else adamw


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


def jit_step(mesh, terms: Callable):
  """Returns ``train_step`` with this loss ``terms``, jitted data-parallel (state donated)."""
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
  see ``latadj_jax.runtime.multihost`` and ``python -m latadj_jax.launch``.
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


def run_loop(config: ml_collections.ConfigDict, workdir: Path, params, steps_per_epoch: int, loop: Loop, is_main: bool,
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
  state = TrainState.create(apply_fn=None, params=params,
                            tx=make_optimizer(config, total_steps), frozen=frozen)
  manager = wd.checkpoint_manager(workdir, config.keep_checkpoints)
  best_manager, best = None, wd.load_best(workdir)
  eval_every = config.get("eval_every", 0)
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
  stage = config.get("stage", "train")  # the recipe's stage names itself in the bar and the log
  bar = report.progress(total_steps, step, stage, enabled=config.progress and is_main)
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
            bar.write(f"{stage}: step {step} (epoch {step / steps_per_epoch:.2f}) eval at coeff "
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
  if is_main and step >= total_steps:
    wd.write_json(workdir / wd.COMPLETE, {"step": step, "total_steps": total_steps})
  return state, eval_metrics


def _check_finite(loss: jax.Array, step: int, last_good: int | None, workdir: Path) -> float:
  """Returns the loss as a float, or raises FloatingPointError naming the last good checkpoint."""
  value = float(loss)
  if not math.isfinite(value):
    kept = (f"the last good checkpoint (step {last_good}) is kept in {workdir}"
            if last_good is not None else "no checkpoint had been written yet")
    raise FloatingPointError(f"loss became {value} at step {step}; {kept}. Lower "
                             f"--config.learning_rate or check the data, then rerun to resume")
  return value

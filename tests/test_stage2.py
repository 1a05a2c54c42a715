"""Two-stage anytime training (issue 22): init_from, the teacher options, student dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from latadj_jax.core import schedule
from latadj_jax.data import pipeline
from latadj_jax import models
from latadj_jax.runtime import workdir as wd
from latadj_jax.training import anytime, classifier, loop, profiling

from conftest import tiny_config
from test_anytime import TINY_BERT, tiny_batch

COEFFS = (0.6, 0.8, 0.9, 1.0)
SCHED = {k: schedule.keep_counts(16, k, (0.8, 0.9)) for k in COEFFS}


def dropout_bert(rate=0.3):
  """Returns (model, params) of a tiny random BERT classifier with dropout at ``rate``."""
  model = models.build(TINY_BERT, initializer_range=0.5).with_dropout(rate)
  return model, model.init()


def terms_at(spec, model, params, batch, seed, frozen=None):
  return anytime.loss_terms(params, batch, jax.random.PRNGKey(seed), frozen, model=model,
                            spec=spec, schedules=SCHED, sampled=(0.9,), is_regression=False)


@pytest.fixture(scope="module")
def stage1(tiny_model_dir, tiny_sst2_dir, tmp_path_factory):
  """Returns (workdir, params, profile) of a stage-1 run written by hand (no training to compile)."""
  path = tmp_path_factory.mktemp("stage1")
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, coeff=1.0, profile="flat")
  pre, tokenizer, _ = profiling.load_model_and_task(config)
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype),
                        pre.params)
  wd.save_metadata(path, config, pre.hf_config, tokenizer)
  ep = (0.9, 0.8, 0.7)
  wd.save_profile(path, None, ep, {}, 1.0)
  manager = wd.checkpoint_manager(path)
  wd.save_checkpoint(manager, 7, loop.TrainState.create(apply_fn=None, params=params,
                                                         tx=optax.sgd(0.1)))
  manager.wait_until_finished()
  return path, params, ep


def test_init_from_loads_exactly_the_stage1_parameters_and_profile(stage1, tiny_model_dir,
                                                                    tiny_sst2_dir, tmp_path):
  path, params, ep = stage1
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, init_from=str(path), profile="")
  pre, _, task = profiling.load_model_and_task(config)
  loaded = classifier.load_init(config.init_from, pre, task)
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params), strict=True):
    np.testing.assert_array_equal(a, b)
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded),
                                                       jax.tree.leaves(pre.params)))
  buckets = pipeline.make_buckets(config.max_len, base=tuple(config.buckets))
  resolve = lambda c: profiling.resolve_profile(c, tmp_path / c.profile, pre, None, buckets,
                                                write=False)
  assert resolve(config) == ep                    # the stage-1 profile, unless one is given
  config.profile = "flat"
  assert resolve(config) == (1.0, 1.0, 1.0)
  other = tiny_config(tiny_model_dir, tiny_sst2_dir, init_from=str(path), num_labels=3)
  pre3, _, task3 = profiling.load_model_and_task(other)
  with pytest.raises(wd.WorkdirError, match="num_labels 2 there, 3 here"):
    classifier.load_init(other.init_from, pre3, task3)


@pytest.mark.slow
def test_frozen_teacher_gets_no_gradient_and_no_optimizer_state():
  model, params = dropout_bert(0.0)
  frozen = jax.tree.map(lambda x: 1.3 * x, params)  # another model than the live one
  batch = tiny_batch()
  spec = anytime.AnytimeSpec(COEFFS, teacher="frozen", always=(1.0,))
  terms = terms_at(spec, model, params, batch, 0, frozen)
  assert set(terms) == {"smallest", "always0", "sampled0"}   # nothing on the labels
  teacher = model.apply(frozen, models.Batch.of(batch)).logits     # no elimination
  student = model.apply(params, models.Batch.of(batch), SCHED[0.6]).logits
  np.testing.assert_allclose(terms["smallest"],
                             anytime.distill_loss(teacher, student, False).sum(), rtol=1e-5)
  grads = jax.grad(lambda f: sum(terms_at(spec, model, params, batch, 0, f).values()))(frozen)
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads))

  mesh = loop.make_mesh()
  tx = optax.adam(1e-2)
  state = loop._replicate(loop.TrainState.create(
      apply_fn=None, params=params, tx=tx, frozen=jax.tree.map(jnp.copy, frozen)), mesh)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(tx.init(params))
  step = classifier.make_anytime_step(mesh, model=model, spec=spec, profile=(0.8, 0.9), buckets=(16,),
                                 is_regression=False, seed=0)
  host = jax.tree.map(np.asarray, batch)
  for _ in range(2):
    state, out = step(state, host, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(state.frozen), jax.tree.leaves(frozen)):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                   jax.tree.leaves(params)))
  assert float(out["loss"]) > 0


@pytest.mark.slow
def test_dropout_is_off_on_student_passes_when_asked():
  model, params = dropout_bert(0.3)
  frozen = jax.tree.map(lambda x: 1.3 * x, params)
  batch = tiny_batch()
  for student_dropout in (True, False):
    spec = anytime.AnytimeSpec(COEFFS, teacher="frozen", student_dropout=student_dropout)
    a, b = (terms_at(spec, model, params, batch, seed, frozen) for seed in (0, 1))
    same = [np.allclose(a[n], b[n]) for n in ("smallest", "sampled0")]
    assert same == [not student_dropout] * 2
  # The live teacher keeps its dropout either way.
  spec = anytime.AnytimeSpec(COEFFS, teacher="full", student_dropout=False)
  a, b = (terms_at(spec, model, params, batch, seed) for seed in (0, 1))
  assert not np.allclose(a["label"], b["label"])


def test_frozen_teacher_without_init_from_fails_with_the_fix(tiny_model_dir, tiny_sst2_dir,
                                                             tmp_path):
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, coeff=1.0, profile="flat",
                       train_coeffs="0.8,1.0", teacher="frozen")
  with pytest.raises(ValueError, match="init_from=STAGE1_WORKDIR"):
    classifier.train_and_evaluate(config, tmp_path)


def test_max_grad_norm_clips_the_global_norm_before_adamw():
  from configs import default
  config = default.get_config()
  params = {"w": jnp.ones((3, 2)), "bias": jnp.zeros(2)}
  grads = [jax.tree.map(lambda x: 10.0 * jnp.ones_like(x), params),  # global norm sqrt(8) * 10
           jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)]   # under the threshold
  def updates(tx, gs):
    state, out = tx.init(params), []
    for g in gs:
      u, state = tx.update(g, state, params)
      out.append(u)
    return out
  config.max_grad_norm = 1.0
  clipped = updates(loop.make_optimizer(config, 100), grads)
  config.max_grad_norm = 0.0
  plain = loop.make_optimizer(config, 100)
  by_hand = updates(plain, [jax.tree.map(lambda x: x / optax.global_norm(g), g) if
                            optax.global_norm(g) > 1 else g for g in grads])
  for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  unclipped = updates(plain, grads)
  assert not np.allclose(jax.tree.leaves(clipped[1])[0], jax.tree.leaves(unclipped[1])[0])


def test_warmup_steps_zero_starts_at_the_peak_learning_rate():
  from configs import default
  config = default.get_config()
  config.learning_rate, config.weight_decay = 1e-3, 0.0
  params = {"w": jnp.ones(4)}
  grads = {"w": jnp.asarray([1.0, -2.0, 3.0, -4.0])}
  def first_update(warmup_steps):
    config.warmup_steps = warmup_steps
    tx = loop.make_optimizer(config, 100)
    return tx.update(grads, tx.init(params), params)[0]["w"]
  # Adam's first step moves each weight by lr against its gradient's sign.
  np.testing.assert_allclose(first_update(0), -1e-3 * jnp.sign(grads["w"]), rtol=1e-4)
  np.testing.assert_array_equal(first_update(10), jnp.zeros(4))   # warm-up starts at lr 0
  config.warmup_steps, config.warmup_ratio = -1, 0.0               # -1: warmup_ratio decides
  tx = loop.make_optimizer(config, 100)
  np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["w"],
                             -1e-3 * jnp.sign(grads["w"]), rtol=1e-4)

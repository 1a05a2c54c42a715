"""Anytime training (one run, every k; issues 15 and 22) and the survivor-rule ablation."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latadj_jax import models
from latadj_jax.core import elimination, schedule
from latadj_jax.runtime import workdir as wd
from latadj_jax.training import anytime, classifier

from conftest import tiny_config

SPEC = anytime.AnytimeSpec((0.6, 0.8, 0.9, 1.0), num_sampled=1, temperature=2.0)


TINY_BERT = {"model_type": "bert", "vocab_size": 60, "hidden_size": 16, "num_hidden_layers": 2,
      "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}


def tiny_bert(**overrides):
  """Returns (model, params) of a tiny random BERT classifier, dropout off."""
  model = models.build(TINY_BERT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       initializer_range=0.5, **overrides)
  return model, model.init()


def tiny_batch(n=6, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(4, 60, (n, length)).astype(np.int32)
  mask = (np.arange(length)[None] < rng.integers(6, length + 1, (n, 1))).astype(np.int32)
  return dict(input_ids=jnp.asarray(ids * mask), attention_mask=jnp.asarray(mask),
              token_type_ids=jnp.zeros((n, length), jnp.int32),
              labels=jnp.asarray(rng.integers(0, 2, n).astype(np.int32)),
              weights=jnp.ones(n, jnp.float32))


def test_spec_parsing_and_draws():
  assert anytime.parse_coeffs("1.2, 0.8,1.0") == (0.8, 1.0, 1.2)
  assert anytime.parse_coeffs("") == ()
  with pytest.raises(ValueError, match="at least two"):
    anytime.parse_coeffs("0.9")
  with pytest.raises(ValueError, match="positive"):
    anytime.parse_coeffs("0.8,-1")
  assert (SPEC.smallest, SPEC.teacher_coeff, SPEC.pool) == (0.6, 1.0, (0.8, 0.9))
  assert SPEC.draws() == [(0.8,), (0.9,)]
  draws = [SPEC.draw(seed=0, step=s) for s in range(200)]
  assert set(draws) == {(0.8,), (0.9,)}                       # both middle coefficients get trained
  assert draws == [SPEC.draw(seed=0, step=s) for s in range(200)]  # a resumed run draws the same
  two = anytime.AnytimeSpec((0.8, 1.2))
  assert two.draws() == [()] and two.draw(0, 5) == ()
  # A teacher that eliminates nothing makes the largest k a student; ``always`` ones leave the pool.
  full = anytime.AnytimeSpec((0.8, 0.9, 1.0, 1.1, 1.2), num_sampled=2, teacher="full",
                             always=(1.0,))
  assert full.teacher_coeff is None
  assert full.fixed_students == (0.8, 1.0) and full.pool == (0.9, 1.1, 1.2)
  assert full.draws() == [(0.9, 1.1), (0.9, 1.2), (1.1, 1.2)]
  assert {full.draw(0, s) for s in range(100)} == set(full.draws())
  with pytest.raises(ValueError, match="teacher"):
    anytime.AnytimeSpec((0.8, 1.2), teacher="biggest")
  with pytest.raises(ValueError, match="anytime_always"):
    anytime.AnytimeSpec((0.8, 1.2), always=(1.0,))


def test_config_defaults_train_k1_every_step_with_the_lat_teacher():
  from configs import default
  config = default.get_config()
  config.train_coeffs = "0.6,0.8,0.9,1.0"
  spec = anytime.spec_from_config(config)
  # The measured-best recipe by default: teacher = no elimination, k = 1 a student every step.
  assert (spec.teacher, spec.always, spec.fixed_students) == ("full", (1.0,), (0.6, 1.0))
  assert spec.pool == (0.8, 0.9)
  config.train_coeffs = "0.6,0.8,0.9"  # "auto" asks for k = 1 only when it is trained at all
  assert anytime.spec_from_config(config).always == ()
  config.train_coeffs, config.anytime_always = "0.6,0.8,0.9,1.0", ""
  assert anytime.spec_from_config(config).always == ()
  config.anytime_always = "0.9,1.0"
  assert anytime.spec_from_config(config).always == (0.9, 1.0)
  config.anytime_always = "1.1"
  with pytest.raises(ValueError, match="anytime_always"):
    anytime.spec_from_config(config)


def test_no_student_reruns_the_teacher_pass():
  """Teacher 'full', flat profile, no dropout: k >= 1 is the teacher's own pass, never a student."""
  from configs import default
  config = default.get_config()
  config.train_coeffs, config.profile, config.dropout = "0.8,0.9,1.0,1.1", "flat", 0.0
  spec = anytime.spec_from_config(config)
  assert spec.as_teacher == (1.0, 1.1) and spec.always == ()
  assert spec.fixed_students == (0.8,) and spec.pool == (0.9,)
  assert all(k < 1.0 for d in spec.draws() for _, k in spec.students(d))
  config.dropout = 0.1  # another dropout mask makes the k = 1 student a different pass
  assert anytime.spec_from_config(config).fixed_students == (0.8, 1.0)
  config.dropout, config.profile = 0.0, ""  # a measured profile eliminates at k = 1 too
  assert anytime.spec_from_config(config).as_teacher == ()


def test_distill_options_are_checked_and_read_from_the_config():
  with pytest.raises(ValueError, match="teacher=full"):
    anytime.AnytimeSpec((0.8, 1.2), teacher="largest", distill="hidden")
  with pytest.raises(ValueError, match="student_label_weight"):
    anytime.AnytimeSpec((0.8, 1.2), teacher="full", distill="none")
  with pytest.raises(ValueError, match="logits, hidden, none"):
    anytime.AnytimeSpec((0.8, 1.2), distill="states")
  from configs import default
  config = default.get_config()
  config.train_coeffs, config.distill, config.hidden_weight = "0.6,1.0", "hidden", 0.5
  spec = anytime.spec_from_config(config)
  assert (spec.distill, spec.hidden_weight) == ("hidden", 0.5)


def manual_hidden_loss(teacher, student, mask):
  """The hidden-state loss written out per example, layer and survivor (numpy)."""
  t_states = [np.asarray(h) for h in teacher.hidden_states]
  s_states = [np.asarray(h) for h in student.hidden_states]
  B, N = mask.shape
  positions = [np.tile(np.arange(N), (B, 1))] + [np.asarray(p) for p in student.layer_positions]
  out = np.zeros(B)
  for b in range(B):
    for t, s, p in zip(t_states, s_states, positions):
      errs = [np.mean((s[b, j] - t[b, p[b, j]]) ** 2) for j in range(p.shape[1]) if mask[b, p[b, j]]]
      out[b] += np.mean(errs)
    out[b] += sum(np.mean((s_states[-1][b, j] - t_states[-1][b, 0]) ** 2)
                  for j in range(positions[-1].shape[1]) if positions[-1][b, j] == 0)
  return out


def test_hidden_distillation_is_zero_when_the_student_keeps_every_token():
  model, params = tiny_bert()
  batch = tiny_batch()
  spec = anytime.AnytimeSpec((0.6, 1.0), teacher="full", distill="hidden", hidden_weight=2.0,
                             always=(1.0,))
  def terms(schedules):
    return anytime.loss_terms(params, batch, jax.random.PRNGKey(0), model=model, spec=spec,
                              schedules=schedules, sampled=(), is_regression=True)
  keep_all = terms({0.6: (16, 16), 1.0: (16, 16)})
  assert set(keep_all) == {"label", "smallest", "always0"}
  assert float(keep_all["smallest"]) == 0.0 and float(keep_all["always0"]) == 0.0
  counts = schedule.keep_counts(16, 0.6, (0.8, 0.9))
  assert counts[-1] < 16
  dropping = terms({0.6: counts, 1.0: (16, 16)})
  hidden = models.Options(hidden=True)
  teacher = model.apply(params, models.Batch.of(batch), options=hidden)
  student = model.apply(params, models.Batch.of(batch), counts, options=hidden)
  want = 2.0 * manual_hidden_loss(teacher, student, np.asarray(batch["attention_mask"])).sum()
  assert want > 1e-3
  np.testing.assert_allclose(dropping["smallest"], want, rtol=1e-5)


def test_regression_with_distill_none_trains_the_students_on_the_labels_alone():
  model, params = tiny_bert()
  batch = dict(tiny_batch(), labels=jnp.linspace(0.0, 5.0, 6))
  spec = anytime.AnytimeSpec((0.6, 1.0), teacher="full", distill="none",
                             student_label_weight=0.5)
  counts = schedule.keep_counts(16, 0.6, (0.8, 0.9))
  def smallest(p):
    return anytime.loss_terms(p, batch, jax.random.PRNGKey(0), model=model, spec=spec,
                              schedules={0.6: counts, 1.0: (16, 16)}, sampled=(),
                              is_regression=True)["smallest"]
  student = model.apply(params, models.Batch.of(batch), counts).logits[:, 0]
  # Exactly half the squared error on the labels: no distillation term beside it.
  np.testing.assert_allclose(smallest(params), 0.5 * jnp.sum(jnp.square(student - batch["labels"])),
                             rtol=1e-6)
  grads = jax.grad(smallest)(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads)) > 0


@pytest.mark.slow
def test_loss_terms_are_the_configured_losses():
  model, params = tiny_bert()
  batch = tiny_batch()
  sched = {k: schedule.keep_counts(16, k, (0.8, 0.9)) for k in SPEC.coeffs}
  assert len(set(sched.values())) == 4  # four distinct schedules: the test tells them apart
  terms = anytime.loss_terms(params, batch, jax.random.PRNGKey(0), model=model, spec=SPEC,
                             schedules=sched, sampled=(0.9,), is_regression=False)
  assert set(terms) == {"label", "smallest", "sampled0"}

  def logits(k):
    return model.apply(params, models.Batch.of(batch), sched[k]).logits
  teacher = logits(1.0)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(teacher), batch["labels"][:, None], 1).sum()
  np.testing.assert_allclose(terms["label"], ce, rtol=1e-5)
  for name, k in (("smallest", 0.6), ("sampled0", 0.9)):
    p = jax.nn.softmax(teacher / 2.0)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(logits(k) / 2.0)))
    assert kl > 1e-3  # the students really differ from the teacher
    np.testing.assert_allclose(terms[name], 4.0 * kl, rtol=1e-4)


@pytest.mark.slow
def test_teacher_gets_no_gradient_from_distillation():
  t, s = jnp.array([[1.0, -2.0], [0.3, 0.1]]), jnp.array([[0.0, 0.5], [2.0, -1.0]])
  for regression in (False, True):
    g_t, g_s = jax.grad(lambda t, s: anytime.distill_loss(t, s, regression, 2.0).sum(),
                        argnums=(0, 1))(t, s)
    assert not np.any(np.asarray(g_t)) and np.any(np.asarray(g_s))
  # Through the model: the gradient of the students' terms equals the gradient
  # with the teacher's logits computed beforehand as constants.
  model, params = tiny_bert()
  batch = tiny_batch()
  sched = {k: schedule.keep_counts(16, k, (0.8, 0.9)) for k in SPEC.coeffs}
  spec = anytime.AnytimeSpec(SPEC.coeffs, temperature=2.0)
  students = lambda p: sum(v for n, v in anytime.loss_terms(
      p, batch, jax.random.PRNGKey(0), model=model, spec=spec, schedules=sched,
      sampled=(0.8,), is_regression=False).items() if n != "label")
  teacher = model.apply(params, models.Batch.of(batch), sched[1.0]).logits

  def with_constant_teacher(p):
    total = 0.0
    for k in (0.6, 0.8):
      s = model.apply(p, models.Batch.of(batch), sched[k]).logits
      total += anytime.distill_loss(teacher, s, False, 2.0).sum()
    return total
  for a, b in zip(jax.tree.leaves(jax.grad(students)(params)),
                  jax.tree.leaves(jax.grad(with_constant_teacher)(params))):
    np.testing.assert_allclose(a, b, atol=1e-5)  # two programs: fused differently, ulp apart


@pytest.mark.slow
def test_anytime_run_compiles_buckets_times_draws(tiny_model_dir, tiny_sst2_dir, tmp_path,
                                                   monkeypatch):
  built = []
  real = classifier.make_anytime_step

  def spy(*args, **kwargs):
    step = real(*args, **kwargs)
    built.append(step)
    return step
  monkeypatch.setattr(classifier, "make_anytime_step", spy)
  # The LAT teacher (no elimination, on the labels), k = 1 always trained, one more drawn;
  # the checkpoint kept is the best mean accuracy over k in {0.6, 1}, evaluated every 4 steps.
  config = tiny_config(tiny_model_dir, tiny_sst2_dir, coeff=1.0, num_epochs=2,
                       train_coeffs="0.6,0.8,0.9,1.0", anytime_samples=1, teacher="full",
                       anytime_always="1.0", select_coeffs="0.6,1.0", eval_every=4)
  metrics = classifier.train_and_evaluate(config, tmp_path)
  assert 0.0 <= metrics["accuracy"] <= 1.0
  (step,) = built
  # 2 buckets x 2 draws of the sampled coefficient; each executable compiled once over 18 steps.
  assert set(step.compiled) == {(b, (k,)) for b in (16, 32) for k in (0.8, 0.9)}
  assert all(fn._cache_size() == 1 for fn in step.compiled.values())
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "loss" in r]
  for r in logged:
    assert {"loss_label", "loss_smallest", "loss_always0", "loss_sampled0"} <= set(r)
    assert r["loss"] == pytest.approx(r["loss_label"] + r["loss_smallest"] + r["loss_always0"]
                                      + r["loss_sampled0"], rel=1e-5)
  evals = [r for r in rows if "eval_mean_over_k" in r]
  assert len(evals) >= 4
  for r in evals:
    assert r["eval_mean_over_k"] == pytest.approx(
        (r["eval_accuracy@0.6"] + r["eval_accuracy@1"]) / 2)
  best = wd.load_best(tmp_path)
  first_best = max(evals, key=lambda r: (r["eval_mean_over_k"], -r["step"]))
  assert (best["step"], best["score"]) == (first_best["step"], first_best["eval_mean_over_k"])
  from latadj_jax.tuning import offline
  assert offline.restore(tmp_path).step == best["step"]   # eval.py takes the chosen checkpoint


def test_survivor_rules_keep_the_same_counts_but_different_tokens():
  sv = jnp.array([[0.1, 5.0, 0.2, 3.0, 0.3, 4.0, 0.0, 0.0]])
  valid = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]], bool)
  pos = jnp.arange(8)[None]
  protect = elimination.first_token_mask(valid)
  pick = lambda rule, rng=None: np.asarray(elimination.select_indices(
      elimination.ranking(rule, {"score": sv}, valid, pos, rng=rng), valid, protect, 3))[0].tolist()
  assert pick("score") == [0, 1, 5]
  assert pick("first") == [0, 1, 2]
  randoms = {tuple(pick("random", jax.random.PRNGKey(i))) for i in range(20)}
  assert len(randoms) > 3 and all(0 in r and max(r) < 6 for r in randoms)  # never a pad
  with pytest.raises(ValueError, match="survivor rule"):
    elimination.ranking("worst", {"score": sv}, valid, pos)
  with pytest.raises(ValueError, match="survivors"):
    models.build(TINY_BERT, survivors="worst")


@pytest.mark.parametrize("rule", ["first", "random"])
def test_ablation_models_run_at_the_same_counts(rule):
  model, params = tiny_bert(survivors=rule)
  ref, _ = tiny_bert()
  batch = models.Batch(tiny_batch()["input_ids"], tiny_batch()["attention_mask"])
  counts = (10, 6)
  out = model.apply(params, batch, counts)
  base = ref.apply(params, batch, counts)
  assert out.last_hidden_state.shape == base.last_hidden_state.shape == (6, 6, 16)
  if rule == "first":  # the survivors are the first valid positions
    valid_n = np.asarray(batch.attention_mask).sum(1)
    for row, n in zip(np.asarray(out.positions), valid_n):
      assert row.tolist() == list(range(6)) or n < 6
  assert not np.allclose(out.logits, base.logits)

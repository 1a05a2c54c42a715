"""Anytime training: one fine-tuning run that is accurate at every ``k`` of a range.

Offline tuning (docs/method.md section 6) promises any ``k`` at inference from one
set of weights. A model trained at a single ``k`` only ever sees that
schedule, so it degrades quickly below it. Anytime training shows the model the
whole range, after the Length-Adaptive Transformer's LengthDrop (sandwich rule,
in-place distillation), DynaBERT and once-for-all networks. Each step runs:

* a *teacher* pass, one of (``--config.teacher``)

  - ``full``: the live model with no elimination, trained on the labels (LAT);
  - ``frozen``: a separate frozen copy of the starting (stage-1) model with no
    elimination, forward only, no dropout, no optimizer state (DynaBERT, OFA);
    nothing is trained on the labels unless ``student_label_weight > 0``;
  - ``largest``: the live model at the largest coefficient's schedule,
    trained on the labels;

* *student* passes, trained on the teacher's predictions (distillation; the
  teacher side is ``stop_gradient``), plus ``student_label_weight`` times the
  label loss: the smallest coefficient always, the ``always`` coefficients
  (e.g. ``k = 1``, the one users pick most) always, and ``num_sampled`` drawn
  from the rest (the largest is a student too unless it is the teacher).

Dropout runs on the teacher pass; on the students only when
``student_dropout`` (AttentiveNAS turns it off there).

Every coefficient is a static keep-count schedule per bucket, so the set of
compiled train steps is fixed: one per (bucket, draw of sampled coefficients).
The draw is a function of the seed and the step number, so a resumed run draws
the same ones.

Distillation loss, per example: classification uses ``T^2 * KL(p_T || q_T)``
with ``p_T``/``q_T`` the teacher/student softmax at temperature ``T``;
regression uses the squared difference of the two outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax

from latadj_jax import models
from latadj_jax.core import schedule

TEACHERS = ("full", "frozen", "largest")


@dataclasses.dataclass(frozen=True)
class AnytimeSpec:
  """The coefficients of an anytime run, its teacher and how the losses are weighted."""
  coeffs: tuple[float, ...]        # ascending; coeffs[0] is the smallest
  num_sampled: int = 1             # coefficients drawn per step from ``pool`` (no replacement)
  temperature: float = 1.0
  distill_weight: float = 1.0      # weight of each student's distillation loss
  student_label_weight: float = 0.0  # weight of each student's label loss
  teacher: str = "largest"         # one of TEACHERS
  always: tuple[float, ...] = ()   # students trained every step besides the smallest
  student_dropout: bool = True     # dropout on the student passes too
  as_teacher: tuple[float, ...] = ()  # coefficients whose pass is the teacher's: never students

  def __post_init__(self):
    if self.teacher not in TEACHERS:
      raise ValueError(f"unknown teacher {self.teacher!r}; --config.teacher is one of "
                       f"{', '.join(TEACHERS)}")
    stray = [k for k in self.always if k not in self.coeffs]
    if stray:
      raise ValueError(f"anytime_always {stray} must be among train_coeffs {list(self.coeffs)}")

  @property
  def largest(self) -> float:
    return self.coeffs[-1]

  @property
  def smallest(self) -> float:
    return self.coeffs[0]

  @property
  def teacher_coeff(self) -> float | None:
    """Returns the teacher's coefficient, or None when it eliminates nothing."""
    return self.largest if self.teacher == "largest" else None

  @property
  def fixed_students(self) -> tuple[float, ...]:
    """Returns the students of every step: the smallest, then the ``always`` ones."""
    return (self.smallest,) + tuple(k for k in sorted(self.always)
                                    if k not in (self.smallest, self.teacher_coeff)
                                    and k not in self.as_teacher)

  @property
  def pool(self) -> tuple[float, ...]:
    """Returns the coefficients the sampled students are drawn from."""
    return tuple(k for k in self.coeffs if k not in self.fixed_students
                 and k != self.teacher_coeff and k not in self.as_teacher)

  def students(self, sampled: Sequence[float]) -> list[tuple[str, float]]:
    """Returns one step's (loss name, coefficient) students: smallest, always, then sampled."""
    return ([("smallest", self.smallest)]
            + [(f"always{j}", k) for j, k in enumerate(self.fixed_students[1:])]
            + [(f"sampled{j}", k) for j, k in enumerate(sampled)])

  def draws(self) -> list[tuple[float, ...]]:
    """Returns every set of sampled coefficients a step may draw (the compiled variants)."""
    n = min(self.num_sampled, len(self.pool))
    return [tuple(c) for c in itertools.combinations(self.pool, n)]

  def draw(self, seed: int, step: int) -> tuple[float, ...]:
    """Returns the sampled coefficients of one step; a function of (seed, step) only."""
    n = min(self.num_sampled, len(self.pool))
    rnd = random.Random(seed * 1_000_003 + step)
    return tuple(sorted(rnd.sample(self.pool, n)))


def dispatcher(spec: AnytimeSpec, seed: int, build: Callable[[int, tuple[float, ...]], Callable],
               prepare: Callable[[dict], Any]) -> Callable:
  """Returns step(state, host batch, rng) running the executable of this step's (bucket, draw).

  ``build(bucket, sampled)`` makes the executable, once per key, on first use:
  at most ``len(buckets) * len(spec.draws())`` across a run; ``prepare``
  shards the host batch. The draw is a function of the step number, read
  from the state once and then counted here, so dispatch stays asynchronous.
  """
  steps: dict[tuple[int, tuple[float, ...]], Callable] = {}
  counter = {"step": None}

  def step(state, batch, rng):
    if counter["step"] is None:
      counter["step"] = int(state.step)
    sampled = spec.draw(seed, counter["step"])
    counter["step"] += 1
    key = (batch["input_ids"].shape[1], sampled)
    if key not in steps:
      steps[key] = build(*key)
    return steps[key](state, prepare(batch), rng)

  step.compiled = steps  # exposed for tests: the executables built so far
  return step


def parse_coeffs(value) -> tuple[float, ...]:
  """Returns ascending distinct coefficients from ``"0.8,1.0,1.2"`` or a sequence; () when empty."""
  if isinstance(value, str):
    value = [v for v in value.split(",") if v.strip()]
  coeffs = tuple(sorted({schedule.validate_coeff(v) for v in value}))
  if len(coeffs) == 1:
    raise ValueError(f"train_coeffs needs at least two coefficients (smallest and largest), "
                     f"got {value!r}; for one coefficient set --config.coeff instead")
  return coeffs


def spec_from_config(config) -> AnytimeSpec | None:
  """Returns the run's AnytimeSpec, or None when ``config.train_coeffs`` is empty."""
  coeffs = parse_coeffs(config.get("train_coeffs", ""))
  if not coeffs:
    return None
  teacher = config.get("teacher", "full")
  # Teacher 'full', a flat profile and no dropout: a student at k >= 1 eliminates nothing and
  # draws no other dropout mask, so it would rerun the teacher's pass (a zero loss at the cost
  # of a full forward and backward: 47 s a step instead of about 25 for SmolLM2 on this CPU).
  as_teacher = tuple(k for k in coeffs if k >= 1.0) if (
      teacher == "full" and config.get("profile", "") == "flat"
      and not float(config.get("dropout", 0.0))) else ()
  always = str(config.get("anytime_always", "auto"))
  if always == "auto":  # k = 1, the coefficient users pick most, when it is trained at all
    always = "1.0" if 1.0 in coeffs and 1.0 not in as_teacher else ""
  always = tuple(schedule.validate_coeff(v) for v in always.split(",") if v.strip())
  return AnytimeSpec(coeffs, num_sampled=int(config.get("anytime_samples", 2)),
                     temperature=float(config.get("distill_temperature", 1.0)),
                     distill_weight=float(config.get("distill_weight", 1.0)),
                     student_label_weight=float(config.get("student_label_weight", 0.0)),
                     teacher=teacher, always=always,
                     student_dropout=bool(config.get("student_dropout", True)),
                     as_teacher=as_teacher)


def label_loss(logits_BxC: jax.Array, labels_B: jax.Array, is_regression: bool) -> jax.Array:
  """Returns the per-example loss against the labels: cross-entropy, or squared error."""
  if is_regression:
    return jnp.square(logits_BxC[:, 0] - labels_B)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, labels_B)


def distill_loss(teacher_BxC: jax.Array, student_BxC: jax.Array, is_regression: bool,
                 temperature: float = 1.0) -> jax.Array:
  """Returns the per-example distillation loss; the teacher side gets no gradient."""
  teacher_BxC = jax.lax.stop_gradient(teacher_BxC)
  if is_regression:
    return jnp.square(student_BxC[:, 0] - teacher_BxC[:, 0])
  t = temperature
  p_BxC = jax.nn.softmax(teacher_BxC / t, axis=-1)
  kl_B = jnp.sum(p_BxC * (jax.nn.log_softmax(teacher_BxC / t, axis=-1)
                          - jax.nn.log_softmax(student_BxC / t, axis=-1)), axis=-1)
  return (t * t) * kl_B


def loss_terms(params, batch: dict, rng: jax.Array, frozen: Any = None, *, model,
               spec: AnytimeSpec, schedules: dict[float, tuple[int, ...]],
               sampled: Sequence[float], is_regression: bool) -> dict[str, jax.Array]:
  """Returns the weighted loss sums of one (local) batch: the teacher's label term and each student's.

  ``schedules`` maps each coefficient to its keep counts for this batch's
  bucket; ``sampled`` are this step's drawn coefficients; ``frozen`` holds the
  frozen teacher's parameters (``teacher="frozen"`` only).
  """
  def logits_at(p, counts, i: int, dropout: bool) -> jax.Array:
    return model.apply(p, models.Batch.of(batch), counts, options=models.Options(train=dropout),
                       rng=jax.random.fold_in(rng, i) if dropout else None).logits

  w_B = batch["weights"]
  terms = {}
  if spec.teacher == "frozen":
    if frozen is None:
      raise ValueError("teacher='frozen' needs the frozen teacher's parameters")
    teacher = jax.lax.stop_gradient(logits_at(frozen, None, 0, dropout=False))
  else:
    counts = None if spec.teacher == "full" else schedules[spec.largest]
    teacher = logits_at(params, counts, 0, dropout=True)
    terms["label"] = jnp.sum(label_loss(teacher, batch["labels"], is_regression) * w_B)
  for i, (name, k) in enumerate(spec.students(sampled), start=1):
    student = logits_at(params, schedules[k], i, dropout=spec.student_dropout)
    per_example = spec.distill_weight * distill_loss(teacher, student, is_regression,
                                                     spec.temperature)
    if spec.student_label_weight:
      per_example += spec.student_label_weight * label_loss(student, batch["labels"],
                                                            is_regression)
    terms[name] = jnp.sum(per_example * w_B)
  return terms

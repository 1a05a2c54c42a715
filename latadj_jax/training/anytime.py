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

What a student matches (``--config.distill``), per example:

* ``logits``: the teacher's outputs. Classification uses ``T^2 * KL(p_T || q_T)``
  with ``p_T``/``q_T`` the teacher/student softmax at temperature ``T``;
  regression the squared difference of the two outputs.
* ``hidden``: the teacher's hidden states (DynaBERT's regression recipe): the
  mean squared difference at each layer's output (and the embeddings) over the
  student's surviving real tokens, the teacher's states gathered at the
  survivors' original positions, plus position 0's final state (BERT's [CLS],
  which the classification head reads). Needs a teacher that eliminates
  nothing (``full`` or ``frozen``).
* ``none``: nothing; the students learn from the labels alone
  (``student_label_weight``), as ToP trains STS-B.
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
DISTILL = ("logits", "hidden", "none")


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
  distill: str = "logits"          # one of DISTILL: what the students match
  hidden_weight: float = 1.0       # distill "hidden": weight of each student's hidden-state loss

  def __post_init__(self):
    if self.teacher not in TEACHERS:
      raise ValueError(f"unknown teacher {self.teacher!r}; --config.teacher is one of "
                       f"{', '.join(TEACHERS)}")
    if self.distill not in DISTILL:
      raise ValueError(f"unknown distill {self.distill!r}; --config.distill is one of "
                       f"{', '.join(DISTILL)}")
    if self.distill == "hidden" and self.teacher == "largest":
      raise ValueError("--config.distill=hidden compares hidden states at the student's "
                       "survivors, so the teacher must keep every token: --config.teacher=full "
                       "or frozen")
    if self.distill == "none" and not self.student_label_weight:
      raise ValueError("--config.distill=none leaves the students no loss: set "
                       "--config.student_label_weight (1.0 trains them on the labels)")
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
                     as_teacher=as_teacher, distill=str(config.get("distill", "logits")),
                     hidden_weight=float(config.get("hidden_weight", 1.0)))


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


def hidden_distill_loss(teacher: models.Output, student: models.Output,
                        mask_BxN: jax.Array) -> jax.Array:
  """Returns the per-example hidden-state loss of a student against a teacher that eliminates nothing.

  Both outputs carry ``hidden_states`` (``Options(hidden=True)``). At the
  embeddings and after each layer, the teacher's states are gathered at the
  student's survivors' original positions; the squared difference, averaged
  over the width and the surviving real tokens (``mask_BxN``: the input's
  attention mask), is summed over the layers, plus position 0's final state.
  The teacher side gets no gradient.
  """
  B, N = mask_BxN.shape
  positions = (jnp.broadcast_to(jnp.arange(N), (B, N)),) + tuple(student.layer_positions)
  loss_B = jnp.zeros(B, jnp.float32)
  for t_BxNxD, s_BxKxD, p_BxK in zip(teacher.hidden_states, student.hidden_states, positions,
                                     strict=True):
    t_BxKxD = jnp.take_along_axis(jax.lax.stop_gradient(t_BxNxD), p_BxK[..., None], axis=1)
    valid_BxK = jnp.take_along_axis(mask_BxN, p_BxK, axis=1).astype(jnp.float32)
    sq_BxK = jnp.mean(jnp.square(s_BxKxD.astype(jnp.float32) - t_BxKxD), axis=-1)
    loss_B += jnp.sum(sq_BxK * valid_BxK, -1) / jnp.maximum(jnp.sum(valid_BxK, -1), 1.0)
  is_first_BxK = positions[-1] == 0  # the final layer's survivor at position 0, if kept
  return loss_B + jnp.sum(sq_BxK * is_first_BxK, axis=-1)


def loss_terms(params, batch: dict, rng: jax.Array, frozen: Any = None, *, model,
               spec: AnytimeSpec, schedules: dict[float, tuple[int, ...]],
               sampled: Sequence[float], is_regression: bool) -> dict[str, jax.Array]:
  """Returns the weighted loss sums of one (local) batch: the teacher's label term and each student's.

  ``schedules`` maps each coefficient to its keep counts for this batch's
  bucket; ``sampled`` are this step's drawn coefficients; ``frozen`` holds the
  frozen teacher's parameters (``teacher="frozen"`` only).
  """
  options = lambda dropout: models.Options(train=dropout, hidden=spec.distill == "hidden")

  def forward(p, counts, i: int, dropout: bool) -> models.Output:
    return model.apply(p, models.Batch.of(batch), counts, options=options(dropout),
                       rng=jax.random.fold_in(rng, i) if dropout else None)

  w_B = batch["weights"]
  terms = {}
  if spec.teacher == "frozen":  # eval mode: no dropout, no gradient
    if frozen is None:
      raise ValueError("teacher='frozen' needs the frozen teacher's parameters")
    teacher = jax.tree.map(jax.lax.stop_gradient, forward(frozen, None, 0, dropout=False))
  else:
    counts = None if spec.teacher == "full" else schedules[spec.largest]
    teacher = forward(params, counts, 0, dropout=True)
    terms["label"] = jnp.sum(label_loss(teacher.logits, batch["labels"], is_regression) * w_B)
  for i, (name, k) in enumerate(spec.students(sampled), start=1):
    student = forward(params, schedules[k], i, dropout=spec.student_dropout)
    per_example = jnp.zeros_like(w_B)
    if spec.distill == "logits":
      per_example += spec.distill_weight * distill_loss(teacher.logits, student.logits,
                                                        is_regression, spec.temperature)
    elif spec.distill == "hidden":
      per_example += spec.hidden_weight * hidden_distill_loss(teacher, student,
                                                              batch["attention_mask"])
    if spec.student_label_weight:
      per_example += spec.student_label_weight * label_loss(student.logits, batch["labels"],
                                                            is_regression)
    terms[name] = jnp.sum(per_example * w_B)
  return terms

"""Anytime training: one fine-tuning run that is accurate at every ``k`` of a range.

Offline tuning (METHOD.md section 6) promises any ``k`` at inference from one
set of weights. A model trained at a single ``k`` only ever sees that
schedule, so it degrades quickly below it. Anytime training shows the model the
whole range, after the Length-Adaptive Transformer's LengthDrop (sandwich rule,
in-place distillation) and slimmable / once-for-all networks:

* the *teacher* is the largest coefficient's schedule (the least elimination);
  it is trained on the labels;
* the *smallest* coefficient's schedule is always trained, and ``num_sampled``
  schedules drawn from the coefficients in between; these students are trained
  on the teacher's predictions (distillation; the teacher side is
  ``stop_gradient``), plus ``student_label_weight`` times the label loss.

Every coefficient is a static keep-count schedule per bucket, so the set of
compiled train steps is fixed: one per (bucket, sampled middle coefficients).
The middle coefficients are drawn by a generator seeded with the step number,
so a resumed run draws the same ones.

Distillation loss, per example: classification uses ``T^2 * KL(p_T || q_T)``
with ``p_T``/``q_T`` the teacher/student softmax at temperature ``T``;
regression uses the squared difference of the two outputs.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from latadj_jax import schedule


@dataclasses.dataclass(frozen=True)
class AnytimeSpec:
  """The coefficients of an anytime run and how their losses are weighted."""
  coeffs: tuple[float, ...]        # ascending; coeffs[-1] is the teacher, coeffs[0] the smallest
  num_sampled: int = 1             # middle coefficients drawn per step (without replacement)
  temperature: float = 1.0
  distill_weight: float = 1.0      # weight of each student's distillation loss
  student_label_weight: float = 0.0  # weight of each student's label loss

  @property
  def teacher(self) -> float:
    return self.coeffs[-1]

  @property
  def smallest(self) -> float:
    return self.coeffs[0]

  @property
  def middle(self) -> tuple[float, ...]:
    return self.coeffs[1:-1]

  def draws(self) -> list[tuple[float, ...]]:
    """Returns every set of middle coefficients a step may draw (the compiled variants)."""
    n = min(self.num_sampled, len(self.middle))
    return [tuple(c) for c in itertools.combinations(self.middle, n)]

  def draw(self, seed: int, step: int) -> tuple[float, ...]:
    """Returns the middle coefficients of one step; a function of (seed, step) only."""
    n = min(self.num_sampled, len(self.middle))
    rnd = random.Random(seed * 1_000_003 + step)
    return tuple(sorted(rnd.sample(self.middle, n)))


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
  return AnytimeSpec(coeffs, num_sampled=int(config.get("anytime_samples", 1)),
                     temperature=float(config.get("distill_temperature", 1.0)),
                     distill_weight=float(config.get("distill_weight", 1.0)),
                     student_label_weight=float(config.get("student_label_weight", 0.0)))


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


def loss_terms(params, batch: dict, rng: jax.Array, *, module, spec: AnytimeSpec,
               schedules: dict[float, tuple[int, ...]], sampled: Sequence[float],
               is_regression: bool) -> dict[str, jax.Array]:
  """Returns the weighted loss sums of one (local) batch: the label term and each student's.

  ``schedules`` maps each coefficient to its keep counts for this batch's
  bucket; ``sampled`` are this step's middle coefficients.
  """
  def logits_at(k: float, i: int) -> jax.Array:
    return module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                        batch["token_type_ids"], keep_counts=schedules[k], deterministic=False,
                        rngs={"dropout": jax.random.fold_in(rng, i)})["logits"]

  w_B = batch["weights"]
  teacher = logits_at(spec.teacher, 0)
  terms = {"label": jnp.sum(label_loss(teacher, batch["labels"], is_regression) * w_B)}
  students = [("smallest", spec.smallest)] + [(f"sampled{j}", k) for j, k in enumerate(sampled)]
  for i, (name, k) in enumerate(students, start=1):
    student = logits_at(k, i)
    per_example = spec.distill_weight * distill_loss(teacher, student, is_regression,
                                                     spec.temperature)
    if spec.student_label_weight:
      per_example += spec.student_label_weight * label_loss(student, batch["labels"],
                                                            is_regression)
    terms[name] = jnp.sum(per_example * w_B)
  return terms

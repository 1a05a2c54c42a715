"""Elimination profiles, keep counts and the expected speedup (plain Python/NumPy).

Every rule the paper's lost equations left open is reconstructed here, in one
place, so it is easy to read and to swap (see docs/method.md):

* Profile (paper eq. 1-2, reconstructed): fit a smooth curve ``F(l)`` to the
  per-layer ACC points by least squares, set ``F(0) = 1`` and
  ``EP_l = min(1, F(l) / F(l-1))``. From the first layer where ``F`` rises,
  ``EP = 1`` for that layer and every later one.
* Keep ratio (eq. 1, 3, reconstructed): ``R_l = min(1, k * EP_l)``.
* Keep count: ``N_l = max(1, floor(R_l * N_{l-1}))`` with ``N_0`` the bucket length.
* Expected speedup (eq. 4-7): ``Ne_l = 0.25 N_{l-1} + 0.75 N_l`` and
  ``S = L * N_0 / sum_l Ne_l``.

Keep counts are Python ints, so every schedule is a static shape under ``jit``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Sequence

import numpy as np

# Share of an encoder layer's FLOPs spent before the Eliminate layer (paper Table I).
PRE_ELIMINATION_SHARE = 0.25
# Guards against float error turning e.g. 0.8 * 5 = 3.9999999 into 3.
_FLOOR_EPS = 1e-9


def validate_coeff(k: float) -> float:
  """Returns ``k`` as a float, or raises ValueError if it is not positive and finite."""
  try:
    value = float(k)
  except (TypeError, ValueError):
    raise ValueError(f"coeff must be a positive number, got {k!r}") from None
  if not math.isfinite(value) or value <= 0:
    raise ValueError(
        f"coeff must be a positive finite number (e.g. 0.9; 1 means no "
        f"elimination with a flat profile), got {k!r}")
  return value


def validate_profile(profile: Sequence[float], num_layers: int) -> tuple[float, ...]:
  """Returns the profile as a tuple, or raises ValueError on a bad length or value."""
  values = tuple(float(v) for v in profile)
  if len(values) != num_layers:
    raise ValueError(
        f"elimination profile has {len(values)} values but the model has "
        f"{num_layers} layers; give one value per layer")
  bad = [v for v in values if not (0 < v <= 1) or not math.isfinite(v)]
  if bad:
    raise ValueError(f"elimination profile values must lie in (0, 1], got {bad}")
  return values


def flat_profile(num_layers: int) -> tuple[float, ...]:
  """Returns the flat profile (EP = 1 everywhere): then R_l = min(1, k)."""
  return (1.0,) * num_layers


def step_profile(num_layers: int, layer: int, keep: float) -> tuple[float, ...]:
  """Returns the step profile: EP = ``keep`` at ``layer`` (1-based), 1 everywhere else.

  At k = 1 the first ``layer - 1`` layers keep every word-vector, layer ``layer``
  keeps the fraction ``keep``, and the rest keep all of those: one cut, placed
  after the early layers (GemFilter's and LazyLLM's observation for decoders).
  """
  if not 1 <= int(layer) <= num_layers:
    raise ValueError(f"step profile: layer must be in 1..{num_layers}, got {layer}")
  ep = [1.0] * num_layers
  ep[int(layer) - 1] = float(keep)
  return validate_profile(ep, num_layers)


def fit_acc(acc: Sequence[float], degree: int = 2) -> np.ndarray:
  """Returns the least-squares polynomial fit F(l) at l = 1..L of the ACC points."""
  acc = np.asarray(acc, dtype=np.float64)
  layers = np.arange(1, len(acc) + 1, dtype=np.float64)
  degree = min(degree, len(acc) - 1)
  coeffs = np.polyfit(layers, acc, degree)
  return np.polyval(coeffs, layers)


def profile_from_fit(fit: Sequence[float]) -> tuple[float, ...]:
  """Returns EP from a fitted ACC curve F(1..L), with F(0) = 1 and halting on a rise."""
  f = np.concatenate([[1.0], np.asarray(fit, dtype=np.float64)])
  ep = []
  halted = False
  for layer in range(1, len(f)):
    # A non-positive fit has no meaning as a contribution ratio: stop eliminating.
    halted = halted or f[layer] > f[layer - 1] or f[layer] <= 0
    ep.append(1.0 if halted else float(min(1.0, f[layer] / f[layer - 1])))
  return tuple(ep)


@dataclasses.dataclass(frozen=True)
class Profile:
  """A measured elimination profile: raw ACC points, their fit and EP."""
  acc: tuple[float, ...]
  fit: tuple[float, ...]
  ep: tuple[float, ...]

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def profile_from_acc(acc: Sequence[float], degree: int = 2) -> Profile:
  """Returns the Profile (fit and EP) for a measured ACC curve."""
  fit = fit_acc(acc, degree)
  return Profile(tuple(map(float, acc)), tuple(map(float, fit)), profile_from_fit(fit))


def keep_ratios(k: float, profile: Sequence[float]) -> tuple[float, ...]:
  """Returns R_l = min(1, k * EP_l) for each layer."""
  k = validate_coeff(k)
  return tuple(min(1.0, k * ep) for ep in profile)


def keep_counts(n0: int, k: float, profile: Sequence[float]) -> tuple[int, ...]:
  """Returns the keep counts N_1..N_L for bucket length ``n0`` (plain Python ints)."""
  if int(n0) != n0 or n0 < 1:
    raise ValueError(f"bucket length must be a positive integer, got {n0!r}")
  profile = validate_profile(profile, len(profile))
  counts, n = [], int(n0)
  for r in keep_ratios(k, profile):
    n = max(1, math.floor(r * n + _FLOOR_EPS))
    counts.append(n)
  return tuple(counts)


def effective_lengths(n0: int, counts: Sequence[int]) -> tuple[float, ...]:
  """Returns Ne_l = 0.25 N_{l-1} + 0.75 N_l, the word-vectors a layer effectively processes."""
  prev = (n0,) + tuple(counts[:-1])
  return tuple(PRE_ELIMINATION_SHARE * p + (1 - PRE_ELIMINATION_SHARE) * n
               for p, n in zip(prev, counts))


def expected_speedup(n0: int, counts: Sequence[int]) -> float:
  """Returns the paper's eq. 7 speedup S = L * N0 / sum_l Ne_l."""
  return len(counts) * n0 / sum(effective_lengths(n0, counts))


@dataclasses.dataclass(frozen=True)
class ScheduleInterval:
  """One distinct keep-count schedule and the k interval [k_lo, k_hi] that gives it."""
  k_lo: float
  k_hi: float
  counts: tuple[int, ...]


def _lowest_k(n0: int, counts: Sequence[int], profile: Sequence[float]) -> float:
  """Returns the smallest k that still gives ``counts`` (0 if every count is 1)."""
  prev, lowest = n0, 0.0
  for n, ep in zip(counts, profile):
    if n > 1:  # a count of 1 is held by the max(1, .) floor for any smaller k
      # Half the floor guard: at this k the count holds, just below it, it drops.
      lowest = max(lowest, (n - _FLOOR_EPS / 2) / (ep * prev))
    prev = n
  return lowest


def distinct_schedules(n0: int, profile: Sequence[float], k_min: float = 0.05,
                       k_max: float = 1.0) -> list[ScheduleInterval]:
  """Returns every distinct schedule for k in [k_min, k_max], from least to most elimination.

  Counts are step functions of k, so rather than scan a float grid we walk the
  steps exactly: the current schedule holds down to the largest
  ``N_l / (EP_l * N_{l-1})`` over its layers, and just below that one count drops.
  """
  profile = validate_profile(profile, len(profile))
  k_min, k = validate_coeff(k_min), validate_coeff(k_max)
  out: list[ScheduleInterval] = []
  while k >= k_min:
    counts = keep_counts(n0, k, profile)
    lo = _lowest_k(n0, counts, profile)
    out.append(ScheduleInterval(max(lo, k_min), k, counts))
    if lo <= 0:
      break
    k = lo * (1 - 1e-9)
  return out


def parse_profile(value: Any, num_layers: int) -> tuple[float, ...] | None:
  """Returns an explicit profile from ``"flat"``, ``"step<layer>@<keep>"``, ``"0.9,0.8,..."`` or a list.

  None means measure (``"acc"`` or empty).
  """
  if isinstance(value, str):
    if value in ("acc", ""):
      return None
    if value == "flat":
      return flat_profile(num_layers)
    step = re.fullmatch(r"step(\d+)@([0-9.eE+-]+)", value)
    if step:
      return step_profile(num_layers, int(step.group(1)), float(step.group(2)))
    try:
      value = [float(v) for v in value.split(",")]
    except ValueError:
      raise ValueError(f"a profile is flat, acc, step<layer>@<keep> or {num_layers} "
                       f"comma-separated values in (0, 1]; got {value!r}") from None
  return validate_profile(value, num_layers)

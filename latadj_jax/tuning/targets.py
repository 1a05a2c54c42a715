"""Targets instead of coefficients: the k for an expected speedup, the schedule for a latency budget.

Each bucket has its own length ``N0`` and therefore its own schedule, so each
bucket gets its own k. Keep counts are non-decreasing step functions of k (by
induction on ``N_l = max(1, floor(min(1, k EP_l) N_{l-1}))``), so the expected
speedup (eq. 7) falls as k rises, in steps. A speedup target is solved on the
exact list of distinct schedules (``schedule.distinct_schedules``), not on a
float grid: the answer is the first schedule, from least elimination down,
that reaches the target, and the k reported is the largest that gives it.

A latency budget needs measured latencies: ``calibrate`` times each bucket's
compiled executable at a grid of schedules on the current device and batch
size, and the table is stored in the workdir, named by device. The budget then
picks, per bucket, the least elimination whose measured latency fits.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from latadj_jax.core import schedule
from latadj_jax.runtime import timing
from latadj_jax.runtime import workdir as wd
from latadj_jax.tasks import classify

# Low enough that the step walk always reaches one kept word-vector per layer.
_K_FLOOR = 1e-12


class TargetError(ValueError):
  """No schedule reaches the requested speedup or latency; the message says what is on offer."""


@dataclasses.dataclass(frozen=True)
class Choice:
  """The schedule chosen for one bucket, and the k interval [k_lo, k] that gives it."""
  bucket: int
  k: float                          # the largest k giving ``counts`` (the least elimination)
  k_lo: float
  counts: tuple[int, ...]
  expected_speedup: float           # eq. 7 for this bucket
  latency_ms: float | None = None   # from the calibration table, for a latency budget
  met: bool = True                  # False: the target is out of reach; this is the most elimination

  def to_json(self) -> dict:
    return {**dataclasses.asdict(self), "counts": list(self.counts)}


def _positive_float(value: Any, name: str, hint: str) -> float:
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise ValueError(f"{name} must be a number ({hint}), got {value!r}") from None
  if not math.isfinite(x):
    raise ValueError(f"{name} must be finite ({hint}), got {value!r}")
  return x


def validate_speedup(value: Any) -> float:
  """Returns the speedup target as a float, or raises ValueError unless it is finite and >= 1."""
  x = _positive_float(value, "speedup", "an expected speedup such as 2.5")
  if x < 1:
    raise ValueError(f"speedup must be at least 1 (1 means no elimination), got {value!r}")
  return x


def validate_latency_ms(value: Any) -> float:
  """Returns the latency budget in ms, or raises ValueError unless it is finite and positive."""
  x = _positive_float(value, "latency_ms", "a per-batch budget in milliseconds such as 20")
  if x <= 0:
    raise ValueError(f"latency_ms must be positive, got {value!r}")
  return x


def k_ceiling(profile: Sequence[float]) -> float:
  """Returns the smallest k at which no layer eliminates (k * EP_l >= 1); larger k change nothing."""
  return 1.0 / min(profile)


@functools.lru_cache(maxsize=64)
def _ladder(n0: int, profile: tuple[float, ...]) -> tuple[schedule.ScheduleInterval, ...]:
  return tuple(schedule.distinct_schedules(n0, profile, k_min=_K_FLOOR, k_max=k_ceiling(profile)))


def ladder(n0: int, profile: Sequence[float]) -> tuple[schedule.ScheduleInterval, ...]:
  """Returns every distinct schedule of bucket ``n0``, from no elimination to one word-vector per layer."""
  return _ladder(int(n0), schedule.validate_profile(profile, len(profile)))


def max_speedup(n0: int, num_layers: int) -> float:
  """Returns the eq. 7 speedup of the most elimination: one word-vector kept after every layer."""
  return schedule.expected_speedup(n0, (1,) * num_layers)


def solve_speedup(n0: int, profile: Sequence[float], target: float) -> Choice:
  """Returns the largest-k schedule of bucket ``n0`` whose expected speedup reaches ``target``.

  When none does, returns the most elimination with ``met=False``.
  """
  target = validate_speedup(target)
  steps = ladder(n0, profile)
  for step in steps:
    s = schedule.expected_speedup(n0, step.counts)
    if s >= target:
      return Choice(n0, step.k_hi, step.k_lo, step.counts, s)
  last = steps[-1]
  return Choice(n0, last.k_hi, last.k_lo, last.counts,
                schedule.expected_speedup(n0, last.counts), met=False)


def for_coeff(buckets: Sequence[int], profile: Sequence[float], coeff: float) -> dict[int, Choice]:
  """Returns every bucket's schedule at one coefficient (what ``--coeff`` does)."""
  k = schedule.validate_coeff(coeff)
  out = {}
  for b in buckets:
    counts = schedule.keep_counts(b, k, profile)
    out[b] = Choice(b, k, k, counts, schedule.expected_speedup(b, counts))
  return out


def for_speedup(buckets: Sequence[int], profile: Sequence[float], target: float,
                strict: bool = True) -> dict[int, Choice]:
  """Returns each bucket's largest-k schedule reaching ``target``; raises TargetError if one can't."""
  choices = {b: solve_speedup(b, profile, target) for b in buckets}
  missed = [c for c in choices.values() if not c.met]
  if strict and missed:
    best = ", ".join(f"{c.expected_speedup:.2f}x in bucket {c.bucket}" for c in missed)
    raise TargetError(
        f"expected speedup {target:g}x is out of reach: even one word-vector kept per layer gives "
        f"at most {best} (eq. 7); ask for a smaller speedup")
  return choices


# --- latency budgets: calibration table and choice -------------------------------------------

def calibration_grid(n0: int, profile: Sequence[float], points: int = 12
                     ) -> list[schedule.ScheduleInterval]:
  """Returns about ``points`` schedules of bucket ``n0`` spread evenly in log expected speedup.

  The grid always holds no elimination, the schedule at k = 1 and the most
  elimination, ordered from least to most elimination.
  """
  steps = ladder(n0, profile)
  speedups = [schedule.expected_speedup(n0, s.counts) for s in steps]
  picks = {0, len(steps) - 1}
  for want in np.geomspace(1.0, speedups[-1], max(2, points)):
    picks.add(next(i for i, s in enumerate(speedups) if s >= want * (1 - 1e-9)))
  at_one = schedule.keep_counts(n0, 1.0, profile)
  picks.add(next(i for i, s in enumerate(steps) if s.counts == at_one))
  return [steps[i] for i in sorted(picks)]


def device_slug(device: str) -> str:
  """Returns ``device`` (e.g. ``timing.device_name()``) as a file-name-safe slug."""
  return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def calibration_path(workdir: str | Path, device: str, batch_size: int) -> Path:
  """Returns where the calibration table for ``device`` and ``batch_size`` lives in a workdir."""
  return Path(workdir) / f"calibration_{device_slug(device)}_b{int(batch_size)}.json"


def calibrate_command(workdir: str | Path, batch_size: int) -> str:
  return f"python eval.py --workdir={workdir} --calibrate --batch_size {batch_size}"


def check_calibration(table: dict, path: Path, profile: Sequence[float], workdir: str | Path,
                      batch_size: int) -> dict:
  """Returns ``table``, or raises TargetError when it was measured for another profile."""
  if not np.allclose(table["profile"], profile, rtol=0, atol=1e-9):
    raise TargetError(f"{path} was measured for another elimination profile; recalibrate: "
                      f"{calibrate_command(workdir, batch_size)}")
  return table


def synthetic_batch(batch_size: int, n0: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Returns a full [batch_size, n0] batch of random ids: latency depends on shapes, not on text."""
  ids = np.random.default_rng(seed).integers(0, vocab_size, (batch_size, n0), dtype=np.int32)
  return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def measure_bucket(clf: classify.Classifier, bucket: int, steps: Sequence[schedule.ScheduleInterval],
                   vocab_size: int, repeats: int = 10) -> list[float]:
  """Returns the median latency in ms of each schedule's cached executable on one full batch.

  The schedules are timed round-robin, so drift in machine load hits them alike.
  """
  batch = synthetic_batch(clf.batch_size, bucket, vocab_size)
  args = (clf.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  fns = {str(i): functools.partial(clf.executable(bucket, s.counts), *args)
         for i, s in enumerate(steps)}
  med = timing.interleaved_medians(fns, repeats=repeats, warmup=1)
  return [1e3 * med[str(i)] for i in range(len(steps))]


def calibrate(clf: classify.Classifier, profile: Sequence[float], vocab_size: int, points: int = 12,
              repeats: int = 10) -> dict:
  """Returns the calibration table: per bucket, a grid of schedules and their measured latency."""
  buckets = {}
  for b in clf.buckets:
    steps = calibration_grid(b, profile, points)
    latencies = measure_bucket(clf, b, steps, vocab_size, repeats)
    buckets[str(b)] = [{"counts": list(s.counts), "k_lo": s.k_lo, "k_hi": s.k_hi,
                        "expected_speedup": schedule.expected_speedup(b, s.counts),
                        "latency_ms": ms} for s, ms in zip(steps, latencies)]
  return {"device": timing.device_name(), "batch_size": clf.batch_size, "dtype": clf.dtype,
          "profile": list(profile), "repeats": repeats, "buckets": buckets}


def save_calibration(workdir: str | Path, table: dict) -> Path:
  """Writes the table to its device- and batch-named file in the workdir; returns the path."""
  path = calibration_path(workdir, table["device"], table["batch_size"])
  wd.write_json(path, table)
  return path


def load_calibration(workdir: str | Path, batch_size: int, profile: Sequence[float]) -> dict:
  """Returns this device's table for ``batch_size``, or raises TargetError saying how to make it."""
  path = calibration_path(workdir, timing.device_name(), batch_size)
  if not path.is_file():
    raise TargetError(f"a latency budget needs measured latencies, and {workdir} has no "
                      f"calibration for {timing.device_name()} at batch size {batch_size}; "
                      f"run {calibrate_command(workdir, batch_size)} first")
  return check_calibration(json.loads(path.read_text()), path, profile, workdir, batch_size)


def format_calibration(table: dict) -> str:
  """Returns the calibration table as text: one line per bucket and schedule."""
  lines = [f"calibration on {table['device']}, batch size {table['batch_size']} "
           f"(median of {table['repeats']} runs):"]
  for b, entries in table["buckets"].items():
    for e in entries:
      lines.append(f"  bucket {b}: k in [{e['k_lo']:.4g}, {e['k_hi']:.4g}] keep counts {e['counts']} "
                   f"expected {e['expected_speedup']:.2f}x  {e['latency_ms']:.3g} ms")
  return "\n".join(lines)


def pick_for_budget(bucket: int, entries: Sequence[dict], budget_ms: float) -> Choice:
  """Returns the least-elimination calibrated schedule within ``budget_ms``; else the fastest, unmet.

  ``entries`` run from least to most elimination, each with ``counts``, ``k_lo``,
  ``k_hi``, ``expected_speedup`` and ``latency_ms``.
  """
  def choice(e: dict, met: bool) -> Choice:
    return Choice(bucket, e["k_hi"], e["k_lo"], tuple(e["counts"]), e["expected_speedup"],
                  e["latency_ms"], met)
  for e in entries:
    if e["latency_ms"] <= budget_ms:
      return choice(e, True)
  return choice(min(entries, key=lambda e: e["latency_ms"]), False)


def for_budget(table: dict, buckets: Sequence[int], budget_ms: float,
               strict: bool = True) -> dict[int, Choice]:
  """Returns each bucket's least elimination whose measured latency fits; raises TargetError if one can't."""
  budget_ms = validate_latency_ms(budget_ms)
  lacking = [b for b in buckets if str(b) not in table["buckets"]]
  if lacking:
    raise TargetError(f"the calibration table has no bucket {lacking}; recalibrate with --calibrate")
  choices = {b: pick_for_budget(b, table["buckets"][str(b)], budget_ms) for b in buckets}
  missed = [c for c in choices.values() if not c.met]
  if strict and missed:
    best = ", ".join(f"{c.latency_ms:.3g} ms in bucket {c.bucket}" for c in missed)
    raise TargetError(
        f"latency budget {budget_ms:g} ms per batch of {table['batch_size']} is out of reach on "
        f"{table['device']}: no calibrated schedule fits, not even the most elimination; the "
        f"fastest takes {best}; raise the budget or use a smaller batch size")
  return choices


def choose(buckets: Sequence[int], profile: Sequence[float], *, coeff: float | None = None,
           speedup: float | None = None, latency_ms: float | None = None,
           table: dict | None = None) -> dict[int, Choice]:
  """Returns each bucket's schedule for one of ``coeff`` (default 1), ``speedup`` or ``latency_ms``."""
  given = [n for n, v in (("coeff", coeff), ("speedup", speedup), ("latency_ms", latency_ms))
           if v is not None]
  if len(given) > 1:
    raise ValueError(f"give at most one of coeff, speedup and latency_ms, got {' and '.join(given)}")
  if speedup is not None:
    return for_speedup(buckets, profile, validate_speedup(speedup))
  if latency_ms is not None:
    if table is None:
      raise TargetError("a latency budget needs a calibration table (run eval.py --calibrate)")
    return for_budget(table, buckets, latency_ms)
  return for_coeff(buckets, profile, 1.0 if coeff is None else coeff)


def format_choices(choices: dict[int, Choice], title: str) -> str:
  """Returns one line per bucket: the k chosen, its k interval, keep counts and speedup."""
  lines = [title]
  for b, c in sorted(choices.items()):
    # Full precision: the largest k often sits just below a step, where rounding it up
    # would give a different schedule.
    k = (f"k = {c.k:.10g}" if c.k_lo == c.k else
         f"k = {c.k:.10g} (any k from {c.k_lo:.4g} up to it gives these counts)")
    line = (f"  bucket {b}: {k}, keep counts {list(c.counts)}, "
            f"expected speedup {c.expected_speedup:.2f}x")
    if c.latency_ms is not None:
      line += f", calibrated latency {c.latency_ms:.3g} ms"
    lines.append(line + ("" if c.met else "  (target NOT met: the closest on offer)"))
  return "\n".join(lines)

"""Per-batch choice of k under a latency SLO: a latency table, a feed-forward pick and a slow feedback.

* ``LatencyTable``: lat[bucket][batch size][k] in ms, measured on this device
  (``backend.measure_table``) or loaded from the workdir.
* Feed-forward (SuperServe-style): each batch gets the highest k whose
  predicted time, times the measured ``margin``, fits the **oldest** request's
  remaining slack (SLO minus the time it has already waited), and leaves time
  for the batch after it: the texts queued now, or those that arrive while it
  runs at the recent rate.
* Feedback (Clipper's AIMD, on a cap over k instead of the batch size):
  every ``interval_s`` the windowed p99 of end-to-end latency is compared with
  the SLO: over it the cap drops two grid steps, over 0.8 x SLO one; under
  0.6 x SLO it rises one step; in between it holds, so k does not flap. Each
  change empties the window: the next cut waits for ``min_samples`` requests
  served under the new cap, so one late burst moves the cap once; the next
  raise waits 0.5 s more and ``raise_samples`` requests (cut fast, raise slowly).
* The predictions are corrected online by the tail (p95 over the last 32
  batches) of the ratio of measured to tabled model time (``margin``).

Everything takes the time from the caller (``now``), so tests drive it with a
fake clock.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Sequence


def padded_batch(n: int, batch_sizes: Sequence[int]) -> int:
  """Returns the smallest compiled batch size that holds ``n`` requests."""
  i = bisect.bisect_left(sorted(batch_sizes), n)
  if i == len(batch_sizes):
    raise ValueError(f"batch of {n} exceeds the largest compiled batch size {max(batch_sizes)}")
  return sorted(batch_sizes)[i]


def batch_sizes_up_to(max_batch_size: int) -> tuple[int, ...]:
  """Returns the compiled batch sizes: powers of two below ``max_batch_size``, then it."""
  if max_batch_size < 1:
    raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
  sizes, b = [], 1
  while b < max_batch_size:
    sizes.append(b)
    b *= 2
  return tuple(sizes) + (max_batch_size,)


def k_grid(k_min: float, k_max: float, points: int) -> tuple[float, ...]:
  """Returns ``points`` k values from ``k_max`` down to ``k_min`` (rounded to 4 places), highest first."""
  if not 0 < k_min <= k_max:
    raise ValueError(f"need 0 < k_min <= k_max, got k_min={k_min}, k_max={k_max}")
  if points < 1 or (points == 1 and k_min != k_max):
    raise ValueError(f"k_points must be at least 2 when k_min < k_max, got {points}")
  if k_min == k_max:
    return (k_max,)
  step = (k_max - k_min) / (points - 1)
  return tuple(round(k_max - i * step, 4) for i in range(points))


@dataclasses.dataclass
class LatencyTable:
  """Measured ms per (bucket, padded batch size, k), with the keep counts each k gives."""
  ms: dict[int, dict[int, dict[float, float]]]
  device: str = ""

  @property
  def buckets(self) -> tuple[int, ...]:
    return tuple(sorted(self.ms))

  @property
  def ks(self) -> tuple[float, ...]:
    """The k values present in every cell, highest first."""
    sets = [set(by_k) for by_b in self.ms.values() for by_k in by_b.values()]
    return tuple(sorted(set.intersection(*sets), reverse=True)) if sets else ()

  def batch_sizes(self, bucket: int) -> tuple[int, ...]:
    return tuple(sorted(self.ms[bucket]))

  def predict(self, bucket: int, batch: int, k: float) -> float:
    """Returns the predicted ms of a batch of ``batch`` requests in ``bucket`` at ``k``."""
    return self.ms[bucket][padded_batch(batch, self.batch_sizes(bucket))][k]

  def to_json(self) -> dict:
    return {"device": self.device,
            "ms": {str(b): {str(n): {str(k): v for k, v in by_k.items()} for n, by_k in by_n.items()}
                   for b, by_n in self.ms.items()}}

  @classmethod
  def from_json(cls, d: dict) -> "LatencyTable":
    ms = {int(b): {int(n): {float(k): float(v) for k, v in by_k.items()} for n, by_k in by_n.items()}
          for b, by_n in d["ms"].items()}
    return cls(ms, d.get("device", ""))

  def save(self, path: Path) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(self.to_json(), indent=1))
    tmp.replace(path)

  @classmethod
  def load(cls, path: Path) -> "LatencyTable":
    return cls.from_json(json.loads(Path(path).read_text()))


def choose_k(table: LatencyTable, ks: Sequence[float], bucket: int, batch: int, slack_ms: float,
             margin: float = 1.0, next_batch: int = 0, next_slack_ms: float = math.inf,
             rate_per_ms: float = 0.0, budget_ms: float = math.inf) -> float:
  """Returns the highest of ``ks`` whose predicted time x ``margin`` fits ``slack_ms`` (else the lowest).

  The batch after this one must fit too, at the same k: it holds the
  ``next_batch`` texts queued now, or, if more, those that arrive while this
  batch runs at ``rate_per_ms``; it must finish within the slack of its oldest
  text (``next_slack_ms`` for a queued one, ``budget_ms`` for one arriving as
  this batch starts). A queue that is building, or a rate that would build
  one, lowers k before anyone is late.
  """
  ordered = sorted(ks, reverse=True)
  largest = max(table.batch_sizes(bucket))
  for k in ordered:
    t = table.predict(bucket, batch, k) * margin
    expected = math.floor(rate_per_ms * t + 0.5)   # rounded: ceil would expect one at any rate
    following = min(largest, max(next_batch, expected))
    after = t + table.predict(bucket, following, k) * margin if following else t
    limit = next_slack_ms if next_batch else budget_ms
    if t <= slack_ms and after <= limit:
      return k
  return ordered[-1]


def percentile(values: Iterable[float], q: float) -> float:
  """Returns the ``q``-th percentile (nearest rank) of ``values``, or NaN when empty."""
  xs = sorted(values)
  if not xs:
    return math.nan
  return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


@dataclasses.dataclass
class Feedback:
  """Clipper-style AIMD on a cap over k, from the windowed p99 of end-to-end latency.

  Every ``interval_s``: a p99 over the SLO lowers the cap two grid steps (the
  multiplicative cut), a p99 over ``high`` x SLO one step; a p99 under ``low``
  x SLO raises it one step; in between it holds (the hysteresis band), so k
  does not flap. A change empties the window, and no decision is taken on
  fewer than ``min_samples`` requests: each decision judges only requests
  served under the current cap, so a burst that is already answered for does
  not cut again while it ages out of the window. A raise also waits until
  ``raise_after_s`` has passed since the last change: cuts are fast, raises
  slow, as in AIMD. A raise needs only ``raise_samples`` requests: at light
  load 16 take most of a second to arrive, and a cap left low by a burst would
  otherwise climb back one step per second. ``cap`` indexes the policy's k
  grid, highest k first.
  """
  slo_ms: float
  steps: int                     # grid points below k_max
  window_s: float = 1.0
  interval_s: float = 0.25
  high: float = 0.8
  low: float = 0.6
  min_samples: int = 16
  raise_samples: int = 8
  raise_after_s: float = 0.5
  cap: int = 0
  _samples: collections.deque = dataclasses.field(default_factory=collections.deque)
  _last_update: float = -math.inf
  _last_change: float = -math.inf

  def observe(self, latency_ms: float, now: float) -> None:
    """Records one finished request's end-to-end latency at time ``now`` (seconds)."""
    self._samples.append((now, latency_ms))

  def p99(self, now: float) -> float:
    """Returns the p99 of the samples of the last ``window_s`` (NaN when there are none)."""
    while self._samples and self._samples[0][0] < now - self.window_s:
      self._samples.popleft()
    return percentile((ms for _, ms in self._samples), 99)

  def update(self, now: float) -> int:
    """Returns the cap, first adjusting it if ``interval_s`` has passed since the last decision."""
    if now - self._last_update < self.interval_s:
      return self.cap
    p99, n = self.p99(now), len(self._samples)
    may_raise = (n >= min(self.raise_samples, self.min_samples) and p99 < self.low * self.slo_ms
                 and now - self._last_change >= self.raise_after_s)
    if not n or (n < self.min_samples and not may_raise):
      return self.cap                # cuts and holds wait for min_samples requests
    self._last_update = now
    old = self.cap
    if p99 > self.slo_ms:
      self.cap = min(self.steps, self.cap + 2)
    elif p99 > self.high * self.slo_ms:
      self.cap = min(self.steps, self.cap + 1)
    elif may_raise:
      self.cap = max(0, self.cap - 1)
    if self.cap != old:
      self._samples.clear()
      self._last_change = now
    return self.cap


@dataclasses.dataclass
class KPolicy:
  """Chooses k for each batch: fixed (``adaptive=False``: always ``k_max``) or adaptive.

  Adaptive: the highest k, at most the feedback's cap, whose predicted time
  fits the oldest request's slack. Predictions are the latency table's times
  x ``margin``: the ``margin_q``-th percentile of the ratio of measured to
  tabled model time over the last ``margin_batches`` batches. A table timed on
  an idle machine is optimistic under load, and a mean ratio would still be
  beaten by every slower-than-usual batch; the tail ratio plans for them.
  ``overhead_ms`` is reserved from the slack for the time a request spends
  outside the model.
  """
  table: LatencyTable
  slo_ms: float
  k_min: float
  k_max: float
  adaptive: bool = True
  overhead_ms: float = 0.0
  feedback: Feedback | None = None
  margin: float = 1.0
  margin_q: float = 95.0
  margin_batches: int = 32
  rate_window_s: float = 1.0      # the arrival rate is the finished requests of this window

  def __post_init__(self):
    if self.slo_ms <= 0:
      raise ValueError(f"slo_ms must be positive, got {self.slo_ms}")
    self.ks = tuple(k for k in self.table.ks if self.k_min - 1e-9 <= k <= self.k_max + 1e-9)
    if not self.ks:
      raise ValueError(f"no k of the latency table {self.table.ks} lies in "
                       f"[k_min={self.k_min}, k_max={self.k_max}]")
    if self.feedback is None:
      self.feedback = Feedback(self.slo_ms, steps=len(self.ks) - 1)
    self._ratios = collections.deque(maxlen=self.margin_batches)
    self._finished: collections.deque = collections.deque()

  @property
  def k_cap(self) -> float:
    return self.ks[self.feedback.cap]

  def choose(self, bucket: int, batch: int, oldest_arrival: float, now: float,
             next_arrival: float | None = None, next_batch: int = 0) -> float:
    """Returns the k of a batch of ``batch`` texts whose oldest request arrived at ``oldest_arrival``;
    ``next_batch`` texts wait behind it, the oldest since ``next_arrival``."""
    if not self.adaptive:
      return self.ks[0]
    cap = self.feedback.update(now)
    slack = lambda arrival: self.slo_ms - 1e3 * (now - arrival) - self.overhead_ms
    next_slack = slack(next_arrival) if next_arrival is not None else math.inf
    return choose_k(self.table, self.ks[cap:], bucket, batch, slack(oldest_arrival), self.margin,
                    next_batch, next_slack, self.rate_per_ms(now), self.slo_ms - self.overhead_ms)

  def rate_per_ms(self, now: float) -> float:
    """Returns the requests finished per ms over the last ``rate_window_s`` (the arrival rate, in
    steady state)."""
    while self._finished and self._finished[0] < now - self.rate_window_s:
      self._finished.popleft()
    return len(self._finished) / (1e3 * self.rate_window_s)

  def observe(self, latency_ms: float, now: float) -> None:
    """Records a request's end-to-end latency for the feedback and the arrival rate."""
    self.feedback.observe(latency_ms, now)
    self._finished.append(now)

  def observe_batch(self, bucket: int, batch: int, k: float, seconds: float) -> None:
    """Updates the margin from one batch's measured model time."""
    ratio = 1e3 * seconds / self.table.predict(bucket, batch, k)
    self._ratios.append(min(4.0, max(0.5, ratio)))
    self.margin = percentile(self._ratios, self.margin_q)

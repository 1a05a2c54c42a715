"""Per-batch choice of k under a latency SLO: a latency table, a feed-forward pick and a slow feedback.

* ``LatencyTable``: lat[bucket][batch size][k] in ms, measured on this device
  (``backend.measure_table``) or loaded from the workdir.
* Feed-forward (SuperServe-style): each batch gets the highest k whose
  predicted time, times the feedback's ``margin``, fits the **oldest** request's
  remaining slack (SLO minus the time it has already waited).
* Feedback (Clipper's AIMD, on a safety margin instead of the batch size):
  every ``interval_s`` the windowed p99 of end-to-end latency is compared with
  the SLO. Above it the margin grows multiplicatively (lower k sooner); below
  ``low_water`` x SLO it shrinks additively towards 1; in between it holds, so
  k does not flap.

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
             margin: float = 1.0) -> float:
  """Returns the highest of ``ks`` whose predicted time x ``margin`` fits ``slack_ms`` (else the lowest)."""
  ordered = sorted(ks, reverse=True)
  for k in ordered:
    if table.predict(bucket, batch, k) * margin <= slack_ms:
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
  """AIMD on the safety margin from the windowed p99 of end-to-end latency, with hysteresis."""
  slo_ms: float
  window_s: float = 2.0
  interval_s: float = 0.5
  low_water: float = 0.6         # below low_water x SLO the margin shrinks; between, it holds
  increase: float = 1.25         # multiplicative step up when p99 > SLO
  decrease: float = 0.1          # additive step down
  max_margin: float = 3.0
  margin: float = 1.0
  _samples: collections.deque = dataclasses.field(default_factory=collections.deque)
  _last_update: float = -math.inf

  def observe(self, latency_ms: float, now: float) -> None:
    """Records one finished request's end-to-end latency at time ``now`` (seconds)."""
    self._samples.append((now, latency_ms))

  def p99(self, now: float) -> float:
    while self._samples and self._samples[0][0] < now - self.window_s:
      self._samples.popleft()
    return percentile((ms for _, ms in self._samples), 99)

  def update(self, now: float) -> float:
    """Returns the margin, first adjusting it if ``interval_s`` has passed since the last change."""
    if now - self._last_update < self.interval_s:
      return self.margin
    p99 = self.p99(now)
    if math.isnan(p99):
      return self.margin
    self._last_update = now
    if p99 > self.slo_ms:
      self.margin = min(self.max_margin, self.margin * self.increase)
    elif p99 < self.low_water * self.slo_ms:
      self.margin = max(1.0, self.margin - self.decrease)
    return self.margin


@dataclasses.dataclass
class KPolicy:
  """Chooses k for each batch: fixed (``adaptive=False``: always ``k_max``) or adaptive.

  ``overhead_ms`` is added to each prediction: the time a request spends
  outside the model (HTTP, JSON, tokenizing), measured or set by the caller.
  """
  table: LatencyTable
  slo_ms: float
  k_min: float
  k_max: float
  adaptive: bool = True
  overhead_ms: float = 0.0
  feedback: Feedback | None = None

  def __post_init__(self):
    if self.slo_ms <= 0:
      raise ValueError(f"slo_ms must be positive, got {self.slo_ms}")
    self.ks = tuple(k for k in self.table.ks if self.k_min - 1e-9 <= k <= self.k_max + 1e-9)
    if not self.ks:
      raise ValueError(f"no k of the latency table {self.table.ks} lies in "
                       f"[k_min={self.k_min}, k_max={self.k_max}]")
    if self.feedback is None:
      self.feedback = Feedback(self.slo_ms)

  def choose(self, bucket: int, batch: int, oldest_arrival: float, now: float) -> float:
    """Returns the k of a batch of ``batch`` requests whose oldest arrived at ``oldest_arrival``."""
    if not self.adaptive:
      return max(self.ks)
    margin = self.feedback.update(now)
    slack = self.slo_ms - 1e3 * (now - oldest_arrival) - self.overhead_ms
    return choose_k(self.table, self.ks, bucket, batch, slack, margin)

  def observe(self, latency_ms: float, now: float) -> None:
    self.feedback.observe(latency_ms, now)

"""The one coefficient sweep: every task's results at any ``k``, with eq. 7, XLA FLOPs and latency.

A task supplies an ``Evaluation`` (how to score the data at per-bucket keep
counts, and which compiled forward to time); this module does the rest, the
same way for classifiers, language models, continuations and few-shot
prompts. The speedups are honest: the baseline is the same model and the same
bucket with no elimination (``k = 1``, flat profile), each timing interleaved
with its baseline in its own pair (``timing.interleaved_medians``).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Protocol, Sequence

from latadj_jax.core import schedule
from latadj_jax.runtime import timing
from latadj_jax.runtime.timing import Timed

class Schedules(dict):
  """Keep counts by bucket length; a bucket not given gets the counts of ``coeff`` and ``profile``.

  A task may run lengths besides its main data's buckets (an LM's last-word
  passages), so the sweep hands it the rule, not only a table.
  """

  def __init__(self, counts: Mapping[int, tuple[int, ...]], coeff: float,
               profile: Sequence[float]):
    super().__init__(counts)
    self.coeff, self.profile = coeff, tuple(profile)

  def __missing__(self, bucket: int) -> tuple[int, ...]:
    self[bucket] = schedule.keep_counts(bucket, self.coeff, self.profile)
    return self[bucket]


class Evaluation(Protocol):
  """What a task supplies to ``sweep``."""
  num_layers: int
  metrics: Mapping[str, str]  # reported metric -> table format ("%": x100, else a format spec)

  def bucket_sizes(self) -> dict[int, int]:
    """Returns how many items fall in each length bucket."""

  def score(self, schedules: Mapping[int, tuple[int, ...]]) -> dict[str, Any]:
    """Returns the metrics (and any per-item outputs) at these per-bucket keep counts."""

  def timed(self, bucket: int, counts: tuple[int, ...]) -> dict[str, Timed]:
    """Returns what to time at ``counts`` by name ("latency", "prefill", ...); the first is the
    one ``measured_speedup`` and ``flops_ratio`` report."""


def plans(coeffs: Sequence[float], profile: Sequence[float]) -> list[tuple[float, Schedules]]:
  """Returns ``(k, its Schedules)`` for each coefficient."""
  return [(k, Schedules({}, k, profile)) for k in map(schedule.validate_coeff, coeffs)]


def schedules_for(coeff: float, profile: Sequence[float], buckets: Sequence[int]) -> dict[int, tuple[int, ...]]:
  """Returns the keep counts of every bucket at coefficient ``coeff``."""
  return {b: schedule.keep_counts(b, coeff, profile) for b in buckets}


def dataset_expected_speedup(bucket_sizes: Mapping[int, int],
                             schedules: Mapping[int, tuple[int, ...]]) -> float:
  """Returns eq. 7 summed over the data: full-model cost over eliminated cost, every bucket."""
  full = sum(n * len(schedules[b]) * b for b, n in bucket_sizes.items())
  cut = sum(n * sum(schedule.effective_lengths(b, schedules[b])) for b, n in bucket_sizes.items())
  return full / cut


def main_bucket(bucket_sizes: Mapping[int, int]) -> int:
  """Returns the bucket that holds the most items (ties: the first listed)."""
  return max(bucket_sizes, key=bucket_sizes.get)


def sweep(ev: Evaluation, runs: Sequence[tuple[float, Mapping[int, tuple[int, ...]]]], *,
          repeats: int = 10, progress: bool = True) -> list[dict]:
  """Returns one row per ``(k, schedules)``: the task's metrics, the main bucket's keep counts,
  expected (eq. 7), XLA-FLOPs and measured speedups, latencies and the time to score.

  The schedules may come from a different k in each bucket (a speedup target
  or a latency budget); ``k`` is the one reported.
  """
  sizes = ev.bucket_sizes()
  main = main_bucket(sizes)
  base = ev.timed(main, schedule.keep_counts(main, 1.0, schedule.flat_profile(ev.num_layers)))
  iterator = runs
  if progress:
    from tqdm.auto import tqdm
    iterator = tqdm(runs, desc="coeff sweep", unit="k")
  rows = []
  for k, scheds in iterator:
    t0 = time.perf_counter()
    row = {"coeff": k, **ev.score(scheds)}
    row["eval_seconds"] = time.perf_counter() - t0
    counts = scheds[main]
    row.update(main_bucket=main, keep_counts=list(counts),
               keep_counts_by_bucket={str(b): list(scheds[b]) for b in sorted(sizes)},
               expected_speedup=schedule.expected_speedup(main, counts),
               expected_speedup_all_buckets=dataset_expected_speedup(sizes, scheds))
    timed = ev.timed(main, counts)
    for i, (name, t) in enumerate(timed.items()):
      med = timing.interleaved_medians({"base": base[name].run, "elim": t.run}, repeats=repeats,
                                       warmup=1)
      row[f"{name}_ms"], row[f"baseline_{name}_ms"] = 1e3 * med["elim"], 1e3 * med["base"]
      row[f"{name}_speedup"] = med["base"] / med["elim"]
      if t.unit:
        row[f"{t.unit}_per_s"] = t.units / med["elim"]
      if i == 0:
        row["measured_speedup"] = row[f"{name}_speedup"]
        row["flops_ratio"] = base[name].flops / t.flops
    rows.append(row)
  return rows


def _cell(value: Any, fmt: str) -> str:
  if not isinstance(value, (int, float)):
    return "-"
  return f"{100 * value:.2f}" if fmt == "%" else format(value, fmt)


def format_table(rows: Sequence[dict], metrics: Mapping[str, str]) -> str:
  """Returns the sweep as a Markdown table: k, each metric, the schedule and the speedups."""
  timings = [k[:-3] for k in rows[0] if k.endswith("_ms") and not k.startswith("baseline_")]
  rate = next((k for k in rows[0] if k.endswith("_per_s")), None)
  head = (["coeff", *(m.replace("_", " ") for m in metrics), "keep counts (main bucket)", "expected", "FLOPs ratio", "measured",
           *(f"{t} ms" for t in timings)] + ([rate.replace("_per_s", "/s")] if rate else []))
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    c = r["keep_counts"]
    counts = f"{r['main_bucket']}: {c}" if len(c) <= 12 else f"{r['main_bucket']}: {c[0]} … {c[-1]}"
    cells = ([f"{r['coeff']:g}"] + [_cell(r.get(m), f) for m, f in metrics.items()]
             + [counts, f"{r['expected_speedup']:.2f}x", f"{r['flops_ratio']:.2f}x",
                f"{r['measured_speedup']:.2f}x"]
             + [_cell(r.get(t + "_ms"), ".1f") for t in timings] + ([f"{r[rate]:.0f}"] if rate else []))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)

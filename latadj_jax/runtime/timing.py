"""Honest timing: XLA FLOP counts, and interleaved median latencies in one process."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timed:
  """One real batch's compiled forward at one schedule, ready to time."""
  run: Callable[[], Any]      # zero-argument call
  flops: float = math.nan     # XLA's count (``timing.compiled_flops``), when it is one executable
  units: int = 0              # examples or tokens one call processes, for a throughput column
  unit: str = ""


def compiled_flops(compiled: jax.stages.Compiled) -> float:
  """Returns the FLOPs XLA counts for a compiled executable (``cost_analysis()['flops']``)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returned one dict per device
    cost = cost[0]
  return float(cost.get("flops", float("nan"))) if cost else float("nan")


def block(x):
  """Returns ``x`` once every array in it is computed."""
  return jax.block_until_ready(x)


def interleaved_medians(fns: Mapping[str, Callable[[], object]], repeats: int = 10,
                        warmup: int = 2, min_seconds: float = 0.0) -> dict[str, float]:
  """Returns the median wall seconds of each zero-argument function, timed round-robin.

  Runs are interleaved (a, b, c, a, b, c, ...) so that drift in machine load
  hits every candidate alike; that is what makes the ratios trustworthy on a
  noisy machine. ``min_seconds`` keeps sampling past ``repeats`` until that
  much time has gone by.
  """
  for _ in range(warmup):
    for fn in fns.values():
      block(fn())
  samples: dict[str, list[float]] = {name: [] for name in fns}
  start = time.perf_counter()
  rounds = 0
  while rounds < repeats or time.perf_counter() - start < min_seconds:
    for name, fn in fns.items():
      t0 = time.perf_counter()
      block(fn())
      samples[name].append(time.perf_counter() - t0)
    rounds += 1
  return {name: float(np.median(s)) for name, s in samples.items()}


def device_name() -> str:
  """Returns a short description of the default device, for result tables."""
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  if dev.platform == "cpu":
    import os
    return f"CPU ({os.cpu_count()} cores, {kind})"
  return f"{dev.platform.upper()} {kind}"

"""Evaluation and offline tuning: any ``k`` on one set of weights, with a compiled-executable cache.

Executables are keyed by the keep counts, not by ``k``: two coefficients that
give the same counts share one executable. The in-memory cache holds AOT
``jit(...).lower(...).compile()`` results; the JAX persistent compilation cache
(``runtime.xla_cache``) keeps the compiled XLA programs on disk so a second
process skips compiling.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from latadj_jax.core import metrics, schedule
from latadj_jax.data import pipeline
from latadj_jax.runtime import multihost, timing


@dataclasses.dataclass
class CacheStats:
  hits: int = 0
  misses: int = 0
  lower_seconds: float = 0.0     # tracing + lowering to HLO
  compile_seconds: float = 0.0   # XLA compile (or a persistent-cache load)
  disk_hits: int = 0             # of the misses, executables loaded whole from ``disk_dir``
  disk_seconds: float = 0.0

  def __str__(self) -> str:
    disk = f", {self.disk_hits} loaded from disk in {self.disk_seconds:.1f} s" if self.disk_hits else ""
    return (f"executable cache: {self.hits} hits, {self.misses} misses, "
            f"{self.lower_seconds:.1f} s tracing+lowering, {self.compile_seconds:.1f} s compiling{disk}")


def code_fingerprint() -> str:
  """Returns a hash of this package's model and elimination code and the JAX versions.

  Serialized executables are keyed by it, so an edited model or an upgraded
  jaxlib never loads a stale program.
  """
  import hashlib
  from pathlib import Path
  import jaxlib
  root = Path(__file__).resolve().parents[1]
  h = hashlib.sha256(f"{jax.__version__} {jaxlib.__version__}".encode())
  for path in sorted([*root.glob("models/*.py"), *root.glob("core/*.py"), Path(__file__)]):
    h.update(path.read_bytes())
  return h.hexdigest()[:16]


class ExecutableCache:
  """Compiled forward passes keyed by (model id, bucket, batch, keep counts, dtype).

  With ``disk_dir`` every executable is also serialized there whole (JAX's
  ``serialize_executable``), so a later process skips tracing and lowering as
  well as compiling; entries are keyed by the key and ``code_fingerprint()``.
  """

  def __init__(self, disk_dir=None):
    self._executables: dict[tuple, jax.stages.Compiled] = {}
    self.stats = CacheStats()
    self.disk_dir = disk_dir
    self._fingerprint = code_fingerprint() if disk_dir else ""

  def __len__(self) -> int:
    return len(self._executables)

  def _disk_path(self, key: tuple):
    import hashlib
    from pathlib import Path
    name = hashlib.sha256(repr((key, self._fingerprint)).encode()).hexdigest()[:32]
    return Path(self.disk_dir) / f"{name}.exe"

  def _load(self, key: tuple) -> jax.stages.Compiled | None:
    import pickle
    from jax.experimental import serialize_executable
    path = self._disk_path(key)
    if not path.is_file():
      return None
    t0 = time.perf_counter()
    try:
      payload, in_tree, out_tree = pickle.loads(path.read_bytes())
      compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
    except Exception:  # unreadable or from another build: compile instead, and overwrite it
      return None
    self.stats.disk_hits += 1
    self.stats.disk_seconds += time.perf_counter() - t0
    return compiled

  def _save(self, key: tuple, compiled: jax.stages.Compiled) -> None:
    import os
    import pickle
    from jax.experimental import serialize_executable
    path = self._disk_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(serialize_executable.serialize(compiled)))
    tmp.replace(path)

  def get(self, key: tuple, lower: Callable[[], jax.stages.Lowered]) -> jax.stages.Compiled:
    """Returns the executable for ``key``, from memory, from disk, or lowered and compiled."""
    if key in self._executables:
      self.stats.hits += 1
      return self._executables[key]
    self.stats.misses += 1
    compiled = self._load(key) if self.disk_dir else None
    if compiled is None:
      t0 = time.perf_counter()
      lowered = lower()
      t1 = time.perf_counter()
      compiled = lowered.compile()
      self.stats.lower_seconds += t1 - t0
      self.stats.compile_seconds += time.perf_counter() - t1
      if self.disk_dir:
        self._save(key, compiled)
    self._executables[key] = compiled
    return compiled


def _logits_fn(module: Any, keep_counts: tuple[int, ...]):
  def logits(params, input_ids, attention_mask, token_type_ids):
    return module.apply({"params": params}, input_ids, attention_mask, token_type_ids,
                        keep_counts=keep_counts)["logits"]
  return logits


@dataclasses.dataclass
class Classifier:
  """A sequence classifier ready to evaluate: module, weights, data and the cache."""
  module: Any
  params: Any
  encoded: pipeline.Encoded
  buckets: tuple[int, ...]
  batch_size: int
  num_layers: int
  model_id: str
  dtype: str = "float32"
  cache: ExecutableCache = dataclasses.field(default_factory=ExecutableCache)

  def executable(self, bucket: int, counts: tuple[int, ...]) -> jax.stages.Compiled:
    """Returns the compiled forward pass for one bucket and keep-count schedule."""
    key = (self.model_id, bucket, self.batch_size, counts, self.dtype)
    spec = jax.ShapeDtypeStruct((self.batch_size, bucket), jnp.int32)
    lower = lambda: jax.jit(_logits_fn(self.module, counts)).lower(self.params, spec, spec, spec)
    return self.cache.get(key, lower)

  def batches(self, pad_id: int = 0):
    return pipeline.batch_iterator(self.encoded, self.batch_size, self.buckets,
                                   shuffle=False, pad_id=pad_id)

  def predict(self, schedules: dict[int, tuple[int, ...]],
              across_processes: bool = False) -> np.ndarray:
    """Returns the logits of every example, in input order.

    With ``across_processes`` every process must call it (``self.params``
    local to each): each computes every n-th batch and all get every row.
    """
    out, owned = None, np.zeros(len(self.encoded.labels), bool)
    i, n = multihost.part() if across_processes else (0, 1)
    for j, batch in enumerate(self.batches()):
      if j % n != i:
        continue
      exe = self.executable(batch["input_ids"].shape[1], schedules[batch["input_ids"].shape[1]])
      logits = np.asarray(exe(self.params, batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"]))
      if out is None:
        out = np.zeros((len(self.encoded.labels), logits.shape[-1]), np.float32)
      real = batch["index"] >= 0
      out[batch["index"][real]] = logits[real]
      owned[batch["index"][real]] = True
    if not across_processes:
      return out
    if out is None:  # this process had no batch: its share is empty, of the same shape
      b = next(iter(schedules))
      spec = jax.ShapeDtypeStruct((self.batch_size, b), jnp.int32)
      width = jax.eval_shape(_logits_fn(self.module, schedules[b]), self.params, spec, spec,
                             spec).shape[-1]
      out = np.zeros((len(self.encoded.labels), width), np.float32)
    return multihost.gather_rows(out, owned)

  def bucket_counts(self) -> dict[int, int]:
    """Returns how many examples fall in each bucket."""
    lengths = [len(ids) for ids in self.encoded.input_ids]
    counts: dict[int, int] = {}
    for n in lengths:
      b = pipeline.bucket_of(n, self.buckets)
      counts[b] = counts.get(b, 0) + 1
    return counts

  def main_bucket(self) -> int:
    """Returns the bucket that holds the most examples."""
    counts = self.bucket_counts()
    return max(counts, key=counts.get)


def schedules_for(coeff: float, profile: Sequence[float], buckets: Sequence[int]) -> dict[int, tuple[int, ...]]:
  """Returns the keep counts of every bucket at coefficient ``coeff``."""
  return {b: schedule.keep_counts(b, coeff, profile) for b in buckets}


def predictions(logits: np.ndarray, is_regression: bool) -> np.ndarray:
  """Returns class ids (argmax), or the regression score."""
  return logits[:, 0] if is_regression else logits.argmax(-1)


def dataset_expected_speedup(bucket_sizes: dict[int, int], schedules: dict[int, tuple[int, ...]]) -> float:
  """Returns eq. 7 summed over the data: full-model cost over eliminated cost, all buckets."""
  full = sum(n * len(schedules[b]) * b for b, n in bucket_sizes.items())
  cut = sum(n * sum(schedule.effective_lengths(b, schedules[b])) for b, n in bucket_sizes.items())
  return full / cut


def sample_batch(clf: Classifier, bucket: int) -> dict[str, np.ndarray]:
  """Returns the first real eval batch of ``bucket`` (for timing)."""
  for batch in clf.batches():
    if batch["input_ids"].shape[1] == bucket:
      return batch
  raise ValueError(f"no eval batch in bucket {bucket}")


def sweep(clf: Classifier, coeffs: Sequence[float], profile: Sequence[float], task_metrics: Sequence[str],
          is_regression: bool, time_repeats: int = 10, progress: bool = True) -> list[dict]:
  """Returns one report row per coefficient: metrics, schedule, expected/FLOPs/measured speedups."""
  coeffs = [schedule.validate_coeff(k) for k in coeffs]
  sizes = clf.bucket_counts()
  plans = [(k, schedules_for(k, profile, sizes)) for k in coeffs]
  return sweep_schedules(clf, plans, task_metrics, is_regression, time_repeats, progress)


def sweep_schedules(clf: Classifier, plans: Sequence[tuple[float, dict[int, tuple[int, ...]]]],
                    task_metrics: Sequence[str], is_regression: bool, time_repeats: int = 10,
                    progress: bool = True) -> list[dict]:
  """Returns one report row per ``(coeff, per-bucket schedules)`` plan, as ``sweep`` does.

  The schedules may come from a different k in each bucket (a speedup target or
  a latency budget); ``coeff`` is the one reported, usually the main bucket's.
  """
  flat = schedule.flat_profile(clf.num_layers)
  main = clf.main_bucket()
  sizes = clf.bucket_counts()
  base_exe = clf.executable(main, schedule.keep_counts(main, 1.0, flat))
  base_flops = timing.compiled_flops(base_exe)
  batch = sample_batch(clf, main)
  args = (clf.params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  labels, weights = clf.encoded.labels, None
  rows = []
  iterator = plans
  if progress:
    from tqdm.auto import tqdm
    iterator = tqdm(plans, desc="coeff sweep", unit="k")
  for k, scheds in iterator:
    t0 = time.perf_counter()
    logits = clf.predict(scheds)
    eval_seconds = time.perf_counter() - t0
    preds = predictions(logits, is_regression)
    has_labels = labels is not None and (np.asarray(labels) >= 0).any() or is_regression
    scores = metrics.compute_metrics(task_metrics, preds, labels, weights) if has_labels else {}
    exe = clf.executable(main, scheds[main])
    med = timing.interleaved_medians({"base": functools.partial(base_exe, *args),
                                      "elim": functools.partial(exe, *args)},
                                     repeats=time_repeats, warmup=1)
    rows.append({
        "coeff": k, **scores,
        "main_bucket": main, "keep_counts": list(scheds[main]),
        "expected_speedup": schedule.expected_speedup(main, scheds[main]),
        "expected_speedup_all_buckets": dataset_expected_speedup(sizes, scheds),
        "flops_ratio": base_flops / timing.compiled_flops(exe),
        "latency_ms": 1e3 * med["elim"], "baseline_latency_ms": 1e3 * med["base"],
        "examples_per_s": clf.batch_size / med["elim"],
        "measured_speedup": med["base"] / med["elim"],
        "eval_seconds": eval_seconds,
    })
  return rows


def format_table(rows: Sequence[dict], metric_names: Sequence[str]) -> str:
  """Returns the sweep as a Markdown table."""
  head = (["coeff"] + list(metric_names) +
          ["keep counts (main bucket)", "expected", "FLOPs ratio", "measured", "latency ms", "ex/s"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [f"{r['coeff']:g}"] + [f"{100 * r[m]:.2f}" if m in r else "-" for m in metric_names]
    cells += [f"{r['main_bucket']}: {r['keep_counts']}", f"{r['expected_speedup']:.2f}x",
              f"{r['flops_ratio']:.2f}x", f"{r['measured_speedup']:.2f}x",
              f"{r['latency_ms']:.1f}", f"{r['examples_per_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)

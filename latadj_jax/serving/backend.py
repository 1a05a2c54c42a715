"""The served model: a trained workdir compiled for every (bucket, batch size, k), and its latency table.

``ServedModel`` tokenizes requests (flagging truncated texts), runs a padded
batch at a given k with the cached executable of that (bucket, padded batch
size, keep counts), compiles all of them up front (``warm``) and serializes each
to ``WORKDIR/serve_executables``, so a second start loads them whole instead of
tracing and compiling, and measures or reloads the latency table the k policy
predicts from.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from latadj_jax.core import schedule
from latadj_jax.data import pipeline
from latadj_jax.runtime import timing
from latadj_jax.serving import policy, predictor
from latadj_jax.runtime.executables import ExecutableCache
from latadj_jax.tuning import offline, targets


@dataclasses.dataclass(frozen=True)
class Item:
  """One tokenized text (or pair)."""
  input_ids: np.ndarray
  token_type_ids: np.ndarray
  truncated: bool


EXECUTABLES = "serve_executables"   # serialized executables, under the workdir


def table_path(workdir: Path, device: str) -> Path:
  return Path(workdir) / f"serve_latency_{targets.device_slug(device)}.json"


class ServedModel:
  """A trained classifier workdir served at the k values ``ks`` and batch sizes ``batch_sizes``."""

  def __init__(self, restored: offline.Restored, profile: Sequence[float], ks: Sequence[float],
               batch_sizes: Sequence[int]):
    self.restored = restored
    self.profile = tuple(profile)
    self.ks = tuple(sorted(set(ks), reverse=True))
    self.batch_sizes = tuple(sorted(set(batch_sizes)))
    self.buckets = restored.buckets
    self.max_len = restored.run.config.max_len
    self.task = restored.task
    disk = restored.run.workdir / EXECUTABLES
    base = offline.classifier(restored, cache=ExecutableCache(disk_dir=disk))
    self._clfs = {b: dataclasses.replace(base, batch_size=b) for b in self.batch_sizes}
    self.cache = base.cache
    self._pad_id = restored.tokenizer.pad_token_id or 0

  @classmethod
  def from_workdir(cls, workdir: str | Path, ks: Sequence[float], batch_sizes: Sequence[int],
                   profile: str = "") -> "ServedModel":
    r, ep = offline.prepare(workdir, 0, profile)
    return cls(r, ep, ks, batch_sizes)

  @property
  def workdir(self) -> Path:
    return self.restored.run.workdir

  def counts(self, bucket: int, k: float) -> tuple[int, ...]:
    return schedule.keep_counts(bucket, k, self.profile)

  # --- requests ------------------------------------------------------------------------------

  def tokenize(self, inputs: predictor.Inputs) -> list[Item]:
    """Returns the tokenized texts (or pairs), truncated to ``max_len`` and flagged; ValueError on bad input."""
    examples = predictor.to_examples(inputs, len(self.task.text_keys))
    tok = self.restored.tokenizer
    enc = pipeline.encode(examples, tok, self.max_len)
    specials = tok.num_special_tokens_to_add(pair=len(examples.texts) == 2)
    items = []
    for i, ids in enumerate(enc.input_ids):
      truncated = False
      if len(ids) >= self.max_len:   # came out full: count the untruncated tokens
        raw = tok(*[col[i] for col in examples.texts], add_special_tokens=False,
                  truncation=False, verbose=False)["input_ids"]
        truncated = len(raw) + specials > self.max_len
      items.append(Item(ids, enc.token_type_ids[i], truncated))
    return items

  def bucket_of(self, items: Sequence[Item]) -> int:
    return pipeline.bucket_of(max(len(x.input_ids) for x in items), self.buckets)

  def arrays(self, items: Sequence[Item], bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Returns input ids, mask and token types of ``items`` padded to the compiled batch and ``bucket``."""
    b = policy.padded_batch(len(items), self.batch_sizes)
    ids = np.full((b, bucket), self._pad_id, np.int32)
    types = np.zeros((b, bucket), np.int32)
    mask = np.zeros((b, bucket), np.int32)
    for j, x in enumerate(items):
      n = len(x.input_ids)
      ids[j, :n], types[j, :n], mask[j, :n] = x.input_ids, x.token_type_ids, 1
    return ids, mask, types

  def run(self, items: list[Item], bucket: int, k: float) -> np.ndarray:
    """Returns the logits of ``items`` at ``k`` (blocking; the batcher calls it in its worker thread)."""
    ids, mask, types = self.arrays(items, bucket)
    exe = self._clfs[ids.shape[0]].executable(bucket, self.counts(bucket, k))
    return np.asarray(exe(self.restored.pre.params, ids, mask, types))[:len(items)]

  # --- start-up ------------------------------------------------------------------------------

  def cells(self) -> list[tuple[int, int, float]]:
    return [(bucket, b, k) for bucket in self.buckets for b in self.batch_sizes for k in self.ks]

  def warm(self, progress: Callable[[int, int], None] | None = None) -> None:
    """Compiles (or loads from the persistent cache) and runs once every (bucket, batch, k) executable."""
    cells = self.cells()
    for i, (bucket, b, k) in enumerate(cells):
      ids = np.zeros((b, bucket), np.int32)
      exe = self._clfs[b].executable(bucket, self.counts(bucket, k))
      timing.block(exe(self.restored.pre.params, ids, np.ones_like(ids), ids))
      if progress is not None:
        progress(i + 1, len(cells))

  def measure_table(self, repeats: int = 5) -> policy.LatencyTable:
    """Returns the median ms of every (bucket, batch, k) on a synthetic full-length batch."""
    ms: dict[int, dict[int, dict[float, float]]] = {}
    vocab = self.restored.pre.model.vocab_size
    for bucket in self.buckets:
      for b in self.batch_sizes:
        batch = targets.synthetic_batch(b, bucket, vocab)
        args = (self.restored.pre.params, batch["input_ids"], batch["attention_mask"],
                batch["token_type_ids"])
        fns = {k: (lambda e=self._clfs[b].executable(bucket, self.counts(bucket, k)): e(*args))
               for k in self.ks}
        med = timing.interleaved_medians(fns, repeats=repeats, warmup=1)
        ms.setdefault(bucket, {})[b] = {k: 1e3 * s for k, s in med.items()}
    return policy.LatencyTable(ms, timing.device_name())

  def latency_table(self, repeats: int = 5, remeasure: bool = False) -> tuple[policy.LatencyTable, bool]:
    """Returns the workdir's stored table when it covers every cell (and ``remeasure`` is off), else a
    freshly measured one (then stored); the flag says whether it was measured now."""
    path = table_path(self.workdir, timing.device_name())
    if path.is_file() and not remeasure:
      table = policy.LatencyTable.load(path)
      try:
        if all(table.ms[bucket][b][k] > 0 for bucket, b, k in self.cells()):
          return table, False
      except KeyError:
        pass
    t0 = time.perf_counter()
    table = self.measure_table(repeats)
    print(f"measured the latency table ({len(self.cells())} cells) in "
          f"{time.perf_counter() - t0:.1f} s -> {path}")
    table.save(path)
    return table, True


def default_k_range(workdir: str | Path, max_drop: float) -> tuple[float, float]:
  """Returns (k_min, k_max) from the workdir's eval sweep: k_max = 1, k_min = the lowest k whose main
  metric is within ``max_drop`` points of k = 1's; ValueError (naming the fix) without a sweep."""
  path = Path(workdir) / "eval_results.json"
  if not path.is_file():
    raise ValueError(f"no eval sweep in {str(workdir)!r} to take k_min from: pass --k_min, or run "
                     f"python eval.py --workdir={workdir} --coeff 0.6,0.7,0.8,0.9,1.0 first")
  rows = json.loads(path.read_text())["rows"]
  metric = next((m for m in ("accuracy", "mcc", "pearson") if m in rows[0]), None)
  by_k = {r["coeff"]: r[metric] for r in rows} if metric else {}
  if 1.0 not in by_k:
    raise ValueError(f"the eval sweep in {str(path)!r} has no k = 1 row: pass --k_min and --k_max")
  ok = [k for k, v in by_k.items() if k <= 1.0 and 100 * (by_k[1.0] - v) <= max_drop + 1e-9]
  return min(ok), 1.0

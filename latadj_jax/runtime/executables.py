"""Compiled executables kept in memory (and whole on disk), keyed by the keep-count schedule.

Executables are keyed by the keep counts, not by ``k``: two coefficients that
give the same counts share one executable. The in-memory cache holds AOT
``jit(...).lower(...).compile()`` results; with a ``disk_dir`` each is also
serialized whole, so a later process skips tracing and lowering as well as
compiling. (JAX's persistent compilation cache, ``xla_cache``, keeps the
compiled XLA programs on disk for every other jitted function.)
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax


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
  root = Path(__file__).resolve().parents[1]  # the package
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
      compiled = _compile_past_persistent_cache(lowered) if self.disk_dir else lowered.compile()
      self.stats.lower_seconds += t1 - t0
      self.stats.compile_seconds += time.perf_counter() - t1
      if self.disk_dir:
        self._save(key, compiled)
    self._executables[key] = compiled
    return compiled


def _compile_past_persistent_cache(lowered: jax.stages.Lowered) -> jax.stages.Compiled:
  """Returns ``lowered`` compiled by XLA, never loaded from JAX's persistent compilation cache.

  jaxlib (0.10) serializes an executable that it loaded from that cache without
  its code: loaded from disk again, it fails with "Function ... not found"
  (tests/test_executables.py). An executable kept whole on disk is a copy of
  the cache entry anyway.
  """
  from jax._src import config  # the thread-local switch is not exported (jax 0.10)
  with config.enable_compilation_cache(False):
    return lowered.compile()

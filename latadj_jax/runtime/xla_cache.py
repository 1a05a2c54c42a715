"""JAX's persistent compilation cache: compiled XLA programs kept on disk, so a rerun skips compiling.

``eval.py`` keeps one per workdir (``WORKDIR/xla_cache``); ``train.py`` shares
one across runs (``--config.compilation_cache``, default ``~/.cache/latadj_jax/xla``),
so a second run of the same recipe compiles nothing it compiled before. The
cache key is the program, its compile options and the device, so sharing is safe.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax

DEFAULT_DIR = "~/.cache/latadj_jax/xla"
ENV = "LATADJ_XLA_CACHE"  # overrides the default directory; "" turns the shared cache off


def default_dir() -> str:
  """Returns the shared cache directory (``$LATADJ_XLA_CACHE``, else ``~/.cache/latadj_jax/xla``)."""
  return os.environ.get(ENV, DEFAULT_DIR)


def setup_compilation_cache(cache_dir: str | Path) -> None:
  """Points JAX's persistent compilation cache at ``cache_dir`` and keeps every entry.

  Call it before the first JAX computation: the cache is read when JAX
  compiles, and the thresholds would otherwise skip fast-to-compile programs.
  """
  Path(cache_dir).mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(Path(cache_dir).resolve()))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def setup_from_config(value: str) -> str | None:
  """Turns the shared cache on from ``config.compilation_cache``; returns its directory, or None (off).

  ``"default"``: ``default_dir()``; ``""``: off; anything else: that directory.
  """
  path = default_dir() if value == "default" else value
  if not path:
    return None
  setup_compilation_cache(Path(path).expanduser())
  return path


@dataclasses.dataclass
class CompileLog:
  """XLA compiles of this process: programs, seconds, and how many came from the persistent cache."""
  programs: int = 0
  seconds: float = 0.0       # backend compiles, persistent-cache loads included
  hits: int = 0
  hit_seconds: float = 0.0   # of ``seconds``, the loads from the persistent cache

  def __str__(self) -> str:
    return (f"XLA compile: {self.programs} programs, {self.seconds:.1f} s; {self.hits} of them "
            f"loaded from the persistent cache in {self.hit_seconds:.1f} s")


_LOG = CompileLog()
_LISTENING = False
_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_LOAD = "/jax/compilation_cache/cache_retrieval_time_sec"


def _listen(event: str, duration_secs: float, **kwargs) -> None:
  if event == _BACKEND_COMPILE:
    _LOG.programs += 1
    _LOG.seconds += duration_secs
  elif event == _CACHE_LOAD:
    _LOG.hits += 1
    _LOG.hit_seconds += duration_secs


def compile_log() -> CompileLog:
  """Returns this process's running CompileLog; counting starts at the first call."""
  global _LISTENING
  if not _LISTENING:
    jax.monitoring.register_event_duration_secs_listener(_listen)
    _LISTENING = True
  return _LOG

"""Shared CLI plumbing: one clear line for user errors instead of a traceback."""

from __future__ import annotations

import os
import sys
from typing import Callable

from latadj_jax.runtime import hub

USAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, FloatingPointError)


def user_errors() -> tuple[type[BaseException], ...]:
  """Returns the exception types whose message is the whole story for a user."""
  return USAGE_ERRORS + (hub.Unavailable,)


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
  """Runs ``main`` and exits; a user error prints ``error: ...`` (set LATADJ_DEBUG=1 for the traceback)."""
  argv = sys.argv[1:] if argv is None else argv
  try:
    code = main(argv)
  except KeyboardInterrupt:
    print("interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
    sys.exit(130)
  except user_errors() as e:
    if os.environ.get("LATADJ_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sys.exit(code or 0)

"""The HF hub, asked briefly: is it there, and can it serve a repo now? Used by model and data loading.

Every question is bounded in time, so a missing or stalled hub ends a run in
one clear line instead of minutes of retries.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

HUB_HOST = "huggingface.co"
HUB_PROBE_TIMEOUT_S = 10.0  # one metadata request; the real hub answers in well under a second
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class Unavailable(RuntimeError):
  """Something a run needs can't be had (data, the hub); the message says what was tried and the fix."""


class HubError(Exception):
  """Mixed into a loader's own error when the HF hub could not serve what a run asked for.

  ``train.py`` adds the fully offline recipe to such an error; a bad local path
  or file raises the loader's plain error, whose message already names the fix.
  """


def env_true(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> tuple[str, int]:
  """Returns the (host, port) of the HF hub, honouring ``HF_ENDPOINT`` as huggingface_hub does."""
  url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}"))
  return url.hostname or HUB_HOST, url.port or (80 if url.scheme == "http" else 443)


def hub_reachable(timeout: float = 5.0) -> bool:
  """Returns whether the HF hub answers a TCP connect within ``timeout`` seconds (False when offline)."""
  if env_true("HF_HUB_OFFLINE"):
    return False
  try:
    with socket.create_connection(hub_endpoint(), timeout=timeout):
      return True
  except OSError:
    return False


def hub_problem(repo_id: str, repo_type: str = "model", timeout: float = HUB_PROBE_TIMEOUT_S
                ) -> str | None:
  """Returns why the hub can't serve ``repo_id`` right now (no answer in time, a 5xx), or None.

  One metadata request with a hard timeout, before handing over to
  ``huggingface_hub``/``datasets``: their per-file retries turn a stalled hub
  into minutes of waiting, and a 500 into a page of text. Other answers (401,
  404) are left to them, since their messages for those are specific.
  """
  base = os.environ.get("HF_ENDPOINT", f"https://{HUB_HOST}").rstrip("/")
  url = f"{base}/api/{repo_type}s/{urllib.parse.quote(repo_id)}"
  try:
    with urllib.request.urlopen(url, timeout=timeout):
      return None
  except urllib.error.HTTPError as e:
    return f"the hub at {base} answered {e.code} {e.reason}" if e.code >= 500 else None
  except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, bad HF_ENDPOINT
    reason = getattr(e, "reason", e)
    return f"the hub at {base} did not answer within {timeout:g} s ({reason})"


def dataset_problem(repo_id: str | None = None) -> str | None:
  """Returns why a hub dataset can't be loaded now (offline by request, no hub, a stalled probe), or None.

  Without ``repo_id`` only the first two are checked.
  """
  for var in OFFLINE_VARS:
    if env_true(var):  # offline by request: fail now rather than let datasets retry
      return f"{var} is set, so the hub is off"
  if not hub_reachable():
    return f"{HUB_HOST} cannot be reached"
  return hub_problem(repo_id, "dataset") if repo_id else None

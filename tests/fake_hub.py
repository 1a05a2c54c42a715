"""A stand-in for the Hugging Face hub on 127.0.0.1: the endpoints huggingface_hub and datasets call.

Point a process at it with ``HF_ENDPOINT=http://127.0.0.1:PORT``. It serves
model and dataset repos from local directories, at any revision, and logs every
request (``FakeHub.log``), which is how the endpoint list below was found:

- ``GET /api/{models,datasets}/REPO[/revision/REV]``: repo info with its sha and files;
- ``GET /api/{models,datasets}/REPO/tree/REV[/PATH]``: a folder listing (``recursive``);
- ``POST /api/{models,datasets}/REPO/paths-info/REV``: entries for the given paths;
- ``HEAD``/``GET /[datasets/]REPO/resolve/REV/PATH``: a file, with the headers
  huggingface_hub checks (``X-Repo-Commit``, ``ETag``, sizes) and byte ranges.

``mode`` makes it misbehave: ``"error"`` answers 500 to everything and
``"slow"`` waits ``delay`` seconds before every answer.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

DATE = "2024-01-01T00:00:00.000Z"


class Repo:
  """The files of one repo, with a commit sha derived from their contents."""

  def __init__(self, root: Path):
    self.files = {p.relative_to(root).as_posix(): p.read_bytes()
                  for p in sorted(root.rglob("*")) if p.is_file()}
    digest = hashlib.sha1()
    for name, data in self.files.items():
      digest.update(name.encode() + hashlib.sha1(data).digest())
    self.sha = digest.hexdigest()

  def entry(self, path: str) -> dict | None:
    """Returns the tree entry of a file or folder, or None if the repo has neither."""
    if path in self.files:
      data = self.files[path]
      return {"type": "file", "path": path, "size": len(data),
              "oid": hashlib.sha1(data).hexdigest(),
              "lastCommit": {"id": self.sha, "title": "upload", "date": DATE}}
    if any(f.startswith(path.rstrip("/") + "/") for f in self.files) or path in ("", "/"):
      return {"type": "directory", "path": path.strip("/"), "size": 0, "oid": self.sha,
              "lastCommit": {"id": self.sha, "title": "upload", "date": DATE}}
    return None

  def tree(self, folder: str, recursive: bool) -> list[dict]:
    """Returns the entries under ``folder``: its direct children, or everything below."""
    prefix = folder.strip("/") + "/" if folder.strip("/") else ""
    names = set()
    for f in self.files:
      if not f.startswith(prefix):
        continue
      rest = f[len(prefix):].split("/")
      for depth in range(1, len(rest) + 1 if recursive else 2):
        names.add(prefix + "/".join(rest[:depth]))
    return [self.entry(n) for n in sorted(names)]


class FakeHub:
  """A threaded HTTP server on a free 127.0.0.1 port; use as a context manager."""

  def __init__(self, models: dict[str, Path] | None = None,
               datasets: dict[str, Path] | None = None, mode: str = "ok", delay: float = 0.0):
    self.repos = {("models", k): Repo(v) for k, v in (models or {}).items()}
    self.repos.update({("datasets", k): Repo(v) for k, v in (datasets or {}).items()})
    self.mode, self.delay = mode, delay
    self.log: list[str] = []
    self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

  def __enter__(self) -> "FakeHub":
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    return self

  def __exit__(self, *exc) -> None:
    self._server.shutdown()
    self._server.server_close()

  def requests(self, kind: str = "") -> list[str]:
    """Returns the logged ``"METHOD path"`` lines that contain ``kind``."""
    return [r for r in self.log if kind in r]

  # --- routing -----------------------------------------------------------------------------------
  def _find(self, kind: str, parts: list[str]) -> tuple[Repo, str, list[str]] | None:
    """Returns (repo, repo id, the path parts after it) for the longest known repo id prefix."""
    for n in (2, 1):
      repo_id = "/".join(parts[:n])
      if len(parts) >= n and (kind, repo_id) in self.repos:
        return self.repos[(kind, repo_id)], repo_id, parts[n:]
    return None

  def route(self, method: str, raw_path: str, body: bytes) -> tuple[int, dict, bytes]:
    """Returns (status, headers, body) for one request."""
    url = urllib.parse.urlsplit(raw_path)
    query = urllib.parse.parse_qs(url.query)
    parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
    if parts[:1] == ["api"] and parts[1:2] in (["models"], ["datasets"]):
      found = self._find(parts[1], parts[2:])
      if found is None:
        return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
      repo, repo_id, rest = found
      return self._api(repo, repo_id, rest, query, body)
    kind = "datasets" if parts[:1] == ["datasets"] else "models"
    found = self._find(kind, parts[1:] if kind == "datasets" else parts)
    if found is None or len(found[2]) < 2 or found[2][0] != "resolve":
      return _json(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
    repo, _, rest = found
    # The revision may itself hold slashes (refs/convert/parquet): take the longest file match.
    for cut in range(2, len(rest)):
      path = "/".join(rest[cut:])
      if path in repo.files:
        return self._file(repo, path, method)
    return _json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})

  def _api(self, repo: Repo, repo_id: str, rest: list[str], query: dict, body: bytes):
    if not rest or rest[0] == "revision":
      return _json(200, {"id": repo_id, "_id": repo.sha[:24], "sha": repo.sha, "private": False,
                         "gated": False, "disabled": False, "downloads": 0, "likes": 0,
                         "tags": [], "lastModified": DATE, "createdAt": DATE,
                         "siblings": [{"rfilename": f} for f in repo.files]})
    if rest[0] == "tree":
      # tree/REV[/PATH]; REV has no slash in what the clients send here.
      folder = "/".join(rest[2:])
      if folder and repo.entry(folder) is None:
        return _json(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
      recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
      return _json(200, repo.tree(folder, recursive))
    if rest[0] == "paths-info":
      form = urllib.parse.parse_qs(body.decode())
      paths = form.get("paths", [])
      if not paths and body.strip().startswith(b"{"):
        paths = json.loads(body).get("paths", [])
      return _json(200, [e for e in (repo.entry(p) for p in paths) if e is not None])
    return _json(404, {"error": f"unknown endpoint {'/'.join(rest)}"})

  def _file(self, repo: Repo, path: str, method: str, range_header: str = ""):
    data = repo.files[path]
    etag = '"' + hashlib.sha256(data).hexdigest() + '"'
    headers = {"X-Repo-Commit": repo.sha, "ETag": etag, "X-Linked-Etag": etag,
               "X-Linked-Size": str(len(data)), "Accept-Ranges": "bytes",
               "Content-Type": "application/octet-stream"}
    return 200, headers, data

  def _handler(self):
    hub = self

    class Handler(BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # the log list replaces stderr noise
        pass

      def _serve(self, method: str):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub.log.append(f"{method} {self.path}")
        if hub.mode == "slow":
          time.sleep(hub.delay)
        if hub.mode == "error":
          status, headers, data = _json(500, {"error": "Internal Server Error"})
        else:
          status, headers, data = hub.route(method, self.path, body)
        start, end = 0, len(data)
        rng = self.headers.get("Range", "")
        if status == 200 and rng.startswith("bytes="):
          first, _, last = rng[len("bytes="):].partition("-")
          start = int(first) if first else max(0, len(data) - int(last))
          end = min(len(data), int(last) + 1) if first and last else len(data)
          status = 206
          headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
        try:
          self.send_response(status)
          for k, v in headers.items():
            self.send_header(k, v)
          self.send_header("Content-Length", str(end - start))
          self.end_headers()
          if method != "HEAD":
            self.wfile.write(data[start:end])
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client gave up (its timeout), as it should

      def do_GET(self):
        self._serve("GET")

      def do_HEAD(self):
        self._serve("HEAD")

      def do_POST(self):
        self._serve("POST")

    return Handler


def _json(status: int, obj, headers: dict | None = None) -> tuple[int, dict, bytes]:
  return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

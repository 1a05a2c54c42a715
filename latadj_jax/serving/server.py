"""The HTTP server: Starlette on uvicorn, one process, an asyncio batcher that owns the model.

Endpoints:

* ``POST /v1/classify`` with ``{"texts": ["...", ...]}`` (or ``[["a", "b"], ...]`` for a pair
  task): labels and probabilities (or regression scores), the k and keep counts
  used, which texts were truncated, and the request's queue and compute ms.
* ``GET /livez``: 200 while the process runs.
* ``GET /readyz``: 200 once every (bucket, batch size, k) executable is compiled
  and warmed and the latency table is loaded; 503 before.
* ``GET /metrics``: Prometheus text format.

Bad input gets a 4xx with a JSON ``{"error": ...}`` naming the fix: 400 for a body
that is not JSON, 413 for a body over ``max_body_bytes``, 422 for wrong types,
an empty list, empty strings or more texts than ``max_batch_size``; a full
queue gets 503 with ``Retry-After``. The model loads and compiles in the
background, so the port answers ``/livez`` from the first second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import time
import traceback
from typing import Any, Callable

import numpy as np
import prometheus_client as prom
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from latadj_jax.serving import batcher as batcher_lib
from latadj_jax.serving import policy as policy_lib

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                     0.5, 1.0, 2.0, 5.0)
METRIC_NAMES = ("latadj_requests_total", "latadj_request_seconds", "latadj_batch_size",
                "latadj_k", "latadj_k_current", "latadj_k_cap", "latadj_margin", "latadj_queue_depth",
                "latadj_ready", "latadj_startup_seconds")


@dataclasses.dataclass
class ServeConfig:
  slo_ms: float = 100.0
  k_min: float = 1.0
  k_max: float = 1.0
  k_points: int = 5
  adaptive: bool = True
  max_batch_size: int = 16
  max_queue_delay_ms: float = 5.0
  max_queue: int = 256
  max_body_bytes: int = 1 << 20
  retry_after_s: int = 1
  overhead_ms: float = 2.0        # time outside the model (HTTP, JSON, tokenizing), in the slack
  table_repeats: int = 5
  remeasure: bool = False

  def __post_init__(self):
    if not self.slo_ms > 0:
      raise ValueError(f"--slo_ms must be positive, got {self.slo_ms}")
    policy_lib.k_grid(self.k_min, self.k_max, self.k_points)   # raises on a bad range

  @property
  def ks(self) -> tuple[float, ...]:
    return policy_lib.k_grid(self.k_min, self.k_max, self.k_points) if self.adaptive else (self.k_max,)

  @property
  def batch_sizes(self) -> tuple[int, ...]:
    return policy_lib.batch_sizes_up_to(self.max_batch_size)


class Metrics:
  """The server's Prometheus metrics, in their own registry."""

  def __init__(self, ks):
    self.registry = prom.CollectorRegistry()
    r = self.registry
    self.requests = prom.Counter("latadj_requests", "Requests answered, by HTTP status",
                                 ["status"], registry=r)
    self.latency = prom.Histogram("latadj_request_seconds", "Request latency by phase: queue "
                                  "(waiting for a batch), compute (the batch's model call), total "
                                  "(arrival to answer)", ["phase"], buckets=LATENCY_BUCKETS_S,
                                  registry=r)
    self.batch_size = prom.Histogram("latadj_batch_size", "Texts per model call",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
    edges = sorted({round(k + 1e-6, 6) for k in ks})
    self.k = prom.Histogram("latadj_k", "k served, per request", buckets=edges, registry=r)
    self.k_current = prom.Gauge("latadj_k_current", "k of the latest batch", registry=r)
    self.k_cap = prom.Gauge("latadj_k_cap", "Highest k the p99 feedback allows now", registry=r)
    self.margin = prom.Gauge("latadj_margin", "Measured / tabled model time (running ratio)",
                             registry=r)
    self.queue_depth = prom.Gauge("latadj_queue_depth", "Texts waiting for a batch", registry=r)
    self.ready = prom.Gauge("latadj_ready", "1 once every executable is warm", registry=r)
    self.startup = prom.Gauge("latadj_startup_seconds", "Seconds from start to ready", registry=r)

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


class Service:
  """The model, its batcher and k policy, readiness and metrics behind the routes."""

  def __init__(self, load: Callable[[], Any], config: ServeConfig,
               clock: Callable[[], float] = time.monotonic):
    self.load, self.config, self.clock = load, config, clock
    self.metrics = Metrics(config.ks)
    self.model = self.policy = self.batcher = None
    self.ready = False
    self.error: str | None = None
    self.started = clock()
    self.table_measured = False
    self.startup_seconds = math.nan
    self._prepare_task: asyncio.Task | None = None

  # --- start-up and shutdown -----------------------------------------------------------------

  def _prepare(self) -> tuple[Any, policy_lib.LatencyTable]:
    model = self.load()
    model.warm()
    table, self.table_measured = model.latency_table(self.config.table_repeats,
                                                     self.config.remeasure)
    return model, table

  async def _start(self) -> None:
    try:
      model, table = await asyncio.to_thread(self._prepare)
    except Exception as e:  # surfaced on /readyz and in the log; /livez stays up
      self.error = f"{type(e).__name__}: {e}"
      traceback.print_exc()
      return
    c = self.config
    self.model = model
    self.policy = policy_lib.KPolicy(table, c.slo_ms, c.k_min if c.adaptive else c.k_max, c.k_max,
                                     adaptive=c.adaptive, overhead_ms=c.overhead_ms)
    self.batcher = batcher_lib.Batcher(
        self._run, self._choose, max_batch_size=c.max_batch_size,
        max_queue_delay_ms=c.max_queue_delay_ms, max_queue=c.max_queue, clock=self.clock,
        on_batch=self._on_batch, on_done=self.policy.observe).start()
    self.ready = True
    self.startup_seconds = self.clock() - self.started
    self.metrics.ready.set(1)
    self.metrics.startup.set(self.startup_seconds)
    self._publish_policy()
    print(f"ready in {self.startup_seconds:.1f} s: k in {self.policy.ks}, batch sizes "
          f"{c.batch_sizes}, buckets {table.buckets}, latency table "
          f"{'measured now' if self.table_measured else 'from the workdir'}", flush=True)

  async def startup(self) -> None:
    self._prepare_task = asyncio.get_running_loop().create_task(self._start())

  async def shutdown(self) -> None:
    if self.batcher is not None:
      await self.batcher.stop()       # drains what is queued
    if self._prepare_task is not None and not self._prepare_task.done():
      self._prepare_task.cancel()

  # --- the batcher's callbacks ---------------------------------------------------------------

  def _run(self, items, bucket: int, k: float) -> np.ndarray:
    return self.model.run(items, bucket, k)

  def _choose(self, bucket: int, n: int, oldest: float, now: float, next_arrival: float | None,
              next_n: int) -> float:
    k = self.policy.choose(bucket, n, oldest, now, next_arrival, next_n)
    self._publish_policy()
    self.metrics.queue_depth.set(self.batcher.depth if self.batcher else 0)
    return k

  def _publish_policy(self) -> None:
    """Sets the gauges of the policy's state: the feedback's cap on k and the margin."""
    self.metrics.margin.set(self.policy.margin)
    self.metrics.k_cap.set(self.policy.k_cap)

  def _on_batch(self, bucket: int, n: int, k: float, seconds: float) -> None:
    if self.policy.adaptive:
      self.policy.observe_batch(bucket, n, k, seconds)
    self.metrics.batch_size.observe(n)
    self.metrics.k_current.set(k)

  # --- routes --------------------------------------------------------------------------------

  def _answer(self, status: int, body: dict, headers: dict | None = None) -> JSONResponse:
    self.metrics.requests.labels(str(status)).inc()
    return JSONResponse(body, status_code=status, headers=headers)

  def _busy(self, message: str) -> JSONResponse:
    return self._answer(503, {"error": message}, {"Retry-After": str(self.config.retry_after_s)})

  async def _body(self, request: Request) -> bytes | None:
    """Returns the body, or None when it is over the limit (header or streamed size)."""
    limit = self.config.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
      return None
    chunks, size = [], 0
    async for chunk in request.stream():
      size += len(chunk)
      if size > limit:
        return None
      chunks.append(chunk)
    return b"".join(chunks)

  def _texts(self, payload: Any) -> list | str:
    """Returns the texts of a parsed body, or an error message (a 422)."""
    if not isinstance(payload, dict) or "texts" not in payload:
      return 'the body must be a JSON object with a "texts" list: {"texts": ["a review", ...]}'
    texts = payload["texts"]
    if not isinstance(texts, list):
      return f'"texts" must be a list of strings, got {type(texts).__name__}'
    if not texts:
      return '"texts" is empty: send at least one text'
    if len(texts) > self.config.max_batch_size:
      return (f'at most {self.config.max_batch_size} texts per request (max_batch_size), got '
              f'{len(texts)}: split them over several requests')
    flat = [t for x in texts for t in (x if isinstance(x, list) else [x])]
    bad = [t for t in flat if not isinstance(t, str)]
    if bad:
      return f'every text must be a string, got {type(bad[0]).__name__} {bad[0]!r}'
    empty = [i for i, t in enumerate(flat) if not t.strip()]
    if empty:
      return f'text {empty[0]} is empty: send non-empty strings'
    return [tuple(x) if isinstance(x, list) else x for x in texts]

  async def classify(self, request: Request) -> Response:
    arrival = self.clock()
    if not self.ready:
      return self._busy(self.error or "warming up: every executable compiles before serving; "
                        "poll GET /readyz")
    try:
      body = await self._body(request)
    except ClientDisconnect:
      self.metrics.requests.labels("499").inc()     # nginx's "client closed request"
      return Response(status_code=499)
    if body is None:
      return self._answer(413, {"error": f"body over {self.config.max_body_bytes} bytes: send "
                                         f"fewer or shorter texts per request"})
    try:
      payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      return self._answer(400, {"error": f"the body is not JSON ({e}); send "
                                         '{"texts": ["a review", ...]} with Content-Type: '
                                         "application/json"})
    texts = self._texts(payload)
    if isinstance(texts, str):
      return self._answer(422, {"error": texts})
    try:
      items = self.model.tokenize(texts)
    except ValueError as e:
      return self._answer(422, {"error": str(e)})
    try:
      result = await self.batcher.submit(items, self.model.bucket_of(items), arrival)
    except batcher_lib.QueueFull as e:
      return self._busy(f"{e}; retry after {self.config.retry_after_s} s")
    except Exception as e:  # the model call failed; the server keeps serving
      traceback.print_exc()
      return self._answer(500, {"error": f"the model failed on this batch: {type(e).__name__}: {e}"})
    done = self.clock()
    m = self.metrics
    m.latency.labels("queue").observe(result.queue_s)
    m.latency.labels("compute").observe(result.compute_s)
    m.latency.labels("total").observe(done - arrival)
    for _ in items:
      m.k.observe(result.k)
    return self._answer(200, {**self.outputs(np.asarray(result.outputs)),
                              "k": result.k, "batch_size": result.batch_size,
                              "truncated": [x.truncated for x in items],
                              "max_len": self.model.max_len,
                              "queue_ms": 1e3 * result.queue_s,
                              "compute_ms": 1e3 * result.compute_s})

  def outputs(self, logits: np.ndarray) -> dict:
    if self.model.task.is_regression:
      return {"scores": logits[:, 0].astype(float).tolist()}
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    return {"labels": logits.argmax(-1).astype(int).tolist(), "scores": p.round(6).tolist()}

  async def livez(self, request: Request) -> Response:
    return JSONResponse({"status": "alive"})

  async def readyz(self, request: Request) -> Response:
    if self.ready:
      body = {"status": "ready", "ks": list(self.policy.ks), "startup_seconds": self.startup_seconds,
              "latency_table": "measured" if self.table_measured else "loaded"}
      stats = getattr(getattr(self.model, "cache", None), "stats", None)
      if stats is not None:
        body["executables"] = {"compiled": stats.misses - stats.disk_hits, "loaded": stats.disk_hits}
      return JSONResponse(body)
    body = {"status": "failed" if self.error else "warming up"}
    if self.error:
      body["error"] = self.error
    return JSONResponse(body, status_code=503)

  async def metrics_text(self, request: Request) -> Response:
    return Response(self.metrics.text(), media_type=prom.CONTENT_TYPE_LATEST)

  def app(self) -> Starlette:
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
      await self.startup()
      yield
      await self.shutdown()

    return Starlette(routes=[Route("/v1/classify", self.classify, methods=["POST"]),
                             Route("/livez", self.livez), Route("/readyz", self.readyz),
                             Route("/metrics", self.metrics_text)], lifespan=lifespan)


def serve(service: Service, host: str = "127.0.0.1", port: int = 8000,
          graceful_s: float = 30.0) -> None:
  """Runs the service on uvicorn until SIGINT/SIGTERM, then drains in-flight requests and returns.

  uvicorn re-raises the signal it caught once it has shut down; the handler
  installed here takes that back, so a drained SIGTERM exits with status 0.
  """
  import signal
  import uvicorn
  config = uvicorn.Config(service.app(), host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=graceful_s, access_log=False)
  server = uvicorn.Server(config)
  received = []

  def on_term(sig, frame):
    received.append(sig)
    server.should_exit = True

  previous = signal.signal(signal.SIGTERM, on_term)
  try:
    server.run()
  finally:
    signal.signal(signal.SIGTERM, previous)
  if received:
    print("SIGTERM: stopped accepting, answered every request in flight, exiting", flush=True)

"""serve.py and latadj_jax.serving: the batcher, the k policy, the HTTP API, readiness, metrics and
SIGTERM draining (issue 26)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from latadj_jax.serving import batcher as batcher_lib
from latadj_jax.serving import policy, server

REPO = Path(__file__).resolve().parents[1]


# --- the k policy, against a fake clock and a fake latency table --------------------------------

def fake_table() -> policy.LatencyTable:
  """ms = batch size x 10 x k (bucket 16) or x 20 x k (bucket 32), at k in {1, 0.8, 0.6}."""
  return policy.LatencyTable({bucket: {b: {k: b * scale * k for k in (1.0, 0.8, 0.6)}
                                       for b in (1, 2, 4)}
                              for bucket, scale in ((16, 10.0), (32, 20.0))})


def test_padded_batch_and_grids():
  assert policy.batch_sizes_up_to(16) == (1, 2, 4, 8, 16)
  assert policy.batch_sizes_up_to(12) == (1, 2, 4, 8, 12)
  assert [policy.padded_batch(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  with pytest.raises(ValueError, match="exceeds the largest compiled batch size 8"):
    policy.padded_batch(9, (1, 2, 4, 8))
  assert policy.k_grid(0.6, 1.0, 5) == (1.0, 0.9, 0.8, 0.7, 0.6)
  assert policy.k_grid(0.8, 0.8, 1) == (0.8,)
  with pytest.raises(ValueError, match="k_min <= k_max"):
    policy.k_grid(1.0, 0.6, 5)


def test_table_predicts_padded_batches_and_round_trips(tmp_path):
  t = fake_table()
  assert t.ks == (1.0, 0.8, 0.6) and t.buckets == (16, 32)
  assert t.predict(16, 3, 0.8) == pytest.approx(4 * 10 * 0.8)     # 3 requests run as a batch of 4
  t.save(tmp_path / "t.json")
  assert policy.LatencyTable.load(tmp_path / "t.json").ms == t.ms


def test_feed_forward_picks_the_highest_k_that_fits_the_oldest_slack():
  p = policy.KPolicy(fake_table(), slo_ms=100, k_min=0.6, k_max=1.0)
  # batch of 4 in bucket 16: 40 / 32 / 24 ms at k = 1 / 0.8 / 0.6
  assert p.choose(16, 4, oldest_arrival=0.0, now=0.0) == 1.0      # slack 100
  assert p.choose(16, 4, oldest_arrival=0.0, now=0.065) == 0.8    # slack 35
  assert p.choose(16, 4, oldest_arrival=0.0, now=0.075) == 0.6    # slack 25
  assert p.choose(16, 4, oldest_arrival=0.0, now=0.090) == 0.6    # nothing fits: the lowest
  assert p.choose(32, 4, oldest_arrival=0.0, now=0.0) == 1.0      # bucket 32: 80 ms fits 100
  assert p.choose(32, 4, oldest_arrival=0.0, now=0.030) == 0.8    # 80 > 70 >= 64
  fixed = policy.KPolicy(fake_table(), slo_ms=100, k_min=1.0, k_max=1.0, adaptive=False)
  assert fixed.choose(32, 4, oldest_arrival=0.0, now=0.099) == 1.0
  bounded = policy.KPolicy(fake_table(), slo_ms=100, k_min=0.8, k_max=0.8)
  assert bounded.ks == (0.8,) and bounded.choose(16, 1, 0.0, 0.0) == 0.8
  with pytest.raises(ValueError, match="no k of the latency table"):
    policy.KPolicy(fake_table(), slo_ms=100, k_min=0.3, k_max=0.5)


def test_feedback_is_aimd_on_a_k_cap_with_hysteresis():
  fb = policy.Feedback(slo_ms=100, steps=4, window_s=1.0, interval_s=0.5, high=0.8, low=0.5,
                       min_samples=10, raise_samples=5, raise_after_s=1.0)
  for i in range(100):
    fb.observe(150.0, now=i * 0.001)          # p99 over the SLO: two steps down
  assert fb.update(now=0.1) == 2
  assert fb.update(now=0.3) == 2              # within the interval: held
  assert fb.update(now=0.7) == 2              # the late requests were answered for: no new samples
  for i in range(10):
    fb.observe(150.0, now=0.8 + i * 0.01)     # still late under the new cap: two more
  assert fb.update(now=1.3) == 4
  for i in range(10):
    fb.observe(150.0, now=1.4 + i * 0.01)
  assert fb.update(now=1.9) == 4              # at the floor
  fb.cap = 1
  for i in range(100):
    fb.observe(85.0, now=2.0 + i * 1e-3)      # over 0.8 x SLO: one step
  assert fb.update(now=2.5) == 2
  for i in range(100):
    fb.observe(70.0, now=3.5 + i * 1e-3)      # between 0.5 and 0.8 x SLO: held
  assert fb.update(now=3.7) == 2
  for i in range(4):
    fb.observe(30.0, now=5.0 + i * 1e-3)      # under 0.5 x SLO, but fewer than raise_samples: held
  assert fb.update(now=5.01) == 2
  fb.observe(30.0, now=5.02)
  assert fb.update(now=5.2) == 1              # one step up, on 5 fresh samples (not min_samples)
  for i in range(10):
    fb.observe(30.0, now=5.9 + i * 1e-3)
  assert fb.update(now=6.0) == 1              # raises wait a whole window after a change
  assert fb.update(now=6.5) == 0
  for i in range(10):
    fb.observe(85.0, now=6.6 + i * 1e-3)
  assert fb.update(now=7.0) == 1              # cuts do not wait: fast down, slow up
  for i in range(5):
    fb.observe(150.0, now=7.1 + i * 1e-3)
  assert fb.update(now=7.6) == 1              # but a cut judges min_samples requests, not 5
  for i in range(5):
    fb.observe(150.0, now=7.7 + i * 1e-3)
  assert fb.update(now=8.0) == 3


def test_feedback_moves_once_for_one_late_burst_then_recovers_at_light_load():
  # 40 req/s at 45 ms, one burst of three requests at 180 ms: the cap drops two steps once, not
  # again while the burst ages out of the 1 s window, then climbs back a step per 0.5 s.
  fb = policy.Feedback(slo_ms=100, steps=4)
  caps = []
  for i in range(200):
    now = i * 0.025
    fb.observe(180.0 if 40 <= i < 43 else 45.0, now)
    caps.append(fb.update(now))
  assert max(caps) == 2 and caps.count(2) <= 30 and caps[-1] == 0
  drops = sum(1 for a, b in zip(caps, caps[1:]) if b > a)
  assert drops == 1


def test_feedback_cap_and_measured_margin_lower_k_and_it_recovers():
  p = policy.KPolicy(fake_table(), slo_ms=100, k_min=0.6, k_max=1.0,
                     feedback=policy.Feedback(slo_ms=100, steps=2, interval_s=0.0, min_samples=1,
                                              raise_after_s=1.0))
  assert p.choose(16, 4, 0.0, 0.0) == 1.0     # 40 ms fits 100
  for _ in range(10):
    p.observe(500.0, now=0.0)
  assert p.choose(16, 4, 0.01, 0.01) == 0.6 and p.k_cap == 0.6   # capped, though 1.0 would fit
  for i in range(100):
    p.observe(10.0, now=10.0 + i * 1e-3)
  assert p.choose(16, 4, 10.2, 10.2) == 0.8   # one step up, and the window starts afresh
  p.observe(10.0, now=10.26)
  assert p.choose(16, 4, 10.3, 10.3) == 0.8   # the next raise waits a whole window
  assert p.choose(16, 4, 11.2, 11.2) == 1.0
  # Batches that take 3x the table's time: the margin follows, and k = 1 no longer fits.
  for _ in range(30):
    p.observe_batch(16, 4, 1.0, 0.120)
  assert p.margin == pytest.approx(3.0, rel=0.01)
  assert p.choose(16, 4, 12.0, 12.0) == 0.8   # 40 x 3 > 100 >= 32 x 3
  # The margin is the p95 over the last 32 batches: 4 slow batches in 32 set it, and it forgets them.
  for ratio in [1.0] * 28 + [3.0] * 4:
    p.observe_batch(16, 4, 1.0, 0.040 * ratio)
  assert p.margin == pytest.approx(3.0)
  for _ in range(32):
    p.observe_batch(16, 4, 1.0, 0.040)
  assert p.margin == pytest.approx(1.0)
  fixed = policy.KPolicy(fake_table(), slo_ms=100, k_min=1.0, k_max=1.0, adaptive=False)
  assert fixed.choose(16, 4, 0.0, 5.0) == 1.0


def test_a_rate_that_would_build_a_queue_lowers_k_before_it_builds():
  p = policy.KPolicy(fake_table(), slo_ms=100, k_min=0.6, k_max=1.0)
  assert p.choose(32, 2, 5.0, 5.0) == 1.0     # 40 ms, nothing behind it
  for i in range(100):
    p.observe(30.0, now=4.0 + i * 0.01)       # 100 req/s finished in the last second
  assert p.rate_per_ms(5.0) == pytest.approx(0.1)
  # At k = 1 the batch takes 40 ms, 4 texts arrive meanwhile, and they take 80: 120 > 100.
  # At k = 0.8: 32 + 64 = 96 fits.
  assert p.choose(32, 2, 5.0, 5.0) == 0.8
  assert p.rate_per_ms(6.5) == 0.0 and p.choose(32, 2, 6.5, 6.5) == 1.0   # the rate has passed
  # A light rate expects no one during the batch (5/s x 80 ms = 0.4 rounds to 0), though under
  # this margin a second batch would not fit (80 + 40 > 100): k stays at k_max.
  for i in range(5):
    p.observe(30.0, now=6.0 + i * 0.2)
  p.margin = 2.0
  assert p.rate_per_ms(6.95) == pytest.approx(0.005) and p.choose(32, 2, 6.95, 6.95) == 1.0


def test_a_queue_behind_the_batch_lowers_k_before_anyone_is_late():
  p = policy.KPolicy(fake_table(), slo_ms=100, k_min=0.6, k_max=1.0)
  # bucket 16, batch 4: 40 / 32 / 24 ms. Four more texts wait behind, the oldest since 30 ms ago:
  # its slack is 70 ms; k = 1 takes 40 + 40, k = 0.8 32 + 32.
  assert p.choose(16, 4, 0.0, 0.0) == 1.0
  assert p.choose(16, 4, 0.0, 0.0, next_arrival=-0.030, next_batch=4) == 0.8
  assert p.choose(16, 4, 0.0, 0.0, next_arrival=-0.050, next_batch=4) == 0.6
  assert p.choose(16, 4, 0.0, 0.0, next_arrival=0.0, next_batch=64) == 1.0   # clamped to batch 4


def test_percentile_nearest_rank():
  assert policy.percentile(range(1, 101), 99) == 99
  assert policy.percentile([5.0], 99) == 5.0
  assert math.isnan(policy.percentile([], 99))


def test_c1_search_finds_capacity_and_a_single_stalled_probe_does_not_lower_it():
  sys.path.insert(0, str(REPO / "benchmarks"))
  import serve_load

  def fake_server(capacity, stalls):
    def measure_at(rate, seed):
      stalled = rate in stalls
      if stalled:
        stalls.remove(rate)
      p99 = 400.0 if stalled or rate > capacity else 50.0
      return {"rate": rate, "p99_ms": p99, "slo_attainment": 1.0 if p99 <= 100 else 0.7,
              "sent": 10, "statuses": {"200": 10}}
    return measure_at

  c1, tried = serve_load.find_c1(fake_server(80.0, []), 100.0, start=20.0)
  assert 67.5 <= c1 <= 80.0                      # 20, 30, 45, 67.5 fit, 101.25 misses; bisected twice
  assert [r["rate"] for r in tried].count(101.25) == 2   # a miss is confirmed by a repeat
  c1_stalled, tried = serve_load.find_c1(fake_server(80.0, [45.0]), 100.0, start=20.0)
  assert c1_stalled == c1 and [r["rate"] for r in tried].count(45.0) == 2
  assert serve_load.find_c1(fake_server(80.0, [45.0, 45.0]), 100.0, start=20.0)[0] == 41.25  # 45 missed twice


def test_the_generator_polls_the_k_cap_while_it_sends_and_counts_its_changes():
  sys.path.insert(0, str(REPO / "benchmarks"))
  import serve_load
  caps = iter([1.0, 1.0, 0.8, 0.8, 1.0] + [1.0] * 1000)

  async def handle(reader, writer):
    request = await reader.readuntil(b"\r\n\r\n")
    if request.startswith(b"GET /metrics"):
      body = (b"# HELP latadj_k_cap cap\nlatadj_k_cap_created 1.7e9\nlatadj_k_cap %.1f\n" % next(caps))
    else:
      length = int(request.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
      await reader.readexactly(length)
      body = json.dumps({"labels": [1], "scores": [0.9], "k": 1.0}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    await writer.drain()
    writer.close()

  async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    polled = []
    records = await serve_load._drive(port, np.linspace(0, 0.5, 6), ["a"], 2.0, poll=polled, poll_s=0.05)
    srv.close()
    return records, polled

  records, polled = run_async(main())
  assert [r["status"] for r in records] == [200] * 6 and all(r["k"] == 1.0 for r in records)
  assert len(polled) >= 5 and [c for _, c in polled[:5]] == [1.0, 1.0, 0.8, 0.8, 1.0]
  assert all(b[0] > a[0] for a, b in zip(polled, polled[1:]))
  assert serve_load.cap_changes(polled) == 2
  assert serve_load.cap_changes([(0, 1.0), (1, math.nan), (2, 1.0)]) == 0


# --- the batcher ---------------------------------------------------------------------------------

def run_async(coro):
  return asyncio.run(coro)


def test_batcher_respects_max_batch_size_and_keeps_requests_whole():
  calls = []

  def run(items, bucket, k):
    calls.append((list(items), bucket, k))
    time.sleep(0.01)
    return [x * 10 for x in items]

  async def main():
    b = batcher_lib.Batcher(run, lambda bucket, n, oldest, now, nxt, nxt_n: 0.9, max_batch_size=4,
                            max_queue_delay_ms=20, max_queue=64).start()
    reqs = [[1], [2, 3], [4, 5, 6], [7], [8, 9]]
    out = await asyncio.gather(*(b.submit(r, bucket=16 + 16 * (i == 2)) for i, r in enumerate(reqs)))
    await b.stop()
    return reqs, out

  reqs, out = run_async(main())
  assert [list(o.outputs) for o in out] == [[x * 10 for x in r] for r in reqs]
  assert all(len(items) <= 4 for items, _, _ in calls)
  flat = [x for items, _, _ in calls for x in items]
  assert flat == list(range(1, 10))                       # FIFO, every text once
  for items, bucket, k in calls:                           # a batch takes its longest bucket
    assert bucket == (32 if 4 in items else 16) and k == 0.9
  assert all(o.k == 0.9 and o.batch_size <= 4 for o in out)


def test_batcher_feeds_the_policy_latency_in_ms_so_late_batches_lower_k():
  # The table promises 1 ms for every k, so only the p99 feedback can lower k: a model call of
  # 150 ms puts every request over the 100 ms SLO, and the next batch must run at a lower k.
  table = policy.LatencyTable({16: {1: {1.0: 1.0, 0.8: 1.0, 0.6: 1.0}}})
  p = policy.KPolicy(table, slo_ms=100, k_min=0.6, k_max=1.0,
                     feedback=policy.Feedback(slo_ms=100, steps=2, interval_s=0.0, min_samples=1))

  def run(items, bucket, k):
    time.sleep(0.15)
    return list(items)

  async def main():
    b = batcher_lib.Batcher(run, p.choose, max_batch_size=1, max_queue_delay_ms=0, max_queue=8,
                            on_done=p.observe).start()
    out = [await b.submit([i], 16) for i in range(2)]
    await b.stop()
    return out

  first, second = run_async(main())
  assert first.k == 1.0 and second.k == 0.6 and p.k_cap == 0.6


def test_batcher_waits_at_most_max_queue_delay_for_a_fuller_batch():
  async def main():
    b = batcher_lib.Batcher(lambda items, bucket, k: list(items), lambda *a: 1.0,
                            max_batch_size=8, max_queue_delay_ms=150, max_queue=64).start()
    t0 = time.monotonic()
    one = await b.submit([1], 16)
    waited = time.monotonic() - t0
    t0 = time.monotonic()
    full = await asyncio.gather(*(b.submit([i], 16) for i in range(8)))
    full_waited = time.monotonic() - t0
    await b.stop()
    return one, waited, full, full_waited

  one, waited, full, full_waited = run_async(main())
  assert 0.14 <= one.queue_s and 0.14 <= waited < 1.0          # alone: it waited for company
  assert all(o.batch_size == 8 for o in full) and full_waited < 0.14   # full: ran at once


def test_batcher_queue_is_bounded():
  release = threading.Event()

  def run(items, bucket, k):
    release.wait(5)
    return list(items)

  async def main():
    b = batcher_lib.Batcher(run, lambda *a: 1.0, max_batch_size=2, max_queue_delay_ms=0,
                            max_queue=4).start()
    first = asyncio.ensure_future(b.submit([0, 1], 16))   # taken into the (blocked) model call
    await asyncio.sleep(0.05)
    queued = [asyncio.ensure_future(b.submit([i], 16)) for i in range(4)]
    await asyncio.sleep(0.05)
    assert b.depth == 4
    with pytest.raises(batcher_lib.QueueFull, match="4 of 4"):
      await b.submit([9], 16)
    with pytest.raises(ValueError, match="at most 2 texts per request"):
      await b.submit([1, 2, 3], 16)
    release.set()
    results = await asyncio.gather(first, *queued)
    await b.stop()
    return results

  results = run_async(main())
  assert [list(r.outputs) for r in results] == [[0, 1], [0], [1], [2], [3]]


def test_batcher_survives_a_failing_batch():
  def run(items, bucket, k):
    if items == ["boom"]:
      raise RuntimeError("model failed")
    return list(items)

  async def main():
    b = batcher_lib.Batcher(run, lambda *a: 1.0, max_batch_size=1, max_queue_delay_ms=0,
                            max_queue=8).start()
    with pytest.raises(RuntimeError, match="model failed"):
      await b.submit(["boom"], 16)
    ok = await b.submit(["fine"], 16)
    await b.stop()
    return ok

  assert list(run_async(main()).outputs) == ["fine"]


# --- the HTTP API, in process, with a fake model ------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FakeItem:
  input_ids: np.ndarray
  truncated: bool


class FakeModel:
  """Words are tokens; label 1 when the text says 'good'. Takes the fake table's time at each k."""
  max_len = 16
  task = type("Task", (), {"is_regression": False})

  def __init__(self, warm_gate: threading.Event | None = None, speed: float = 0.01):
    self.warm_gate, self.speed, self.warmed = warm_gate, speed, False

  def tokenize(self, texts):
    items = []
    for t in texts:
      if not isinstance(t, str):
        raise ValueError(f"this model reads one text per example; got {t!r}")
      words = t.split()
      items.append(FakeItem(np.asarray([int("good" in w) for w in words[:self.max_len]]),
                            len(words) > self.max_len))
    return items

  def bucket_of(self, items):
    return 16 if max(len(x.input_ids) for x in items) <= 8 else 32

  def run(self, items, bucket, k):
    time.sleep(fake_table().predict(bucket, len(items), k) * self.speed / 1e3)
    return np.asarray([[0.0, 1.0] if x.input_ids.any() else [1.0, 0.0] for x in items])

  def warm(self, progress=None):
    if self.warm_gate is not None:
      self.warm_gate.wait(10)
    self.warmed = True

  def latency_table(self, repeats=5, remeasure=False):
    return fake_table(), False


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def live_server():
  """Starts a Service on uvicorn in a thread; yields (port, service, warm gate)."""
  import uvicorn
  gate = threading.Event()
  config = server.ServeConfig(slo_ms=100, k_min=0.6, k_max=1.0, k_points=3, max_batch_size=4,
                              max_queue_delay_ms=2, max_queue=16, max_body_bytes=2000,
                              overhead_ms=0.0)
  service = server.Service(lambda: FakeModel(gate), config)
  port = free_port()
  uv = uvicorn.Server(uvicorn.Config(service.app(), host="127.0.0.1", port=port,
                                     log_level="warning", access_log=False))
  thread = threading.Thread(target=uv.run, daemon=True)
  thread.start()
  deadline = time.monotonic() + 10
  while not uv.started and time.monotonic() < deadline:
    time.sleep(0.01)
  yield port, service, gate
  gate.set()
  uv.should_exit = True
  thread.join(10)


def call(port, method, path, body=None, headers=None, timeout=10):
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
  data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
  conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                 **(headers or {})})
  r = conn.getresponse()
  raw = r.read()
  conn.close()
  try:
    payload = json.loads(raw)
  except ValueError:
    payload = raw.decode()
  return r.status, payload, dict(r.getheaders())


def wait_ready(port, timeout=30):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    try:
      if call(port, "GET", "/readyz", timeout=2)[0] == 200:
        return
    except OSError:
      pass
    time.sleep(0.05)
  raise AssertionError("server never became ready")


def test_readiness_waits_for_warmup(live_server):
  port, service, gate = live_server
  assert call(port, "GET", "/livez")[0] == 200
  status, body, _ = call(port, "GET", "/readyz")
  assert status == 503 and body["status"] == "warming up"
  status, body, headers = call(port, "POST", "/v1/classify", {"texts": ["good"]})
  assert status == 503 and "warming up" in body["error"] and headers["retry-after"] == "1"
  gate.set()
  wait_ready(port)
  status, body, _ = call(port, "GET", "/readyz")
  assert status == 200 and body["ks"] == [1.0, 0.8, 0.6]


def test_classify_answers_labels_scores_and_k(live_server):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["a good film", "a bad one"]})
  assert status == 200, body
  assert body["labels"] == [1, 0] and np.allclose(np.sum(body["scores"], 1), 1)
  assert body["k"] in (1.0, 0.8, 0.6) and body["truncated"] == [False, False]
  assert body["queue_ms"] >= 0 and body["compute_ms"] > 0


@pytest.mark.parametrize("body,status,needle", [
    (b"{not json", 400, "not JSON"),
    (b"\xff\xfe", 400, "not JSON"),
    ([1, 2], 422, '"texts" list'),
    ({"text": ["a"]}, 422, '"texts" list'),
    ({"texts": "a film"}, 422, "must be a list"),
    ({"texts": []}, 422, "is empty"),
    ({"texts": ["fine", 3]}, 422, "must be a string"),
    ({"texts": ["fine", None]}, 422, "must be a string"),
    ({"texts": ["fine", "   "]}, 422, "text 1 is empty"),
    ({"texts": [""]}, 422, "text 0 is empty"),
    ({"texts": ["a"] * 5}, 422, "at most 4 texts per request"),
])
def test_bad_input_is_a_clear_4xx_and_the_server_keeps_serving(live_server, body, status, needle):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  got, payload, _ = call(port, "POST", "/v1/classify", body)
  assert got == status and needle in payload["error"], payload
  assert call(port, "POST", "/v1/classify", {"texts": ["good"]})[0] == 200


def test_over_long_text_is_truncated_and_flagged(live_server):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["word " * 40, "good"]})
  assert status == 200 and body["truncated"] == [True, False] and body["max_len"] == 16


def test_body_over_the_limit_is_413(live_server):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["x" * 3000]})
  assert status == 413 and "body over 2000 bytes" in body["error"]
  # chunked, no Content-Length: the limit holds while streaming
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
  conn.request("POST", "/v1/classify", body=iter([b'{"texts": ["', b"y" * 2500, b'"]}']),
               encode_chunked=True, headers={"Content-Type": "application/json"})
  r = conn.getresponse()
  assert r.status == 413
  conn.close()
  assert call(port, "POST", "/v1/classify", {"texts": ["good"]})[0] == 200


def test_client_disconnecting_mid_request_leaves_the_server_serving(live_server):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  for partial in (True, False):
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    body = b'{"texts": ["a good film"]}'
    s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % (len(body) + (100 if partial else 0)) + body)
    time.sleep(0.05)
    s.close()                      # mid-body (partial), or before reading the answer
  time.sleep(0.2)
  status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["good"]})
  assert status == 200 and body["labels"] == [1]


def test_full_queue_answers_503_with_retry_after(live_server):
  port, service, gate = live_server
  gate.set()
  wait_ready(port)
  service.model.speed = 2.0          # batches of 4 take 80-160 ms at k = 1 (the fake table x 2)
  with concurrent.futures.ThreadPoolExecutor(40) as pool:
    results = list(pool.map(lambda i: call(port, "POST", "/v1/classify", {"texts": ["good"] * 4}),
                            range(40)))
  codes = [r[0] for r in results]
  assert set(codes) <= {200, 503} and 503 in codes and 200 in codes
  assert all(r[2].get("retry-after") == "1" and "queue full" in r[1]["error"]
             for r in results if r[0] == 503)


def test_a_failing_model_call_is_a_500_and_the_next_request_is_served(live_server):
  port, service, gate = live_server
  gate.set()
  wait_ready(port)
  run = service.model.run
  service.model.run = lambda items, bucket, k: 1 / 0
  status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["good"]})
  assert status == 500 and "ZeroDivisionError" in body["error"]
  service.model.run = run
  assert call(port, "POST", "/v1/classify", {"texts": ["good"]})[0] == 200


def test_metrics_names_and_counts(live_server):
  port, _, gate = live_server
  gate.set()
  wait_ready(port)
  call(port, "POST", "/v1/classify", {"texts": ["good", "bad"]})
  call(port, "POST", "/v1/classify", b"nope")
  status, text, headers = call(port, "GET", "/metrics")
  assert status == 200 and headers["content-type"].startswith("text/plain")
  for name in server.METRIC_NAMES:
    assert f"# TYPE {name}" in text, name
  assert 'latadj_requests_total{status="200"} 1.0' in text
  assert 'latadj_requests_total{status="400"} 1.0' in text
  for phase in ("queue", "compute", "total"):
    assert f'latadj_request_seconds_count{{phase="{phase}"}} 1.0' in text
  assert "latadj_k_count 2.0" in text and "latadj_batch_size_count 1.0" in text
  assert "latadj_ready 1.0" in text


# --- serve.py, a real server on 127.0.0.1 ------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_classifier_workdir):
  """The session's tiny trained workdir, this module's copy: serve.py writes its caches there."""
  return tiny_classifier_workdir


def start_serve(workdir, port, *extra):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  return subprocess.Popen([sys.executable, "serve.py", f"--workdir={workdir}", f"--port={port}",
                           "--k_min=0.6", "--k_points=2", "--max_batch_size=4", *extra],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def stop(proc, sig=signal.SIGTERM, timeout=60) -> tuple[int, str]:
  if proc.poll() is None:
    proc.send_signal(sig)
  out, _ = proc.communicate(timeout=timeout)
  return proc.returncode, out


@pytest.mark.slow
def test_serve_cli_second_start_loads_everything_and_sigterm_drains(trained):
  port = free_port()
  first = start_serve(trained, port)
  try:
    wait_ready(port, timeout=300)
    status, ready, _ = call(port, "GET", "/readyz")
    assert ready["ks"] == [1.0, 0.6] and ready["latency_table"] == "measured"
    assert ready["executables"] == {"compiled": 12, "loaded": 0}   # 2 buckets x 3 batches x 2 k
    status, body, _ = call(port, "POST", "/v1/classify", {"texts": ["a good film", "dull"]})
    assert status == 200 and set(body["labels"]) <= {0, 1} and body["k"] in (1.0, 0.6)
  finally:
    code, out = stop(first)
  assert code == 0, out
  cache = trained / "xla_cache"
  entries = set(os.listdir(cache))
  from latadj_jax.runtime import timing
  from latadj_jax.serving import backend
  assert backend.table_path(trained, timing.device_name()).is_file()

  # Second start: the latency table and every executable come from the workdir.
  second = start_serve(trained, port, "--max_queue_delay_ms=800")
  try:
    wait_ready(port, timeout=300)
    ready = call(port, "GET", "/readyz")[1]
    assert ready["latency_table"] == "loaded"
    assert ready["executables"] == {"compiled": 0, "loaded": 12}
    assert set(os.listdir(cache)) == entries          # nothing compiled anew
    # Three requests wait up to 800 ms for a fuller batch; SIGTERM arrives meanwhile.
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
      futures = [pool.submit(call, port, "POST", "/v1/classify", {"texts": [f"good film {i}"]})
                 for i in range(3)]
      time.sleep(0.3)
      second.send_signal(signal.SIGTERM)
      results = [f.result(timeout=30) for f in futures]
  finally:
    code, out = stop(second)
  assert [r[0] for r in results] == [200, 200, 200], results
  assert all(r[1]["batch_size"] == 3 for r in results)   # they were still queued at SIGTERM
  assert code == 0, out


@pytest.mark.slow
def test_serve_cli_errors_are_one_line(tmp_path, trained):
  env = {**os.environ, "HF_HUB_OFFLINE": "1"}
  run = lambda *a: subprocess.run([sys.executable, "serve.py", *a], cwd=REPO, env=env,
                                  capture_output=True, text=True, timeout=120)
  missing = run(f"--workdir={tmp_path}")
  assert missing.returncode == 2 and "not a training workdir" in missing.stderr
  bad_range = run(f"--workdir={trained}", "--k_min=1.2", "--port=1")
  assert bad_range.returncode == 2 and "k_min <= k_max" in bad_range.stderr
  bad_slo = run(f"--workdir={trained}", "--slo_ms=0", "--k_min=0.6", "--port=1")
  assert bad_slo.returncode == 2 and "slo_ms must be positive" in bad_slo.stderr
  no_sweep = run(f"--workdir={trained}", "--port=1")     # k_min defaults to the eval sweep's
  assert no_sweep.returncode == 2 and "no eval sweep" in no_sweep.stderr
  assert "--k_min" in no_sweep.stderr and "eval.py" in no_sweep.stderr
  for p in (missing, bad_range, bad_slo, no_sweep):
    assert "Traceback" not in p.stderr


def test_default_k_range_comes_from_the_sweep(tmp_path):
  from latadj_jax.serving import backend
  with pytest.raises(ValueError, match="no eval sweep"):
    backend.default_k_range(tmp_path, 1.0)
  rows = [{"coeff": k, "accuracy": a} for k, a in ((0.6, 0.80), (0.7, 0.875), (0.8, 0.88),
                                                   (1.0, 0.885), (1.2, 0.89))]
  (tmp_path / "eval_results.json").write_text(json.dumps({"rows": rows}))
  assert backend.default_k_range(tmp_path, 1.0) == (0.7, 1.0)
  assert backend.default_k_range(tmp_path, 0.6) == (0.8, 1.0)
  assert backend.default_k_range(tmp_path, 9.0) == (0.6, 1.0)
